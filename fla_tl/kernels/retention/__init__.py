"""Retention (RetNet): simple GLA's kernels with the per-head decay `log(1 - 2^(-5-h))` (see README.md)."""

from .ops import chunk_retention, fused_chunk_retention, fused_recurrent_retention, parallel_retention

__all__ = ["chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention"]
