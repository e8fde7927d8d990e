"""GLA's public ops on the shared (q, k, v, state) call: chunk_gla (GLA's intra-chunk kernels, `chunk.py`) and
fused_recurrent_gla (the token-by-token kernels with gate "gk"); fused_chunk_gla is registered with fla 0.6.0's
refusal."""

import torch

from ...reference.gla import chunk_gla_torch, recurrent_gla
from ...registry import (
    KernelSpec,
    OpSpec,
    refusing_backend,
    register,
    tilelang_capabilities,
    torch_capabilities,
)
from ...utils import use_host_copy
from ..common.state_op import (
    pop_state_layout,
    run_state_op,
    stage_spec,
    state_cases,
    state_op,
    tilelang_state_backend,
    torch_state_backend,
)


def gla_form(q, k, v, g, g_gamma, **options):
    """the chunked PyTorch form of GLA (no gate: no decay)."""
    if g is None:
        g = q.new_zeros(q.shape, dtype=torch.float32)
    return chunk_gla_torch(q, k, v, g, **options)


def _recurrent_gla_gk(q, k, v, gk=None, **kwargs):
    """`recurrent_gla` with fused_recurrent_gla's gate name (`gk`, None: no decay)."""
    return recurrent_gla(q, k, v, gk if gk is not None else torch.zeros_like(q), **kwargs)


def _key_gate(B, T, H, device):
    return torch.nn.functional.logsigmoid(torch.randn(B, T, H, 32, device=device) + 2)


def chunk_gla_kernels(D: int, dtype: str, bonus: bool = False) -> list[KernelSpec]:
    """the kernels chunk_gla launches at K = V = D (with RWKV6's `bonus` form of the output kernel too)."""
    from . import chunk

    # the gate arrives in fp32 (as fla draws it) or in the input dtype; its cumulative sum and gradient follow it
    g_dtypes = sorted({"float32", dtype})
    specs = [stage_spec("gate_cumsum", 0, 0, dtype, "none", g_dtype=g, BT=chunk.BT)
             for g in g_dtypes]
    specs += [stage_spec(name, D, D, dtype, "gk") for name in ("chunk_fwd_h", "chunk_bwd_dh")]
    # few long sequences: the combine of the chunk ranges' states (a per-key decay), both directions
    specs += [stage_spec("combine_states", D, D, dtype, "none", reverse=r, diagonal=True)
              for r in (False, True)]
    specs += [stage_spec("chunk_gla_fwd_o", D, D, dtype, "gk", bonus=b) for b in ((False, True) if bonus else (False,))]
    specs += [stage_spec("chunk_gla_bwd_dv", D, D, dtype, "gk"), stage_spec("chunk_gla_bwd_dqk", D, D, dtype, "gk"),
              stage_spec("chunk_state_dot", D, D, dtype, "none", h_dtype=dtype, per_key=True, BT=chunk.BT),
              ]
    specs += [stage_spec("gate_grad_chunk_scan", 0, 0, dtype, "none", out_dtype=g, BT=chunk.BT)
              for g in g_dtypes]
    return specs


def fused_recurrent_gla_kernels(D: int, dtype: str) -> list[KernelSpec]:
    """the kernels fused_recurrent_gla launches at K = V = D, every flag combination."""

    specs = [stage_spec(name, D, D, dtype, "gk", reverse=reverse, state_v_first=svf)
             for name in ("fused_recurrent_fwd", "fused_recurrent_bwd")
             for reverse in (False, True) for svf in (False, True)]
    return specs + [stage_spec("gate_grad_scan", 0, 0, dtype, "none", reverse=reverse, out_dtype=g, BT=64)
                    for reverse in (False, True) for g in sorted({"float32", dtype})]


def _spec(mode: str, reference, kernels, extras) -> OpSpec:
    recurrent = mode == "fused_recurrent"
    backends = [
        tilelang_state_backend(f"fla_tl.kernels.gla.{mode}", f"{mode}_gla", recurrent=recurrent, state_v_first=True),
        torch_state_backend(gla_form, recurrent=recurrent, state_v_first=True, gate=True),
    ]
    return state_op(f"{mode}_gla", "gla", mode, reference, backends, kernels=kernels,
                    cases=state_cases(reference, recurrent=recurrent, state_v_first=True, extras=extras))


