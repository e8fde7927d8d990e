"""Decay parameters shared by the variants."""

import functools
import math

import torch


@functools.lru_cache(maxsize=32)
def retention_g_gamma(H: int, device: torch.device) -> torch.Tensor:
    """retention's per-head log decay, log(1 - 2^(-5-h)), fp32 `[H]`."""
    return torch.tensor([math.log(1 - 2.0 ** (-5.0 - h)) for h in range(H)], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _no_decay(H: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(H, dtype=torch.float32, device=device)


def head_decay(g_gamma: torch.Tensor | None, H: int, device: torch.device) -> torch.Tensor:
    """the per-head log decay `[H]` as the kernels read it (fp32, contiguous); None means no decay (log decay 0, so
    every gate factor is exp2(0) = 1 exactly and the constant-decay kernels compute plain linear attention)."""
    if g_gamma is None:
        return _no_decay(H, device)
    return g_gamma.to(torch.float32).contiguous()
