"""GSA (gated slot attention) and ABC on chunk_gla's TileLang stages: `chunk.py` composes the two gated passes
(keys to slots with the gate on the slot side of the state, slots to values as GLA) with the softmax between;
`fused_recurrent.py` is the same composition with `reverse`; `normaliser.py` derives ABC's slot gates."""

from .ops import chunk_abc, chunk_gsa, fused_recurrent_gsa

__all__ = ["chunk_abc", "chunk_gsa", "fused_recurrent_gsa"]
