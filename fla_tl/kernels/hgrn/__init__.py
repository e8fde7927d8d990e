"""HGRN: the elementwise gated recurrence `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t` (see README.md).

Launcher contract (`fused_recurrent.py`): x, g `[B, T, D]` contiguous on one CUDA device (x bf16 / fp16 / fp32, g any
float dtype); initial_state `[N, D]` or None; cu_seqlens int64 `[N + 1]` with B == 1, or None.
  fused_recurrent_hgrn_fwd(x, g, ...) -> (o [B, T, D] in x's dtype, final_state fp32 [N, D] or None)
  fused_recurrent_hgrn_bwd(x, g, o, do, dht, ...) -> (dx, dg, dh0 or None)
"""

from .ops import chunk_hgrn, fused_recurrent_hgrn

__all__ = ["chunk_hgrn", "fused_recurrent_hgrn"]
