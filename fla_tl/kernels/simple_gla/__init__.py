"""Simple GLA kernels with a per-head constant log decay `g_gamma` (None: no decay).

Launcher contract (every function below; all tensors contiguous, on one CUDA device):
  q, k: [B, T, H, K]; v: [B, T, H, V]; one dtype among bf16 / fp16 / fp32; K, V <= 256.
  g_gamma: [H] float log decay, or None; it gets no gradient.
  initial_state: [N, H, K, V] (``[N, H, V, K]`` when ``state_v_first``), any float dtype, or None.
  cu_seqlens: int64 [N + 1] with B == 1, or None.
  *_fwd(...) -> (o [B, T, H, V] in q.dtype, final_state fp32 [N, H, K, V] or None)
  *_bwd(q, k, v, do, dht, ...) -> (dq, dk, dv in the input dtype, dh0 in initial_state's dtype or None)
The per-token gate `g` of fla's simple GLA has no TileLang kernel yet (the registry routes it to the torch backend).
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
