"""HGRN kernels (elementwise gated recurrence). They build for sm_90a and have not run on a GPU yet; the registry
keeps `chunk_hgrn` / `fused_recurrent_hgrn` on the torch backend until tests/test_hgrn.py's gpu tests pass.

Launcher contract: x, g `[B, T, D]` contiguous on one CUDA device (x bf16 / fp16 / fp32, g any float dtype);
initial_state `[N, D]` or None; cu_seqlens int64 `[N + 1]` with B == 1, or None.
  fused_recurrent_hgrn_fwd(x, g, ...) -> (o [B, T, D] in x's dtype, final_state fp32 [N, D] or None)
  fused_recurrent_hgrn_bwd(x, g, o, do, dht, ...) -> (dx, dg, dh0 or None)
"""

from .fused_recurrent import fused_recurrent_hgrn_bwd, fused_recurrent_hgrn_fwd

__all__ = ["fused_recurrent_hgrn_fwd", "fused_recurrent_hgrn_bwd"]
