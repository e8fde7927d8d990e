"""Titans with a linear memory (fla's `chunk_titans_linear`): the chunked TileLang forward and backward kernels and
the differentiable `chunk_titans_linear_tl` over them."""

from .chunk import (
    chunk_titans_linear_tl,
    titans_bwd,
    titans_bwd_chunk_kernel,
    titans_chunk_coefs,
    titans_fwd,
    titans_fwd_chunk_kernel,
)

__all__ = [
    "chunk_titans_linear_tl",
    "titans_bwd",
    "titans_bwd_chunk_kernel",
    "titans_chunk_coefs",
    "titans_fwd",
    "titans_fwd_chunk_kernel",
]
