"""The comparison every test uses; the per-dtype tolerance table is `fla_tl.utils.TOLERANCES` (one table, shared with
`python -m fla_tl check`)."""

import torch

from fla_tl.utils import TOLERANCES, compare, rms

__all__ = ["TOLERANCES", "assert_close", "poison_allocator", "rms"]


def assert_close(name: str, actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype) -> None:
    """relative-RMS check against the tolerance of `dtype`; fails on a shape mismatch and on any NaN or inf."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: one of actual / expected is None"
        return
    ok, detail = compare(actual, expected, dtype)
    assert ok, f"{name}: {detail}"


def poison_allocator(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> None:
    """fill cached device memory with NaN and free it, so outputs a kernel allocates but never writes hold NaN."""
    nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 2)
    torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
