"""Decay parameters shared by the variants."""

import functools
import math

import torch


@functools.lru_cache(maxsize=32)
def retention_g_gamma(H: int, device: torch.device) -> torch.Tensor:
    """retention's per-head log decay, log(1 - 2^(-5-h)), fp32 `[H]`."""
    return torch.tensor([math.log(1 - 2.0 ** (-5.0 - h)) for h in range(H)], dtype=torch.float32, device=device)
