"""HGRN's public ops: chunk_hgrn and fused_recurrent_hgrn, both on the fp32 scan kernels of `fused_recurrent.py`
(the recurrence is elementwise, so a chunked form saves no work over one read of x, g and one write of o).

The kernel-level call (`SCHEMA`): x, g `[B, T, D]`, the initial state `[N, D]`, cu_seqlens and `output_final_state`;
it returns (o `[B, T, D]` in x's dtype, the final state `[N, D]` in fp32, fp64 for fp64 inputs, or None). The
backward reads o (`dg_t = dh_t * (o_t - x_t)`).
"""

import torch

from ...reference.hgrn import chunk_hgrn_torch, recurrent_hgrn
from ...registry import (
    Backend,
    KernelSpec,
    OpSpec,
    check_backend_name,
    describe_inputs,
    register,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case, reference_dtype
from ...utils import check_cu_seqlens, check_device, check_tensor, join_graph

SCHEMA = "Tensor x, Tensor g, Tensor? initial_state, Tensor? cu_seqlens, bool output_final_state"
MODULE = "fla_tl.kernels.hgrn.fused_recurrent"


def _check_hgrn(x, g, initial_state, cu_seqlens) -> int:
    """the checks of the HGRN ops, each error naming the argument; returns N."""
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor [B, T, D], got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if x.dim() != 3:
        raise ValueError(f"`x` must have shape [B, T, D], got {tuple(x.shape)}")
    if g.shape != x.shape:
        raise ValueError(f"`g` must have the shape of `x` {tuple(x.shape)}, got {tuple(g.shape)}")
    if g.device != x.device:
        raise ValueError(f"`g` must be on the device of `x` ({x.device}), got {g.device}")
    B, _, D = x.shape
    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, x, "x")
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_device("initial_state", initial_state, x.device, "x")
        if tuple(initial_state.shape) != (N, D):
            raise ValueError(f"`initial_state` must have shape [N, D] = {[N, D]}, got {tuple(initial_state.shape)}")
    return N


def _hgrn_run(spec, x, g, initial_state, output_final_state, cu_seqlens, backend):
    """validate, handle T = 0 (no kernel runs; the outputs still reach the autograd graph of the inputs), and run
    the op's kernel-level call."""
    N = _check_hgrn(x, g, initial_state, cu_seqlens)
    if x.shape[1] == 0:
        check_backend_name(spec, backend)
        ht = None
        if output_final_state:
            ht_dtype = reference_dtype(x.dtype)
            ht = (initial_state.to(ht_dtype, copy=True) if initial_state is not None
                  else x.new_zeros(N, x.shape[-1], dtype=ht_dtype))
        o, ht = join_graph([x.new_empty(x.shape), ht], (x, g, initial_state))
        return o, ht
    o, ht = spec.run(backend, x=x, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens,
                     output_final_state=bool(output_final_state))
    return o, (ht if output_final_state else None)


def _sequences(args) -> int:
    x, h0, cu = args["x"], args["initial_state"], args["cu_seqlens"]
    return h0.shape[0] if h0 is not None else (cu.shape[0] - 1 if cu is not None else x.shape[0])


def _describe(args: dict, backward: bool):
    x = args["x"]
    # K = V = D: the scan has no head dims to limit
    return describe_inputs(x, x, args["initial_state"], args["cu_seqlens"], backward)


def _fake(args: dict) -> list:
    x = args["x"]
    ht = x.new_empty(_sequences(args), x.shape[-1], dtype=reference_dtype(x.dtype))
    return [x.new_empty(x.shape), ht if args["output_final_state"] else None]


def _contiguous(x):
    return x.contiguous() if x is not None else None


def make_hgrn_backend(varlen: bool) -> Backend:
    """the tilelang backend of chunk_hgrn and fused_recurrent_hgrn: the fp32 scan kernels of `fused_recurrent.py`."""

    def fwd(x, g, initial_state, cu_seqlens, output_final_state, requires_grad):
        from .fused_recurrent import fused_recurrent_hgrn_fwd

        return fused_recurrent_hgrn_fwd(x.contiguous(), g.contiguous(), initial_state=_contiguous(initial_state),
                                        output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    def bwd(args, outputs, grads):
        from .fused_recurrent import fused_recurrent_hgrn_bwd

        x, o = args["x"], outputs[0]
        do, dht = grads
        do = torch.zeros_like(o) if do is None else do.to(o.dtype)
        dx, dg, dh0 = fused_recurrent_hgrn_bwd(x.contiguous(), args["g"].contiguous(), o.contiguous(),
                                               do.contiguous(), _contiguous(dht),
                                               initial_state=_contiguous(args["initial_state"]),
                                               cu_seqlens=args["cu_seqlens"])
        return {"x": dx, "g": dg, "initial_state": dh0}

    caps = tilelang_capabilities(varlen=varlen, max_head_dim=None)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, module=MODULE,
                   description="fp32 scan kernels, token by token")


