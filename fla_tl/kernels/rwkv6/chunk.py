"""chunk_rwkv6 on GLA's chunk kernels (`kernels/gla/chunk.py`: the per-key gate cumsum, the state passes of
`common.chunk_h` with gate "gk", GLA's intra-chunk output and dq / dk kernels, the chunk-local per-key dg), with the
queries shifted one token. Forward: GLA's output kernel in its `bonus` form reads the queries one token later and
adds the bonus itself. Backward: GLA's on shifted copies, the bonus terms around it (`bonus.py`)."""

from ..gla.chunk import chunk_gla_bwd, chunk_gla_fwd
from .bonus import bonus_scores, rwkv6_bwd, rwkv6_fwd


def _no_extra(reverse):
    return {}


def _gla_bonus_fwd(r, k, v, w, u, *, scale, initial_state, output_final_state, reverse, cu_seqlens, first, last,
                   keep):
    """(o `[B * T, H, V]` without the first tokens' h0 read, ht, what the backward reuses): GLA's forward in the bonus
    form, keeping (with `keep`) its cumulative gates and intra-chunk scores (those of the shifted queries, as GLA's
    backward on the shifted copy needs them); a sequence's first token (which reads only h0 and the bonus) is filled
    here."""
    assert not reverse, "chunk_rwkv6 runs forward in time"
    B, T, H, K = r.shape
    kept = {} if keep else None
    o, ht = chunk_gla_fwd(r, k, v, g_gamma=None, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, g=w, u=u, keep=kept)
    o = o.view(B * T, H, -1)
    r_, k_, v_ = r.view(B * T, H, K)[first], k.view(B * T, H, K)[first], v.view(B * T, H, -1)[first]
    o[first] = (bonus_scores(r_, k_, u, scale)[..., None] * v_.float()).to(o.dtype)
    return o, ht, kept or {}


LAUNCHERS = (_gla_bonus_fwd, chunk_gla_bwd, _no_extra)


def chunk_rwkv6_fwd(r, k, v, w, u, *, scale: float, initial_state=None, output_final_state: bool = False,
                    cu_seqlens=None, keep: bool = False):
    r"""
    RWKV6 in chunks of 64 tokens on the TileLang kernels.

    Args:
        r, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]` (bf16 / fp16 / fp32, K, V <= 256).
        w (torch.Tensor): per-key log decays `[B, T, H, K]` (bf16 / fp16 / fp32). u (torch.Tensor): bonus `[H, K]`.
        scale (float): the output scale.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`.
        output_final_state (bool): return the final state (fp32).
        cu_seqlens (Optional[torch.Tensor]): `[N + 1]` int64 offsets with `B == 1`.
        keep (bool): keep the backward's residuals (a backward will follow).

    Returns:
        o `[B, T, H, V]` in v's dtype, the final state `[N, H, K, V]` fp32 or None, and the residuals: with `keep`,
        the cumulative log2 gates `gc` `[B * T, H, K]` fp32 and the intra-chunk scores `A` `[B * T, H, 64]` fp32,
        else none.
    """
    o, ht, kept = rwkv6_fwd(LAUNCHERS, r, k, v, w, u, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, reverse=False, cu_seqlens=cu_seqlens, keep=keep)
    return o, ht, ([kept["gc"], kept["A"]] if keep else [])


def chunk_rwkv6_bwd(r, k, v, w, u, do, dht, *, scale: float, initial_state=None, cu_seqlens=None, ht=None,
                    residuals=()):
    """(dr, dk, dv, dw, du, dh0 or None) from the output gradients (`do` None: zero; `dht` None: none) and the
    forward's `residuals` (`chunk_rwkv6_fwd` with `keep`; without them GLA's backward recomputes gc and A)."""
    kept = dict(zip(("gc", "A"), residuals))
    return rwkv6_bwd(LAUNCHERS, r, k, v, w, u, do, dht, scale=scale, initial_state=initial_state, reverse=False,
                     cu_seqlens=cu_seqlens, ht=ht, kept=kept)

