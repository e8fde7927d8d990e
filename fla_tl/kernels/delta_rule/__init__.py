"""DeltaNet / Gated DeltaNet (`S <- exp(g_t) S`, then `S <- S + k_t beta_t (v_t - S^T k_t)^T`): the token-by-token
TileLang kernels, forward and backward, and the differentiable `fused_recurrent_gated_delta_rule_tl` over them."""

from .fused_recurrent import (
    fused_recurrent_delta_rule_bwd,
    fused_recurrent_delta_rule_fwd,
    fused_recurrent_gated_delta_rule_tl,
)

__all__ = ["fused_recurrent_delta_rule_bwd", "fused_recurrent_delta_rule_fwd", "fused_recurrent_gated_delta_rule_tl"]
