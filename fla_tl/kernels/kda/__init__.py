"""KDA, Kimi Delta Attention (the gated delta rule with a per-key decay), see README.md: the public ops of `ops.py`;
the token-by-token launchers (`fused_recurrent.py`) load on first use by the tilelang backends."""

from .ops import chunk_kda, fused_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda"]
