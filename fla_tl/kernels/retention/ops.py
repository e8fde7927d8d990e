"""Retention's public ops: simple GLA's kernels with retention's per-head decay `log(1 - 2^(-5-h))`."""

import functools

import torch

from ...reference.retention import recurrent_retention, retention_g_gamma
from ...registry import register
from ..common.state_op import pop_state_layout, run_state_op, simple_gla_spec, state_cases


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
