"""HGRN kernels (elementwise gated recurrence `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t`): a token-by-token scan
per channel in fp32, forward and backward. `chunk_hgrn` and `fused_recurrent_hgrn` both run these scans: the recurrence
is elementwise, so a chunked form saves no work over one read of x, g and one write of o.

Launcher contract: x, g `[B, T, D]` contiguous on one CUDA device (x bf16 / fp16 / fp32, g any float dtype);
initial_state `[N, D]` or None; cu_seqlens int64 `[N + 1]` with B == 1, or None.
  fused_recurrent_hgrn_fwd(x, g, ...) -> (o [B, T, D] in x's dtype, final_state fp32 [N, D] or None)
  fused_recurrent_hgrn_bwd(x, g, o, do, dht, ...) -> (dx, dg, dh0 or None)
`hgrn(x, g, initial_state, output_final_state, cu_seqlens)` is the differentiable op over both.
"""

import torch

from .fused_recurrent import fused_recurrent_hgrn_bwd, fused_recurrent_hgrn_fwd

__all__ = ["fused_recurrent_hgrn_fwd", "fused_recurrent_hgrn_bwd", "hgrn"]


class _HGRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, initial_state, output_final_state, cu_seqlens):
        x, g = x.contiguous(), g.contiguous()
        h0 = initial_state.contiguous() if initial_state is not None else None
        o, ht = fused_recurrent_hgrn_fwd(x, g, initial_state=h0, output_final_state=output_final_state,
                                         cu_seqlens=cu_seqlens)
        ctx.save_for_backward(x, g, o, h0, cu_seqlens)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        x, g, o, h0, cu_seqlens = ctx.saved_tensors
        dx, dg, dh0 = fused_recurrent_hgrn_bwd(x, g, o, do.contiguous(), dht.contiguous() if dht is not None else None,
                                               initial_state=h0, cu_seqlens=cu_seqlens)
        return dx, dg, dh0, None, None


def hgrn(x, g, initial_state=None, output_final_state: bool = False, cu_seqlens=None):
    """(o `[B, T, D]` in x's dtype, final state `[N, D]` fp32 or None), differentiable in x, g and initial_state."""
    return _HGRN.apply(x, g, initial_state, output_final_state, cu_seqlens)
