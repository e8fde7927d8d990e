"""GLA (a log gate per key channel, `g` `[B, T, H, K]`): the chunk launchers (`chunk.py`: the per-key gated state
passes of `common.chunk_h` with gate "gk" and GLA's own intra-chunk kernels) and the fused_recurrent launchers on the
shared token-by-token kernels with gate "gk".

Launcher contract as `fla_tl.kernels.simple_gla` (`g` is the per-key gate; `g_gamma` an optional per-head constant).
"""

from .chunk import chunk_gla_bwd, chunk_gla_fwd
from .fused_recurrent import fused_recurrent_gla_bwd, fused_recurrent_gla_fwd

__all__ = ["chunk_gla_fwd", "chunk_gla_bwd", "fused_recurrent_gla_fwd", "fused_recurrent_gla_bwd"]
