"""Linear attention: simple GLA's kernels with no decay, and the key-sum normalisation stages of `normalize.py`
(fla's `normalize=True`), see README.md."""

from .ops import chunk_linear_attn, fused_chunk_linear_attn, fused_recurrent_linear_attn

__all__ = ["chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn"]
