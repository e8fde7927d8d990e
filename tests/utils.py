"""The per-dtype tolerance table and the comparison every test uses."""

import torch

# (ratio, floor): a check passes when rms(actual - expected) <= ratio * rms(expected) + floor
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-4, 1e-6),
    torch.float16: (5e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}


def rms(x: torch.Tensor) -> float:
    x = x.double()
    return x.pow(2).mean().sqrt().item() if x.numel() else 0.0


def error_ratio(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(rms(actual - expected), rms(expected)), both in float64."""
    return rms(actual.double() - expected.double()), rms(expected)


def assert_close(name: str, actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype) -> None:
    """relative-RMS check against the tolerance of `dtype`; fails on a shape mismatch and on any NaN or inf."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: one of actual / expected is None"
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {(~torch.isfinite(actual)).sum().item()} non-finite elements"
    assert torch.isfinite(expected).all(), f"{name}: the reference has non-finite elements"
    ratio, floor = TOLERANCES[dtype]
    err, ref = error_ratio(actual, expected)
    assert err <= ratio * ref + floor, (
        f"{name}: rms err {err:.3e} > {ratio:.0e} * rms ref {ref:.3e} + {floor:.0e} (ratio {err / max(ref, 1e-30):.3e})"
    )


def poison_allocator(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> None:
    """fill cached device memory with NaN and free it, so outputs a kernel allocates but never writes hold NaN."""
    nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 2)
    torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
