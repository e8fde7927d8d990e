"""Based and ReBased kernels: causal attention with a polynomial score, `s_ij = scale * q_i . k_j`, j <= i,
`p_ij = 1 + s + s^2 / 2` (Based) or `s^2` (ReBased), `o_i = sum_j p_ij v_j`, `z_i = sum_j p_ij`.

- `parallel.py`: the attention form in TileLang, forward and backward, for K <= 128 and V <= 256
  (`parallel_based` / `parallel_rebased`); `parallel_based_attention(q, k, v, scale, based) -> (o, z)`, fp32 and
  unnormalised, differentiable.
- `fused_chunk.py`: Based chunk by chunk for K <= 16 (`fused_chunk_based`), the Taylor features formed on the fly
  and carried across chunks as linear-attention states; `fused_chunk_based_attention(q, k, v, scale) -> (o, z)`.
The normalisation `o / (z + eps)` is PyTorch around either.
"""

from .fused_chunk import MAX_K, feature_tables, fused_chunk_based_attention
from .parallel import parallel_based_attention, parallel_based_bwd, parallel_based_fwd

__all__ = [
    "MAX_K",
    "feature_tables",
    "fused_chunk_based_attention",
    "parallel_based_attention",
    "parallel_based_bwd",
    "parallel_based_fwd",
]
