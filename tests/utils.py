"""The comparison every test uses; the per-dtype tolerance table is `fla_tl.utils.TOLERANCES` (one table, shared with
`python -m fla_tl check`)."""

import torch

from fla_tl.utils import TOLERANCES, compare, rms

__all__ = ["TOLERANCES", "assert_close", "check_op", "poison_allocator", "rms"]


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


def check_op(fn, reference, q, k, v, h0, *, cu_seqlens=None, backend=None, grad_kwargs=None, **kwargs):
    """run `fn` and the fp32/fp64 `reference` on the same inputs; compare o, ht and the gradients of q, k, v, h0 and
    of every tensor in `grad_kwargs` (e.g. a gate `g`); `kwargs` go to both unchanged."""
    grad_kwargs = grad_kwargs or {}
    dtype = q.dtype
    o, ht = fn(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend,
               **grad_kwargs, **kwargs)
    assert o.dtype == dtype
    assert ht.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    names = ["q", "k", "v"] + (["h0"] if h0 is not None else []) + list(grad_kwargs)
    inputs = [x for x in (q, k, v, h0) if x is not None] + list(grad_kwargs.values())
    grads = torch.autograd.grad((o, ht), inputs, (do, dht))

    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref_inputs = [x.detach().to(ref_dtype).requires_grad_() for x in inputs]
    ref = dict(zip(names, ref_inputs))
    ref_o, ref_ht = reference(ref["q"], ref["k"], ref["v"], initial_state=ref.get("h0"), output_final_state=True,
                              cu_seqlens=cu_seqlens, **{n: ref[n] for n in grad_kwargs}, **kwargs)
    ref_grads = torch.autograd.grad((ref_o, ref_ht), ref_inputs, (do.to(ref_dtype), dht.to(ref_dtype)))
    assert_close("o", o, ref_o, dtype)
    assert_close("ht", ht, ref_ht, dtype)
    for name, g, rg, x in zip(names, grads, ref_grads, inputs):
        assert g.dtype == x.dtype, f"d{name}: dtype {g.dtype} != {x.dtype}"
        assert_close(f"d{name}", g, rg, dtype)
