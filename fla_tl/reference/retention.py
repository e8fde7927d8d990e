"""Retention (RetNet): simple GLA with the per-head constant log decay `log(1 - 2 ** (-5 - h))`."""

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
