"""fused_recurrent_rwkv6 on GLA's token-by-token kernels (`kernels/gla/fused_recurrent.py`: `common.fused_recurrent`
with gate "gk", the per-key dg scan), with the queries shifted one token in processing order and the bonus added
around them (`bonus.py`); `reverse` runs the recurrence from the last token."""

from ..gla.fused_recurrent import fused_recurrent_gla_bwd, fused_recurrent_gla_fwd
from .bonus import rwkv6_bwd, rwkv6_fwd, shifted_fwd


def _extra(reverse):
    return {"reverse": reverse, "state_v_first": False}


LAUNCHERS = (shifted_fwd(fused_recurrent_gla_fwd, _extra), fused_recurrent_gla_bwd, _extra)


def fused_recurrent_rwkv6_fwd(r, k, v, w, u, *, scale: float, initial_state=None, output_final_state: bool = False,
                              reverse: bool = False, cu_seqlens=None, keep: bool = False):
    """RWKV6 token by token on the TileLang kernels; the arguments and returns of
    :func:`fla_tl.kernels.rwkv6.chunk.chunk_rwkv6_fwd`, plus `reverse` (process the sequence from its end); no
    residuals."""
    o, ht, _ = rwkv6_fwd(LAUNCHERS, r, k, v, w, u, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens, keep=keep)
    return o, ht, []


def fused_recurrent_rwkv6_bwd(r, k, v, w, u, do, dht, *, scale: float, initial_state=None, reverse: bool = False,
                              cu_seqlens=None, ht=None, residuals=()):
    """(dr, dk, dv, dw, du, dh0 or None); `ht` (the forward's final state) is needed for dw when `dht` is given."""
    return rwkv6_bwd(LAUNCHERS, r, k, v, w, u, do, dht, scale=scale, initial_state=initial_state, reverse=reverse,
                     cu_seqlens=cu_seqlens, ht=ht, kept={})

