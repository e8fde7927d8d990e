"""Lightning attention: simple GLA with the per-head constant decay fla derives from the layer's depth."""

import torch

from .simple_gla import recurrent_simple_gla


def lightning_g_gamma(H: int, layer_idx: int, num_layers: int, device=None) -> torch.Tensor:
    """the per-head log decay `[H]` in fp32: `-(8 / H) * (1 - layer_idx / num_layers) * h` (fla 0.6.0)."""
    return -(8 / H * (1 - layer_idx / num_layers)) * torch.arange(H, dtype=torch.float32, device=device)


def recurrent_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """lightning attention by the token-by-token recurrence (the ground truth)."""
    return recurrent_simple_gla(q, k, v, g_gamma=lightning_g_gamma(q.shape[2], layer_idx, num_layers, q.device),
                                scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                                reverse=reverse, cu_seqlens=cu_seqlens)
