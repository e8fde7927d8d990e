"""The public ops: fla 0.6.0's names, arguments, defaults and returns, plus `backend=`.

Each op lives with its kernels in `fla_tl.kernels.<variant>` (public function, validation, backends and
registration); this module is the menu. `python -m fla_tl list` prints the registry.
"""

# the registry lists the ops in this order (variant by variant)
# isort: off
from .kernels.retention import chunk_retention, fused_chunk_retention, fused_recurrent_retention, parallel_retention
from .kernels.simple_gla import (
    chunk_simple_gla,
    fused_chunk_simple_gla,
    fused_recurrent_simple_gla,
    parallel_simple_gla,
)
from .kernels.linear_attn import chunk_linear_attn, fused_chunk_linear_attn, fused_recurrent_linear_attn
from .kernels.lightning_attn import chunk_lightning_attn, fused_recurrent_lightning_attn
from .kernels.gla import chunk_gla, fused_chunk_gla, fused_recurrent_gla
from .kernels.hgrn import chunk_hgrn, fused_recurrent_hgrn
from .kernels.based import fused_chunk_based, parallel_based, parallel_rebased
from .kernels.delta_rule import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_chunk_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)
from .kernels.kda import chunk_kda, fused_recurrent_kda
from .kernels.titans import chunk_titans_linear
from .kernels.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
from .kernels.dplr import (
    chunk_dplr_delta_rule,
    chunk_iplr_delta_rule,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_iplr_delta_rule,
)
from .kernels.rwkv7 import chunk_rwkv7, fused_mul_recurrent_rwkv7, fused_recurrent_rwkv7
from .kernels.gsa import chunk_abc, chunk_gsa, fused_recurrent_gsa
from .registry import BackendError, FallbackWarning, list_ops
# isort: on

__all__ = [
    "chunk_retention",
    "fused_chunk_retention",
    "fused_recurrent_retention",
    "parallel_retention",
    "chunk_simple_gla",
    "fused_chunk_simple_gla",
    "fused_recurrent_simple_gla",
    "parallel_simple_gla",
    "chunk_linear_attn",
    "fused_chunk_linear_attn",
    "fused_recurrent_linear_attn",
    "chunk_lightning_attn",
    "fused_recurrent_lightning_attn",
    "chunk_gla",
    "fused_recurrent_gla",
    "fused_chunk_gla",
    "chunk_hgrn",
    "fused_recurrent_hgrn",
    "fused_chunk_based",
    "parallel_based",
    "parallel_rebased",
    "chunk_delta_rule",
    "fused_recurrent_delta_rule",
    "fused_chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "chunk_kda",
    "fused_recurrent_kda",
    "chunk_titans_linear",
    "chunk_rwkv6",
    "fused_recurrent_rwkv6",
    "chunk_dplr_delta_rule",
    "fused_recurrent_dplr_delta_rule",
    "chunk_iplr_delta_rule",
    "fused_recurrent_iplr_delta_rule",
    "chunk_rwkv7",
    "fused_recurrent_rwkv7",
    "fused_mul_recurrent_rwkv7",
    "chunk_abc",
    "chunk_gsa",
    "fused_recurrent_gsa",
    "list_ops",
    "BackendError",
    "FallbackWarning",
]
