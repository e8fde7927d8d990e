"""Retention (RetNet): simple GLA with the per-head constant log decay `log(1 - 2 ** (-5 - h))`; the recurrence, the
chunked form and the attention matrix written out."""

import torch

from .simple_gla import chunk_simple_gla_torch, recurrent_simple_gla


def retention_g_gamma(H: int, device: torch.device | str | None = None) -> torch.Tensor:
    """the per-head log decay of retention, `[H]` in fp32: `log(1 - 2 ** (-5 - arange(H)))`."""
    h = torch.arange(H, dtype=torch.float32, device=device)
    return torch.log(1 - torch.pow(2.0, -5.0 - h))


def recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """retention by the token-by-token recurrence (the ground truth); see :func:`recurrent_simple_gla`."""
    return recurrent_simple_gla(
        q,
        k,
        v,
        g_gamma=retention_g_gamma(q.shape[2], q.device),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )


def chunk_retention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """retention in the chunked matrix form (the `torch` backend); see :func:`chunk_simple_gla_torch`."""
    return chunk_simple_gla_torch(
        q,
        k,
        v,
        g_gamma=retention_g_gamma(q.shape[2], q.device),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
    )


def retention_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """retention's attention matrix written out, `[B, H, T, T]` in fp32 (fp64 for fp64 inputs):
    `a[b, h, i, j] = scale * (q_i . k_j) * gamma_h ** (i - j)` for `j <= i` in the same sequence, else 0, with the
    power taken as `exp((i - j) * log(gamma_h))` on the integer distance (no cumulative sum)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    _, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    pos = torch.arange(T, device=q.device)
    seq = torch.zeros(T, dtype=torch.long, device=q.device)
    if cu_seqlens is not None:
        seq = torch.bucketize(pos, cu_seqlens[1:].to(q.device), right=True)
    keep = (pos[None, :] <= pos[:, None]) & (seq[None, :] == seq[:, None])  # [T, T]
    distance = (pos[:, None] - pos[None, :]).clamp(min=0).to(dtype)
    decay = torch.exp(distance[None] * retention_g_gamma(H, q.device).to(dtype)[:, None, None])  # [H, T, T]
    scores = torch.einsum("bihk,bjhk->bhij", q.to(dtype), k.to(dtype)) * scale
    return torch.where(keep, scores * decay, 0)


def parallel_retention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """the reference of `parallel_retention`: `o` by the token-by-token recurrence, the attention matrix written out
    (:func:`retention_attention`) when `output_attentions`, else None."""
    o, _ = recurrent_retention(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    return o, (retention_attention(q, k, scale=scale, cu_seqlens=cu_seqlens) if output_attentions else None)