CHUNK = _spec("chunk", recurrent_gla, chunk_gla_kernels,
              lambda B, T, H, device: [("g", {"g": _key_gate(B, T, H, device)}, {})])
FUSED_RECURRENT = _spec("fused_recurrent", _recurrent_gla_gk, fused_recurrent_gla_kernels,
                        lambda B, T, H, device: [("gk", {"gk": _key_gate(B, T, H, device)}, {}), ("no gate", {}, {})])
FUSED_CHUNK_GLA_DROPPED = "fused_chunk_gla is not provided (fla 0.6.0 dropped it): use chunk_gla"
FUSED_CHUNK = OpSpec(
    name="fused_chunk_gla", variant="gla", mode="fused_chunk", reference=recurrent_gla,
    backends=[refusing_backend("tilelang", tilelang_capabilities(), FUSED_CHUNK_GLA_DROPPED),
              refusing_backend("torch", torch_capabilities(), FUSED_CHUNK_GLA_DROPPED)],
    kernels=lambda D, dtype: [],  # it launches none
)


@register(CHUNK)
def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    GLA in the chunked form: `h_t = diag(exp(g_t)) h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`, with a log gate
    per key channel. The tilelang backend runs the kernels of `fla_tl.kernels.gla` (per-key gated state passes).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        g (torch.Tensor): per-key log forget gates `[B, T, H, K]` (any float dtype; gets a gradient).
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`).
        output_final_state (bool): Default: `False`.
        state_v_first (bool): states laid out `[N, H, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. Default: `None`.
        cu_seqlens_cpu (Optional[torch.LongTensor]): a CPU copy of `cu_seqlens`: no host sync then.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.

    Returns:
        o `[B, T, H, V]` in q's dtype; the final state in float32 if `output_final_state`, else `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k, v = (torch.randn(2, 500, 4, 64) for _ in range(3))
        >>> g = F.logsigmoid(torch.randn(2, 500, 4, 64))
        >>> o, ht = chunk_gla(q, k, v, g, output_final_state=True)
        >>> q, k, v, g = (x.flatten(0, 1)[None] for x in (q, k, v, g))
        >>> o, ht = chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 300, 1000]), output_final_state=True)
    """
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"`g` must be a torch.Tensor [B, T, H, K], got {type(g).__name__}")
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return run_state_op(CHUNK, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=False, state_v_first=state_v_first,
                        cu_seqlens=cu_seqlens, backend=backend, g=g, g_per_key=True)


@register(FUSED_RECURRENT)
def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    GLA by the token-by-token recurrence; same math as :func:`chunk_gla` with the key gate `gk` (None: no decay),
    plus `reverse`. The value gate `gv` is not supported yet (raises). The deprecated `transpose_state_layout` is
    accepted with a warning.

    Examples::
        >>> q, k, v = (torch.randn(2, 64, 4, 32) for _ in range(3))
        >>> gk = torch.randn(2, 64, 4, 32).sigmoid().log()
        >>> o, ht = fused_recurrent_gla(q, k, v, gk, output_final_state=True, reverse=True)
        >>> q, k, v, gk = (x.flatten(0, 1)[None] for x in (q, k, v, gk))
        >>> o, _ = fused_recurrent_gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 10, 128]))
    """
    if gv is not None:
        raise NotImplementedError("fused_recurrent_gla: the value gate `gv` is not supported by fla_tl yet")
    state_v_first = pop_state_layout("fused_recurrent_gla", state_v_first, kwargs)
    return run_state_op(FUSED_RECURRENT, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                        cu_seqlens=cu_seqlens, backend=backend, g=gk, g_per_key=True, g_name="gk")


@register(FUSED_CHUNK)
def fused_chunk_gla(**kwargs):
    """fla 0.6.0 dropped `fused_chunk_gla`; so does fla_tl (registered with that refusal): use :func:`chunk_gla`."""
    raise NotImplementedError("`fused_chunk_gla` is deprecated. Please use `chunk_gla` instead.")
