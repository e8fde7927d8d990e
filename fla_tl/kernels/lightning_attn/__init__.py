"""Lightning attention: simple GLA's kernels with a per-head decay set by the layer's depth (see README.md)."""

from .ops import chunk_lightning_attn, fused_recurrent_lightning_attn

__all__ = ["chunk_lightning_attn", "fused_recurrent_lightning_attn"]
