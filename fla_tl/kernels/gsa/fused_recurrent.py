"""fused_recurrent_gsa: the same two passes as `chunk.py`, run by chunk_gla's TileLang stages (the chunked form is
exact and faster than a token-by-token scan at training lengths); `reverse` walks each sequence from its end by
flipping the time axis (and the sequence order of a varlen batch) around the chunked passes: `gsa_fwd` / `gsa_bwd`
of `chunk.py` with `reverse`."""

from .chunk import gsa_bwd, gsa_fwd

__all__ = ["gsa_bwd", "gsa_fwd"]
