"""chunk_rwkv6 on GLA's chunk kernels (`kernels/gla/chunk.py`: the per-key gate cumsum, the state passes of
`common.chunk_h` with gate "gk", GLA's intra-chunk output and dq / dk kernels, the chunk-local per-key dg), with the
queries shifted one token. Forward: GLA's output kernel in its `bonus` form reads the queries one token later and
adds the bonus itself. Backward: GLA's on shifted copies, the bonus terms around it (`bonus.py`)."""

import torch

from ..gla.chunk import chunk_gla_bwd, chunk_gla_fwd
from .bonus import RWKV6Function, bonus_scores


def _no_extra(reverse):
    return {}


def chunk_rwkv6_fwd(r, k, v, w, u, *, scale, initial_state, output_final_state, reverse, cu_seqlens, first, last):
    """(o `[B * T, H, V]` without the first tokens' h0 read, ht, what the backward reuses): GLA's forward in the bonus
    form, keeping its cumulative gates and intra-chunk scores (those of the shifted queries, as GLA's backward on the
    shifted copy needs them); a sequence's first token (which reads only h0 and the bonus) is filled here."""
    assert not reverse, "chunk_rwkv6 runs forward in time"
    B, T, H, K = r.shape
    keep = {}
    o, ht = chunk_gla_fwd(r, k, v, g_gamma=None, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, g=w, u=u, keep=keep)
    o = o.view(B * T, H, -1)
    r_, k_, v_ = r.view(B * T, H, K)[first], k.view(B * T, H, K)[first], v.view(B * T, H, -1)[first]
    o[first] = (bonus_scores(r_, k_, u, scale)[..., None] * v_.float()).to(o.dtype)
    return o, ht, keep


LAUNCHERS = (chunk_rwkv6_fwd, chunk_gla_bwd, _no_extra)


def chunk_rwkv6_tl(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    RWKV6 in chunks of 64 tokens on the TileLang kernels, differentiable in r, k, v, w, u and initial_state.

    Args:
        r, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]` (bf16 / fp16 / fp32, K, V <= 256).
        w (torch.Tensor): per-key log decays `[B, T, H, K]`. u (torch.Tensor): bonus `[H, K]`.
        scale (float): the output scale.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. Default: None.
        output_final_state (bool): return the final state (fp32). Default: False.
        cu_seqlens (Optional[torch.Tensor]): `[N + 1]` int64 offsets with `B == 1`. Default: None.

    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state `[N, H, K, V]` fp32 or None.

    Examples::
        >>> r, k, v = (torch.randn(2, 500, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> w = torch.nn.functional.logsigmoid(torch.randn(2, 500, 4, 64, device="cuda"))
        >>> o, ht = chunk_rwkv6_tl(r, k, v, w, torch.randn(4, 64, device="cuda"), scale=0.125,
        ...                        output_final_state=True)
    """
    return RWKV6Function.apply(r, k, v, w, u, scale, initial_state, output_final_state, False, cu_seqlens, LAUNCHERS)
