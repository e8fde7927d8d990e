"""Simple GLA's public ops: chunk, fused_chunk and fused_recurrent on the shared (q, k, v, state) call, and
parallel_simple_gla (the attention form, on chunk_simple_gla's kernels without the attention matrix)."""

import torch

from ...reference.simple_gla import parallel_simple_gla_torch, recurrent_simple_gla
from ...registry import (
    OpSpec,
    check_backend_name,
    describe_inputs,
    register,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case
from ...utils import join_graph, use_host_copy, validate_linear_attention_inputs
from ..common.state_op import (
    parallel_tilelang_backend,
    pop_chunk_size,
    pop_state_layout,
    run_state_op,
    simple_gla_spec,
    state_cases,
    state_kernels,
)


def _gates(B, T, H, device):
    g_gamma = -torch.rand(H, device=device) * 0.2
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device) + 3)
    return [("g_gamma", {}, {"g_gamma": g_gamma}), ("g", {"g": g}, {}), ("g+g_gamma", {"g": g}, {"g_gamma": g_gamma})]


CHUNK = simple_gla_spec("chunk_simple_gla", "simple_gla", "chunk", recurrent_simple_gla, state_v_first=True,
                        cases=state_cases(recurrent_simple_gla, state_v_first=True, extras=_gates))
FUSED_CHUNK = simple_gla_spec("fused_chunk_simple_gla", "simple_gla", "fused_chunk", recurrent_simple_gla,
                              cases=state_cases(recurrent_simple_gla, extras=_gates))
FUSED_RECURRENT = simple_gla_spec("fused_recurrent_simple_gla", "simple_gla", "fused_recurrent", recurrent_simple_gla,
                                  state_v_first=True,
                                  cases=state_cases(recurrent_simple_gla, recurrent=True, state_v_first=True,
                                                    extras=_gates))


