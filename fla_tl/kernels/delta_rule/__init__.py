"""DeltaNet / Gated DeltaNet (`S <- exp(g_t) S`, then `S <- S + k_t beta_t (v_t - S^T k_t)^T`), see README.md: the
public ops of `ops.py`; the chunked WY launchers (`chunk.py`) and the token-by-token kernels (`fused_recurrent.py`)
load on first use by the tilelang backends."""

from .ops import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_chunk_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_chunk_delta_rule",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
]
