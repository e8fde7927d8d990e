"""Simple GLA kernels: a per-head constant log decay `g_gamma` (None: no decay) and/or a per-token log gate `g`.

Launcher contract (every function below; all tensors contiguous, on one CUDA device):
  q, k: [B, T, H, K]; v: [B, T, H, V]; one dtype among bf16 / fp16 / fp32; K, V <= 256.
  g_gamma: [H] float log decay, or None; it gets no gradient.
  g: [B, T, H] float per-token log gate, or None; its gradient dg comes back in g's dtype.
  initial_state: [N, H, K, V] (``[N, H, V, K]`` when ``state_v_first``), any float dtype, or None.
  cu_seqlens: int64 [N + 1] with B == 1, or None.
  *_fwd(...) -> (o [B, T, H, V] in q.dtype, final_state fp32 [N, H, K, V] or None)
  *_bwd(q, k, v, do, dht, ..., ht=None) -> (dq, dk, dv in the input dtype, dh0 in initial_state's dtype or None,
      dg or None); `ht` (the forward's final state) is needed for dg when dht is given.
Both gates are GPU-tested (H100, session 4) against the fp32 recurrence.
"""

from .chunk import chunk_simple_gla_bwd, chunk_simple_gla_fwd
from .fused_chunk import fused_chunk_simple_gla_bwd, fused_chunk_simple_gla_fwd
from .fused_recurrent import fused_recurrent_simple_gla_bwd, fused_recurrent_simple_gla_fwd

__all__ = [
    "chunk_simple_gla_fwd",
    "chunk_simple_gla_bwd",
    "fused_chunk_simple_gla_fwd",
    "fused_chunk_simple_gla_bwd",
    "fused_recurrent_simple_gla_fwd",
    "fused_recurrent_simple_gla_bwd",
]
