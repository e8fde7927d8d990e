"""Retention's public ops: simple GLA's kernels with retention's per-head decay `log(1 - 2^(-5-h))`; the chunk,
fused chunk and fused recurrent forms on the shared (q, k, v, state) call, and parallel_retention (the attention form,
on chunk_simple_gla's kernels, the attention matrix from the torch backend)."""

import functools

import torch

from ...reference.retention import parallel_retention_reference, recurrent_retention, retention_g_gamma
from ...reference.simple_gla import parallel_simple_gla_torch
from ...registry import (
    OpSpec,
    check_backend_name,
    describe_inputs,
    register,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case
from ...utils import join_graph, validate_linear_attention_inputs
from ..common.state_op import (
    parallel_tilelang_backend,
    pop_chunk_size,
    pop_state_layout,
    run_state_op,
    simple_gla_spec,
    state_cases,
    state_kernels,
)


@functools.lru_cache(maxsize=32)
def retention_decay(H: int, device: torch.device) -> torch.Tensor:
    """retention's per-head log decay, fp32 `[H]`, made once per (H, device)."""
    return retention_g_gamma(H, device)


def _spec(mode: str):
    return simple_gla_spec(f"{mode}_retention", "retention", mode, recurrent_retention, gate=False,
                           state_v_first=mode == "fused_recurrent", decay=retention_decay,
                           cases=state_cases(recurrent_retention, recurrent=mode == "fused_recurrent",
                                             state_v_first=mode == "fused_recurrent"))


CHUNK, FUSED_CHUNK, FUSED_RECURRENT = (_spec(mode) for mode in ("chunk", "fused_chunk", "fused_recurrent"))


@register(CHUNK)
def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Retention (RetNet) in the chunked form: `h_t = gamma_h h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`,
    with the per-head decay `gamma_h = 1 - 2 ** (-5 - h)`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]`, any float dtype; `N = B`, or the number of sequences with
            `cu_seqlens`. Default: `None`.
        output_final_state (bool):
            whether to return the final state of shape `[N, H, K, V]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` for variable-length inputs packed with `B = 1`,
            as in FlashAttention. Default: `None`.
        backend (Optional[str]):
            `"tilelang"` or `"torch"` to force a backend (raises if it cannot run the input); `None` chooses
            automatically, or takes `FLA_TL_BACKEND`. Default: `None`.
        kwargs:
            `chunk_size` is accepted and ignored (the kernels pick their own); `head_first` raises.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state of shape `[N, H, K, V]` in float32 (float64 for float64 inputs) if `output_final_state`,
            else `None`.

    Examples::
        >>> import torch
        >>> from fla_tl.ops import chunk_retention
        >>> B, T, H, K, V = 2, 1000, 4, 128, 128
        >>> q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        >>> h0 = torch.randn(B, H, K, V, device="cuda")
        >>> o, ht = chunk_retention(q, k, v, initial_state=h0, output_final_state=True)
        # varlen: pack the sequences into B = 1 and pass their boundaries
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> cu_seqlens = torch.tensor([0, 300, 2000], device="cuda")
        >>> o, ht = chunk_retention(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    """
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    kwargs.pop("chunk_size", None)
    if kwargs:
        raise TypeError(f"chunk_retention() got unexpected keyword arguments {sorted(kwargs)}")
    return run_state_op(CHUNK, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=False, state_v_first=False,
                        cu_seqlens=cu_seqlens, backend=backend)


@register(FUSED_CHUNK)
def fused_chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Retention in the fused-chunk form (one kernel carries the state across chunks); same math as
    :func:`chunk_retention`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]`, any float dtype. Default: `None`.
        output_final_state (bool):
            whether to return the final state of shape `[N, H, K, V]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` with `B = 1`. Default: `None`.
        backend (Optional[str]):
            `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state of shape `[N, H, K, V]` in float32 if `output_final_state`, else `None`.

    Examples::
        >>> q = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> o, ht = fused_chunk_retention(q, k, v, output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, ht = fused_chunk_retention(q, k, v, cu_seqlens=torch.tensor([0, 1, 2000], device="cuda"))
    """
    return run_state_op(FUSED_CHUNK, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=False, state_v_first=False,
                        cu_seqlens=cu_seqlens, backend=backend)


@register(FUSED_RECURRENT)
def fused_recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
    Retention by the token-by-token recurrence in one fused kernel; same math as :func:`chunk_retention`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`), any float dtype.
            Default: `None`.
        output_final_state (bool):
            whether to return the final state (same layout as `initial_state`). Default: `False`.
        reverse (bool):
            run the recurrence from the last token to the first of each sequence. Default: `False`.
        state_v_first (bool):
            states are laid out `[N, H, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` with `B = 1`. Default: `None`.
        backend (Optional[str]):
            `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.
        kwargs:
            the deprecated `transpose_state_layout` (renamed `state_v_first`) is accepted with a warning.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state of shape `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`) in float32 if
            `output_final_state`, else `None`.

    Examples::
        >>> q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> o, ht = fused_recurrent_retention(q, k, v, output_final_state=True, reverse=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, ht = fused_recurrent_retention(q, k, v, cu_seqlens=torch.tensor([0, 10, 128], device="cuda"))
    """
    state_v_first = pop_state_layout("fused_recurrent_retention", state_v_first, kwargs)
    return run_state_op(FUSED_RECURRENT, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                        cu_seqlens=cu_seqlens, backend=backend)


# ---------------------------------------------------------------------------------------------- parallel_retention

PARALLEL_SCHEMA = "Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, float scale, bool output_attentions"
def _parallel_torch(q, k, v, cu_seqlens, scale, output_attentions):
    B, T, H, _ = q.shape
    # the per-head decay as a per-token gate: a stride-0 view, nothing of [B, T, H] is written
    g = retention_decay(H, q.device)[None, None].expand(B, T, H)
    o, attn = parallel_simple_gla_torch(q, k, v, g, scale=scale, output_attentions=output_attentions,
                                        cu_seqlens=cu_seqlens)
    return o, (attn.to(q.dtype) if attn is not None else None)


def _parallel_fake(args: dict) -> list:
    q, v = args["q"], args["v"]
    B, T, H, _ = q.shape
    return [q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, T) if args["output_attentions"] else None]


def _parallel_describe(args: dict, backward: bool):
    return describe_inputs(args["q"], args["v"], None, args["cu_seqlens"], backward,
                           output_attentions=args["output_attentions"])


def _parallel_cases(device, dtype):
    found = []
    for label, B, lens, attn in (("dense", 2, None, False), ("varlen", 1, (30, 0, 100, 1), False),
                                 ("dense attn", 2, None, True)):
        T = sum(lens) if lens else 100
        q = torch.randn(B, T, 2, 32, device=device).to(dtype)
        k = torch.nn.functional.normalize(torch.randn(B, T, 2, 32, device=device), dim=-1).to(dtype)
        v = torch.randn(B, T, 2, 48, device=device).to(dtype)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device) if lens else None
        args = {"q": q, "k": k, "v": v, "output_attentions": attn, "cu_seqlens": cu}
        found.append(Case(label, args, ("q", "k", "v"),
                          parallel_retention_reference, outputs=("o", "attn") if attn else ("o",), dtype=dtype,
                          out_dtypes={"o": dtype, "attn": dtype}))
    return found


PARALLEL = OpSpec(
    name="parallel_retention", variant="retention", mode="parallel", reference=parallel_retention_reference,
    backends=[parallel_tilelang_backend(retention_decay),
              torch_backend(_parallel_torch, torch_capabilities(initial_state=False))],
    schema=PARALLEL_SCHEMA, outputs=2, grads=("q", "k", "v"), describe=_parallel_describe, fake=_parallel_fake,
    kernels=lambda D, dtype: state_kernels(D, dtype, ("chunk",), ("gamma",)), cases=_parallel_cases,
)


@register(PARALLEL)
def parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Retention in the attention form: `o_i = sum_{j <= i} scale * (q_i . k_j) * gamma_h ** (i - j) * v_j` within each
    sequence, with the per-head decay `gamma_h = 1 - 2 ** (-5 - h)`; same outputs as :func:`chunk_retention` without
    states. The tilelang backend runs chunk_simple_gla's kernels with the decay as a per-head constant; the attention
    matrix is materialised only by the torch backend.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        output_attentions (bool):
            whether to return the attention scores `scale * (q_i . k_j) * gamma_h ** (i - j)` (zero above the
            diagonal) of shape `[B, H, T, T]`; not with `cu_seqlens` (as in fla), and only by the torch backend (the
            tilelang backend refuses it, the automatic choice takes the torch backend). Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` for variable-length inputs packed with `B = 1`,
            as in FlashAttention. Default: `None`.
        backend (Optional[str]):
            `"tilelang"` or `"torch"` to force a backend (raises if it cannot run the input); `None` chooses
            automatically, or takes `FLA_TL_BACKEND`. Default: `None`.
        kwargs:
            `chunk_size` (a power of two) is accepted and ignored (the kernels pick their own); `head_first` raises.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        attn (Optional[torch.Tensor]):
            attention scores of shape `[B, H, T, T]` in the dtype of `q` if `output_attentions`, else `None`.

    Examples::
        >>> import torch
        >>> from fla_tl.ops import parallel_retention
        >>> B, T, H, K, V = 2, 1000, 4, 128, 128
        >>> q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        >>> o, _ = parallel_retention(q, k, v)
        >>> o, attn = parallel_retention(q, k, v, output_attentions=True)
        # varlen: pack the sequences into B = 1 and pass their boundaries
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> cu_seqlens = torch.tensor([0, 300, 2000], device="cuda")
        >>> o, _ = parallel_retention(q, k, v, cu_seqlens=cu_seqlens)
    """
    pop_chunk_size(kwargs)
    if kwargs:
        raise TypeError(f"parallel_retention() got unexpected keyword arguments {sorted(kwargs)}")
    validate_linear_attention_inputs(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    if output_attentions and cu_seqlens is not None:
        raise ValueError("`output_attentions=True` is not supported with `cu_seqlens` (as in fla)")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if q.shape[1] == 0:
        check_backend_name(PARALLEL, backend)
        return tuple(join_graph(list(_parallel_torch(q, k, v, cu_seqlens, scale, bool(output_attentions))), (q, k, v)))
    o, attn = PARALLEL.run(backend, q=q, k=k, v=v, cu_seqlens=cu_seqlens, scale=scale,
                           output_attentions=bool(output_attentions))
    return o, (attn if output_attentions else None)
