"""RWKV-7 ("Goose"): the generalized delta rule with RWKV-7's names and defaults, see README.md; the public ops of
`ops.py`."""

from .ops import chunk_rwkv7, fused_mul_recurrent_rwkv7, fused_recurrent_rwkv7

__all__ = ["chunk_rwkv7", "fused_mul_recurrent_rwkv7", "fused_recurrent_rwkv7"]
