"""fused_recurrent_rwkv6 on GLA's token-by-token kernels (`kernels/gla/fused_recurrent.py`: `common.fused_recurrent`
with gate "gk", the per-key dg scan), with the queries shifted one token in processing order and the bonus added
around them (`bonus.py`); `reverse` runs the recurrence from the last token."""

import torch

from ..gla.fused_recurrent import fused_recurrent_gla_bwd, fused_recurrent_gla_fwd
from .bonus import RWKV6Function, shifted_fwd


def _extra(reverse):
    return {"reverse": reverse, "state_v_first": False}


LAUNCHERS = (shifted_fwd(fused_recurrent_gla_fwd, _extra), fused_recurrent_gla_bwd, _extra)


def fused_recurrent_rwkv6_tl(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    RWKV6 token by token on the TileLang kernels; the arguments and returns of
    :func:`fla_tl.kernels.rwkv6.chunk_rwkv6_tl`, plus `reverse` (process the sequence from its end).

    Examples::
        >>> r, k, v = (torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> w = torch.nn.functional.logsigmoid(torch.randn(1, 300, 4, 64, device="cuda"))
        >>> cu = torch.tensor([0, 100, 300], device="cuda")
        >>> o, ht = fused_recurrent_rwkv6_tl(r, k, v, w, torch.randn(4, 64, device="cuda"), scale=0.125,
        ...                                  reverse=True, cu_seqlens=cu, output_final_state=True)
    """
    return RWKV6Function.apply(r, k, v, w, u, scale, initial_state, output_final_state, reverse, cu_seqlens,
                               LAUNCHERS)
