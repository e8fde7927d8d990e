"""The generalized delta rule (fla's `generalized_delta_rule`): diagonal plus low rank (DPLR) and identity plus low
rank (IPLR), see README.md; the public ops of `ops.py`."""

from .ops import (
    chunk_dplr_delta_rule,
    chunk_iplr_delta_rule,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_iplr_delta_rule,
)

__all__ = ["chunk_dplr_delta_rule", "chunk_iplr_delta_rule", "fused_recurrent_dplr_delta_rule",
           "fused_recurrent_iplr_delta_rule"]
