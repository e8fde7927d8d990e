"""Pure-PyTorch references: token-by-token recurrences (ground truth) and chunked forms (the `torch` backend)."""

from .abc import chunk_abc_torch, recurrent_abc
from .based import parallel_based_torch, parallel_rebased_torch, recurrent_based, recurrent_rebased
from .gla import chunk_gla_torch, recurrent_gla
from .gsa import chunk_gsa_torch, recurrent_gsa, slot_gates
from .hgrn import chunk_hgrn_torch, recurrent_hgrn
from .lightning_attn import lightning_g_gamma, recurrent_lightning_attn
from .linear_attn import normalize_with_key_sum, recurrent_linear_attn
from .rwkv6 import chunk_rwkv6_torch, recurrent_rwkv6
from .retention import chunk_retention_torch, recurrent_retention, retention_g_gamma
from .simple_gla import chunk_simple_gla_torch, parallel_simple_gla_torch, recurrent_simple_gla

__all__ = [
    "recurrent_hgrn",
    "chunk_hgrn_torch",
    "recurrent_based",
    "recurrent_rebased",
    "parallel_based_torch",
    "parallel_rebased_torch",
    "recurrent_gla",
    "chunk_gla_torch",
    "recurrent_simple_gla",
    "parallel_simple_gla_torch",
    "chunk_simple_gla_torch",
    "recurrent_retention",
    "chunk_retention_torch",
    "retention_g_gamma",
    "recurrent_linear_attn",
    "normalize_with_key_sum",
    "recurrent_lightning_attn",
    "lightning_g_gamma",
    "recurrent_rwkv6",
    "chunk_rwkv6_torch",
    "recurrent_gsa",
    "chunk_gsa_torch",
    "slot_gates",
    "recurrent_abc",
    "chunk_abc_torch",
]
