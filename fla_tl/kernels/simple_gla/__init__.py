"""Simple GLA: a per-head constant log decay `g_gamma` and/or a per-token log gate `g` (see README.md).

Launcher contract (`chunk.py`, `fused_chunk.py`, `fused_recurrent.py`; all tensors contiguous, on one CUDA device):
  q, k: [B, T, H, K]; v: [B, T, H, V]; one dtype among bf16 / fp16 / fp32; K, V <= 256.
  g_gamma: [H] float log decay, or None; it gets no gradient.
  g: [B, T, H] float per-token log gate, or None; its gradient dg comes back in g's dtype.
  initial_state: [N, H, K, V] (``[N, H, V, K]`` when ``state_v_first``), any float dtype, or None.
  cu_seqlens: int64 [N + 1] with B == 1, or None.
  *_fwd(...) -> (o [B, T, H, V] in q.dtype, final_state fp32 [N, H, K, V] or None)
  *_bwd(q, k, v, do, dht, ..., ht=None) -> (dq, dk, dv in the input dtype, dh0 in initial_state's dtype or None,
      dg or None); `ht` (the forward's final state) is needed for dg when dht is given.
"""

from .ops import chunk_simple_gla, fused_chunk_simple_gla, fused_recurrent_simple_gla, parallel_simple_gla

__all__ = ["chunk_simple_gla", "fused_chunk_simple_gla", "fused_recurrent_simple_gla", "parallel_simple_gla"]
