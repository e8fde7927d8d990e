"""GSA (gated slot attention) and ABC on chunk_gla's TileLang stages: `chunk.py` composes the two gated passes
(keys to slots with the gate on the slot side of the state, slots to values as GLA) with the softmax between;
`fused_recurrent.py` is the same composition with `reverse`."""

from .chunk import ChunkGSAFunction, chunk_gsa_bwd, chunk_gsa_fwd, gsa_tl
from .fused_recurrent import fused_recurrent_gsa_tl

__all__ = ["ChunkGSAFunction", "chunk_gsa_bwd", "chunk_gsa_fwd", "fused_recurrent_gsa_tl", "gsa_tl"]
