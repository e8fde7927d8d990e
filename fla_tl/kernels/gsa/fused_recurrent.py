"""fused_recurrent_gsa: the same two passes as `chunk.py`, run by chunk_gla's TileLang stages (the chunked form is
exact and faster than a token-by-token scan at training lengths); `reverse` walks each sequence from its end by
flipping the time axis (and the sequence order of a varlen batch) around the chunked passes."""

from .chunk import gsa_tl


def fused_recurrent_gsa_tl(q, k, v, s, g, *, scale: float, initial_state=None, output_final_state: bool = False,
                           reverse: bool = False, cu_seqlens=None):
    """o `[B, T, H, V]` and `[hk, hv]`; see :func:`fla_tl.kernels.gsa.chunk.gsa_tl`."""
    return gsa_tl(q, k, v, s, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  reverse=reverse, cu_seqlens=cu_seqlens)
