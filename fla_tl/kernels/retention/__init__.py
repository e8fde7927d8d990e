"""Retention (RetNet) kernels: the simple-GLA launchers with retention's per-head decay log(1 - 2^(-5-h)).

Same launcher contract as `fla_tl.kernels.simple_gla`, without `g_gamma`.
"""

import functools

from ..common.gates import retention_g_gamma
from ..simple_gla import (
    chunk_simple_gla_bwd,
    chunk_simple_gla_fwd,
    fused_chunk_simple_gla_bwd,
    fused_chunk_simple_gla_fwd,
    fused_recurrent_simple_gla_bwd,
    fused_recurrent_simple_gla_fwd,
)


def _with_retention_decay(launcher):
    @functools.wraps(launcher)
    def run(q, *args, **kwargs):
        out = launcher(q, *args, g_gamma=retention_g_gamma(q.shape[2], q.device), **kwargs)
        # the simple-GLA backwards add dg (None without a per-token gate)
        return out[:4] if launcher.__name__.endswith("_bwd") else out

    return run


chunk_retention_fwd = _with_retention_decay(chunk_simple_gla_fwd)
chunk_retention_bwd = _with_retention_decay(chunk_simple_gla_bwd)
fused_chunk_retention_fwd = _with_retention_decay(fused_chunk_simple_gla_fwd)
fused_chunk_retention_bwd = _with_retention_decay(fused_chunk_simple_gla_bwd)
fused_recurrent_retention_fwd = _with_retention_decay(fused_recurrent_simple_gla_fwd)
fused_recurrent_retention_bwd = _with_retention_decay(fused_recurrent_simple_gla_bwd)

__all__ = [
    "chunk_retention_fwd",
    "chunk_retention_bwd",
    "fused_chunk_retention_fwd",
    "fused_chunk_retention_bwd",
    "fused_recurrent_retention_fwd",
    "fused_recurrent_retention_bwd",
]
