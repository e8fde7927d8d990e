"""GLA (a log gate per key channel, `g` `[B, T, H, K]`): the fused_recurrent launchers on the shared token-by-token
kernels with gate "gk". chunk_gla has no TileLang kernels yet (the registry runs its torch backend).

Launcher contract as `fla_tl.kernels.simple_gla` (`g` is the per-key gate; `g_gamma` an optional per-head constant).
"""

from .fused_recurrent import fused_recurrent_gla_bwd, fused_recurrent_gla_fwd

__all__ = ["fused_recurrent_gla_fwd", "fused_recurrent_gla_bwd"]
