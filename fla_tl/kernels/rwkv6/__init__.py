"""RWKV6 (GLA's per-key decayed state, read before the current token, plus a per-head bonus `u` for the current
token): the chunk and fused_recurrent ops on GLA's TileLang kernels with a one-token query shift (`bonus.py`)."""

from .ops import chunk_rwkv6, fused_recurrent_rwkv6

__all__ = ["chunk_rwkv6", "fused_recurrent_rwkv6"]