@register(CHUNK)
def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA in the chunked form: `h_t = exp(g_t + g_gamma) h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        g (Optional[torch.Tensor]):
            per-token log forget gates of shape `[B, T, H]` (any float dtype; gets a gradient). Default: `None`.
        g_gamma (Optional[torch.Tensor]):
            per-head constant log decay of shape `[H]` (no gradient, as in fla). Default: `None`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`). Default: `None`.
        output_final_state (bool):
            whether to return the final state. Default: `False`.
        state_v_first (bool):
            states are laid out `[N, H, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` with `B = 1`. Default: `None`.
        cu_seqlens_cpu (Optional[torch.LongTensor]):
            a CPU copy of `cu_seqlens`: the op then reads nothing back from the GPU (no host sync). Default: `None`.
        backend (Optional[str]):
            `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.
        kwargs:
            `chunk_size` (a power of two) is accepted and ignored; `head_first` raises.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state (same layout as `initial_state`) in float32 if `output_final_state`, else `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k = (torch.randn(2, 1000, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        >>> v = torch.randn(2, 1000, 4, 128, device="cuda", dtype=torch.bfloat16)
        >>> g_gamma = -torch.rand(4, device="cuda")
        >>> o, ht = chunk_simple_gla(q, k, v, g_gamma=g_gamma, output_final_state=True)
        >>> g = F.logsigmoid(torch.randn(2, 1000, 4, device="cuda"))
        >>> o, ht = chunk_simple_gla(q, k, v, g=g, output_final_state=True)
        # varlen: pack the sequences into B = 1 and pass their boundaries
        >>> q, k, v, g = (x.flatten(0, 1)[None] for x in (q, k, v, g))
        >>> o, ht = chunk_simple_gla(q, k, v, g=g, cu_seqlens=torch.tensor([0, 300, 2000], device="cuda"))
    """
    pop_chunk_size(kwargs)
    state_v_first = pop_state_layout("chunk_simple_gla", state_v_first, kwargs)
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return run_state_op(CHUNK, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=False, state_v_first=state_v_first,
                        cu_seqlens=cu_seqlens, backend=backend, g=g, g_gamma=g_gamma)


@register(FUSED_CHUNK)
def fused_chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA in the fused-chunk form (one kernel carries the state across chunks); same math and arguments as
    :func:`chunk_simple_gla` without `state_v_first`.

    Examples::
        >>> q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = fused_chunk_simple_gla(q, k, v, g_gamma=-torch.rand(4, device="cuda"), output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = fused_chunk_simple_gla(q, k, v, cu_seqlens=torch.tensor([0, 1, 2000], device="cuda"))
    """
    return run_state_op(FUSED_CHUNK, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=False, state_v_first=False,
                        cu_seqlens=cu_seqlens, backend=backend, g=g, g_gamma=g_gamma)


@register(FUSED_RECURRENT)
def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
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
    Simple GLA by the token-by-token recurrence in one fused kernel; same math and arguments as
    :func:`chunk_simple_gla`, plus `reverse` (run each sequence from its last token). The deprecated
    `transpose_state_layout` is accepted with a warning.

    Examples::
        >>> q, k, v = (torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = fused_recurrent_simple_gla(q, k, v, g_gamma=-torch.rand(4, device="cuda"), reverse=True,
        ...                                    output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = fused_recurrent_simple_gla(q, k, v, cu_seqlens=torch.tensor([0, 10, 128], device="cuda"))
    """
    state_v_first = pop_state_layout("fused_recurrent_simple_gla", state_v_first, kwargs)
    return run_state_op(FUSED_RECURRENT, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                        cu_seqlens=cu_seqlens, backend=backend, g=g, g_gamma=g_gamma)


# ---------------------------------------------------------------------------------------------- parallel_simple_gla

PARALLEL_SCHEMA = "Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? cu_seqlens, float scale, bool output_attentions"


def _parallel_torch(q, k, v, g, cu_seqlens, scale, output_attentions):
    return parallel_simple_gla_torch(q, k, v, g, scale=scale, output_attentions=output_attentions,
                                     cu_seqlens=cu_seqlens)


def _parallel_fake(args):
    q, v = args["q"], args["v"]
    B, T, H, _ = q.shape
    attn = q.new_empty(B, H, T, T, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return [q.new_empty(q.shape[:3] + v.shape[-1:]), attn if args["output_attentions"] else None]


def _parallel_cases(device, dtype):
    g = torch.nn.functional.logsigmoid(torch.randn(2, 70, 2, device=device) + 2).to(dtype)
    q, k, v = (torch.randn(2, 70, 2, 16, device=device).to(dtype) for _ in range(3))
    return [Case("dense g", dict(q=q, k=k, v=v, g=g), ("q", "k", "v"),
                 lambda q, k, v, g: recurrent_simple_gla(q, k, v, g=g)[0], outputs=("o",), dtype=dtype)]


PARALLEL = OpSpec(
    name="parallel_simple_gla", variant="simple_gla", mode="parallel", reference=recurrent_simple_gla,
    backends=[parallel_tilelang_backend(),
              torch_backend(_parallel_torch, torch_capabilities(initial_state=False, gate=True))],
    schema=PARALLEL_SCHEMA, outputs=2, grads=("q", "k", "v", "g"),
    describe=lambda args, backward: describe_inputs(args["q"], args["v"], None, args["cu_seqlens"], backward,
                                                    g=args["g"], output_attentions=args["output_attentions"]),
    fake=_parallel_fake, kernels=lambda D, dtype: state_kernels(D, dtype, ("chunk",), ("gamma", "g")),
    cases=_parallel_cases,
)


@register(PARALLEL)
def parallel_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA in the attention form: `o_i = scale * sum_{j <= i} exp(G_i - G_j) (q_i . k_j) v_j`, `G` the cumulative
    per-token log gate `g` `[B, T, H]` (None: no decay). Returns `(o [B, T, H, V], attn [B, H, T, T] or None)`; the
    attention is materialised only with `output_attentions` (not with `cu_seqlens`, as in fla), by the torch backend.
    The tilelang backend runs chunk_simple_gla's kernels.

    Examples::
        >>> q, k, v = (torch.randn(2, 300, 4, 64) for _ in range(3))
        >>> g = torch.randn(2, 300, 4).sigmoid().log()
        >>> o, attn = parallel_simple_gla(q, k, v, g, output_attentions=True)
        >>> q, k, v, g = (x.flatten(0, 1)[None] for x in (q, k, v, g))
        >>> o, _ = parallel_simple_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 100, 600]))
    """
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    validate_linear_attention_inputs(q, k, v, scale=scale, cu_seqlens=cu_seqlens, g=g)
    if output_attentions and cu_seqlens is not None:
        raise ValueError("`output_attentions=True` is not supported with `cu_seqlens` (as in fla)")
    if q.shape[1] == 0:
        check_backend_name(PARALLEL, backend)
        found = parallel_simple_gla_torch(q, k, v, g, scale=scale, output_attentions=output_attentions,
                                          cu_seqlens=cu_seqlens)
        return tuple(join_graph(list(found), (q, k, v, g)))
    o, attn = PARALLEL.run(backend, q=q, k=k, v=v, g=g, cu_seqlens=cu_seqlens,
                           scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
                           output_attentions=bool(output_attentions))
    return o, (attn if output_attentions else None)
