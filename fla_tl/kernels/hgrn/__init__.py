"""HGRN kernels (elementwise gated recurrence `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t`): a token-by-token scan
per channel in fp32, forward and backward. `chunk_hgrn` and `fused_recurrent_hgrn` both run these scans: the recurrence
is elementwise, so a chunked form saves no work over one read of x, g and one write of o.

Launcher contract: x, g `[B, T, D]` contiguous on one CUDA device (x bf16 / fp16 / fp32, g any float dtype);
initial_state `[N, D]` or None; cu_seqlens int64 `[N + 1]` with B == 1, or None.
  fused_recurrent_hgrn_fwd(x, g, ...) -> (o [B, T, D] in x's dtype, final_state fp32 [N, D] or None)
  fused_recurrent_hgrn_bwd(x, g, o, do, dht, ...) -> (dx, dg, dh0 or None)
`hgrn(x, g, initial_state, output_final_state, cu_seqlens)` is the differentiable op over both.
"""

from .fused_recurrent import fused_recurrent_hgrn_bwd, fused_recurrent_hgrn_fwd, hgrn

__all__ = ["fused_recurrent_hgrn_fwd", "fused_recurrent_hgrn_bwd", "hgrn"]