def _hgrn_torch(x, g, initial_state, cu_seqlens, output_final_state):
    return chunk_hgrn_torch(x, g, initial_state, output_final_state, cu_seqlens)


def _kernels(D: int, dtype: str) -> list[KernelSpec]:
    """the forward and backward scans for x in `dtype` and g in fp32 or x's dtype, with 16-byte vectors (D a multiple
    of 8 and aligned pointers) and the scalar fallback."""
    from ..common.state_op import stage_spec
    from .fused_recurrent import VEC_ALIGNED

    vecs = (VEC_ALIGNED, 1) if D % VEC_ALIGNED == 0 else (1,)
    return [stage_spec(name, 0, 0, dtype, "none", g_dtype=g_dtype, VEC=vec)
            for g_dtype in sorted({"float32", dtype}) for vec in vecs for name in ("hgrn_fwd", "hgrn_bwd")]


def _cases(varlen: bool):
    def cases(device, dtype):
        B, T, D = (1, 101, 24) if varlen else (2, 70, 24)
        N = 3 if varlen else B
        x = torch.randn(B, T, D, device=device).to(dtype)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, device=device) + 2).to(dtype)
        h0 = torch.randn(N, D, device=device).to(dtype)
        args = dict(x=x, g=g, initial_state=h0, output_final_state=True)
        if varlen:
            args["cu_seqlens"] = torch.tensor([0, 30, 30, 101], device=device)
        return [Case("varlen" if varlen else "dense", args, ("x", "g", "initial_state"), recurrent_hgrn,
                     dtype=dtype, out_dtypes={"o": dtype, "ht": reference_dtype(dtype)})]

    return cases


def _spec(mode: str) -> OpSpec:
    varlen = mode == "fused_recurrent"
    return OpSpec(
        name=f"{mode}_hgrn", variant="hgrn", mode=mode, reference=recurrent_hgrn,
        backends=[make_hgrn_backend(varlen), torch_backend(_hgrn_torch, torch_capabilities(varlen=varlen))],
        schema=SCHEMA, outputs=2, grads=("x", "g", "initial_state"), saved_outputs=(0,), describe=_describe,
        fake=_fake, kernels=_kernels, cases=_cases(varlen),
    )


CHUNK, FUSED_RECURRENT = _spec("chunk"), _spec("fused_recurrent")


@register(CHUNK)
def chunk_hgrn(
    x: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    HGRN in chunks: `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t`, elementwise over `[B, T, D]`.

    Args:
        x (torch.Tensor): inputs `[B, T, D]`. g (torch.Tensor): log forget gates `[B, T, D]`.
        initial_state (Optional[torch.Tensor]): `[B, D]`. Default: `None`.
        output_final_state (bool): return the final state `[B, D]` (float32). Default: `False`.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.

    Returns:
        o `[B, T, D]` in x's dtype, and the final state or `None`.

    Examples::
        >>> x, g = torch.randn(2, 500, 256), torch.randn(2, 500, 256).sigmoid().log()
        >>> o, ht = chunk_hgrn(x, g, output_final_state=True)
    """
    return _hgrn_run(CHUNK, x, g, initial_state, output_final_state, None, backend)


@register(FUSED_RECURRENT)
def fused_recurrent_hgrn(
    x: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    HGRN token by token; same math and returns as :func:`chunk_hgrn`, plus `cu_seqlens` (`B = 1`, `initial_state`
    `[N, D]`).

    Examples::
        >>> x, g = torch.randn(1, 500, 256), torch.randn(1, 500, 256).sigmoid().log()
        >>> o, ht = fused_recurrent_hgrn(x, g, output_final_state=True, cu_seqlens=torch.tensor([0, 100, 500]))
    """
    return _hgrn_run(FUSED_RECURRENT, x, g, initial_state, output_final_state, cu_seqlens, backend)
