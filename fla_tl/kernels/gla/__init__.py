"""GLA: a log gate per key channel, `g` `[B, T, H, K]` (see README.md). `chunk.py`: the per-key gated state passes of
`common.chunk_h` (gate "gk") and GLA's own intra-chunk kernels; `fused_recurrent.py`: the shared token-by-token
kernels with gate "gk". Launcher contract as `fla_tl.kernels.simple_gla`."""

from .ops import chunk_gla, fused_chunk_gla, fused_recurrent_gla

__all__ = ["chunk_gla", "fused_chunk_gla", "fused_recurrent_gla"]
