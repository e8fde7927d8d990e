"""Titans with a linear memory (fla's `chunk_titans_linear`), see README.md.

Launcher contract (`chunk.py`; q, k, v `[B, T, H, D]` of one dtype among bf16 / fp16 / fp32 on one CUDA device, D a
multiple of 16 up to 128, chunk_size 16, 32 or 64):
  chunk_titans_linear_fwd(q, k, v, w, b, theta, alpha, eta, initial_state, eps=, chunk_size=, output_final_state=,
      requires_grad=) -> (o in q's dtype, final memory fp32 [B, H, D, D] or None, then the stored states (hm, hs)
      when the TileLang backward will run)
  chunk_titans_linear_bwd(..., initial_state, do, dht, states, eps=, chunk_size=) -> the nine inputs' gradients
"""

from .ops import chunk_titans_linear

__all__ = ["chunk_titans_linear"]
