"""Based and ReBased: causal attention with a polynomial score, `s_ij = scale * q_i . k_j`, j <= i,
`p_ij = 1 + s + s^2 / 2` (Based) or `s^2` (ReBased), `o_i = sum_j p_ij v_j / (z_i + eps)`, `z_i = sum_j p_ij` (see
README.md).

Launcher contract (`parallel.py`, `fused_chunk.py`; q, k `[B, T, H, K]`, v `[B, T, H, V]`, contiguous, one CUDA
device, one dtype among bf16 / fp16 / fp32):
  parallel_based_fwd(q, k, v, scale=, based=) / fused_chunk_based_fwd(q, k, v, scale=)
      -> (o [B, T, H, V], z [B, T, H]), fp32 and unnormalised
  parallel_based_bwd(q, k, v, do, dz, scale=, based=) / fused_chunk_based_bwd(q, k, v, do, dz, scale=)
      -> (dq, dk, dv) in q's dtype; do in q's dtype, dz fp32
"""

from .ops import fused_chunk_based, parallel_based, parallel_rebased

__all__ = ["fused_chunk_based", "parallel_based", "parallel_rebased"]
