"""DeltaNet / Gated DeltaNet (`S <- exp(g_t) S`, then `S <- S + k_t beta_t (v_t - S^T k_t)^T`): the chunked WY form
and the token-by-token kernels, forward and backward, and the differentiable `chunk_gated_delta_rule_tl` /
`fused_recurrent_gated_delta_rule_tl` over them."""

from .chunk import chunk_delta_rule_bwd, chunk_delta_rule_fwd, chunk_gated_delta_rule_tl
from .fused_recurrent import (
    fused_recurrent_delta_rule_bwd,
    fused_recurrent_delta_rule_fwd,
    fused_recurrent_gated_delta_rule_tl,
)

__all__ = [
    "chunk_delta_rule_bwd",
    "chunk_delta_rule_fwd",
    "chunk_gated_delta_rule_tl",
    "fused_recurrent_delta_rule_bwd",
    "fused_recurrent_delta_rule_fwd",
    "fused_recurrent_gated_delta_rule_tl",
]
