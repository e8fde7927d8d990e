"""Chunk ranges: long sequences on few heads split into chunk-aligned ranges whose state passes run in parallel.

A state pass walks one sequence per block, so a grid of sequences x heads x V tiles far below the multiprocessor
count leaves most of the GPU idle (2 sequences x 16 heads: 64 blocks on 132 SMs). With ranges of L chunks, the
state leaving range r is an affine map of the state entering it,
  S_end[r] = M[r] S_start[r] + S_loc[r],
where S_loc is the range's state from a zero start and M its transition (K x K; a scalar or diagonal decay for the
gated linear-attention families). A summary pass computes (S_loc, M) of every range in parallel, `combine_states`
stitches the ranges of each sequence in fp32 (S_start[r + 1] = M[r] S_start[r] + S_loc[r]), and the ordinary state
pass then runs over the ranges as if they were sequences, from those starting states. The backward goes the same way
with the transposes: dS_end[r - 1] = M[r]^T dS_end[r] + dS_loc[r], dS_loc from a zero terminal gradient.

Ranges are chunk-aligned and keep the chunk numbering of the sequence they cut, so the per-chunk tensors (states,
gates, the WY inverse) have the same layout with or without ranges; only the per-range initial states differ.

Opt-in (`FLA_TL_RANGE_CHUNKS`, `pick_ranges`): the summary pass walks every range once more, so the wider grid pays
only where the single pass is far from filling the GPU; the automatic rule (`range_length`) is not yet tuned.
"""

import functools
import os

import tilelang.language as T
import torch

from ...autotune.configs import BT
from ...autotune.resolve import tile_config
from .utils import SeqMeta, cdiv, get_kernel, pad_dim, sm_count, target_for


class RangeMeta:
    """ranges of the sequences of a `SeqMeta`: `meta` the ranges as sequences (cu, chunk offsets, chunk indices),
    `first` `[N + 1]` int32 the first range of every sequence (ranges of sequence n are first[n] .. first[n + 1] - 1),
    `L` the range length in chunks."""

    __slots__ = ("meta", "first", "last", "L")

    def __init__(self, meta: SeqMeta, first: torch.Tensor, L: int):
        self.meta = meta
        self.first = first
        self.last = (first[1:] - 1).long()
        self.L = L


def _build(bos: list, eos: list, chunk0: list, BT: int, L: int, device) -> RangeMeta:
    """the ranges of sequences with token bounds bos[n]..eos[n] and first chunk chunk0[n] (host lists)."""
    cu, offsets, first, seqs = [], [], [0], []
    for n, (b, e, c0) in enumerate(zip(bos, eos, chunk0)):
        nc = cdiv(e - b, BT)
        nr = max(1, cdiv(nc, L))
        for r in range(nr):
            cu.append(min(b + r * L * BT, e))
            offsets.append(c0 + min(r * L, nc))
            seqs.append((n, r))
        first.append(first[-1] + nr)
    NT = chunk0[-1] + cdiv(eos[-1] - bos[-1], BT) if bos else 0
    cu.append(eos[-1] if eos else 0)
    offsets.append(NT)
    rows = []
    for i in range(len(cu) - 1):
        rows += [(i, c) for c in range(offsets[i + 1] - offsets[i])]
    t = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    indices = t(rows).view(-1, 2) if rows else torch.zeros(0, 2, dtype=torch.int32, device=device)
    meta = SeqMeta(t(cu), t(offsets), indices, len(cu) - 1, NT)
    return RangeMeta(meta, t(first), L)


@functools.lru_cache(maxsize=32)
def _dense_ranges(B: int, T_: int, BT: int, L: int, device: torch.device) -> RangeMeta:
    nc = cdiv(T_, BT)
    return _build([b * T_ for b in range(B)], [(b + 1) * T_ for b in range(B)], [b * nc for b in range(B)], BT, L,
                  device)


def range_meta(meta: SeqMeta, L: int, BT: int, dense: tuple | None = None) -> RangeMeta:
    """ranges of L chunks over `meta`'s sequences (the last range of each keeps the remainder); `dense` (B, T) for a
    dense batch, else from the bounds a varlen `SeqMeta` read back with its chunk count (no further sync); cached
    with the batch's metadata."""
    if dense is not None:
        return _dense_ranges(dense[0], dense[1], BT, L, meta.cu.device)
    if L not in meta.ranges:
        cu, offsets = meta.host
        meta.ranges[L] = _build(cu[:-1], cu[1:], offsets[:-1], BT, L, meta.cu.device)
    return meta.ranges[L]


def longest(meta: SeqMeta, BT: int, dense: tuple | None = None) -> int:
    """the chunk count of the longest sequence (no host sync: a dense batch's T, a varlen batch's kept bounds)."""
    if dense is not None:
        return cdiv(dense[1], BT)
    offsets = meta.host[1]
    return max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)


def range_length(nc_max: int, blocks: int, sms: int, min_chunks: int = 16, fill: float = 0.75,
                 waves: float = 2.0) -> int | None:
    """the range length in chunks for a state pass of `blocks` (sequences x heads x V tiles of 64) over sequences of
    at most `nc_max` chunks, or None to run without ranges: ranges are used while the grid covers less than `fill` of
    the multiprocessors, and cut the longest sequence so that the grid holds about `waves` blocks per multiprocessor,
    never below `min_chunks` chunks per range (each range adds a summary pass and a combine step)."""
    if blocks >= fill * sms:
        return None
    splits = min(cdiv(int(waves * sms), blocks), nc_max // min_chunks)
    if splits < 2:
        return None
    return cdiv(nc_max, splits)


def combine_states_kernel(
    K: int,
    V: int,
    reverse: bool,
    diagonal: bool = False,
    # kernel config
    BV: int = 32,
    BK: int = 32,
    threads: int = 128,
):
    """per (V tile, sequence, head), in fp32 on CUDA cores: the state entering every range of the sequence,
      forward: S[first] = S0,  S[r + 1] = M[r] S[r] + S_loc[r];
      reverse (gradients, last range first): S[last] = S0,  S[r - 1] = M[r]^T S[r] + S_loc[r],
    with M in the columns V: of the ranges' summaries `ms` `[R, H, K, V + K]` (`diagonal`: M = diag(ms) from `ms`
    `[R, H, K]`), S_loc in the columns :V of `loc` (the summaries themselves, or the ranges' own states or
    gradients `[R, H, K, V]`), and the sequences' initial states (or terminal gradients) `s0` `[N, H, K, V]`; `out`
    `[R, H, K, V]` the state each range starts from (forward) or the gradient it ends with (reverse)."""
    KP = pad_dim(K, BK)
    NV = cdiv(V, BV)
    R, H, N, NH0, W = T.dynamic("R"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("W")
    mshape = [R, H, K] if diagonal else [R, H, K, V + K]

    @T.prim_func
    def combine_states(
        ms: T.Tensor(mshape, "float32"),
        loc: T.Tensor([R, H, K, W], "float32"),
        s0: T.Tensor([NH0, K, V], "float32"),
        first: T.Tensor([N + 1], "int32"),
        out: T.Tensor([R, H, K, V], "float32"),
        use_s0: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            r0 = first[i_n]
            nr = first[i_n + 1] - r0
            s_s = T.alloc_shared([KP, BV], "float32")
            b_s = T.alloc_fragment([KP, BV], "float32")
            if not diagonal:
                m_s = T.alloc_shared([KP, BK], "float32")

            for i, j in T.Parallel(KP, BV):
                s_s[i, j] = T.if_then_else(
                    use_s0 == 1 and i < K and i_v * BV + j < V, s0[i_nh % NH0, i, i_v * BV + j], 0)
            for j in T.serial(nr):
                r = r0 + nr - 1 - j if reverse else r0 + j
                for i, jj in T.Parallel(KP, BV):
                    if i < K and i_v * BV + jj < V:
                        out[r, i_h, i, i_v * BV + jj] = s_s[i, jj]
                if j < nr - 1:
                    if diagonal:
                        for i, jj in T.Parallel(KP, BV):
                            b_s[i, jj] = T.if_then_else(
                                i < K and i_v * BV + jj < V,
                                loc[r, i_h, i, i_v * BV + jj] + ms[r, i_h, i] * s_s[i, jj], 0)
                    else:
                        for i, jj in T.Parallel(KP, BV):
                            b_s[i, jj] = T.if_then_else(
                                i < K and i_v * BV + jj < V, loc[r, i_h, i, i_v * BV + jj], 0)
                        for kt in T.serial(KP // BK):
                            # the key columns kt*BK.. of M (forward) or of M^T (reverse: rows of M)
                            for i, kk in T.Parallel(KP, BK):
                                if reverse:
                                    m_s[i, kk] = T.if_then_else(i < K and kt * BK + kk < K,
                                                                ms[r, i_h, kt * BK + kk, V + i], 0)
                                else:
                                    m_s[i, kk] = T.if_then_else(i < K and kt * BK + kk < K,
                                                                ms[r, i_h, i, V + kt * BK + kk], 0)
                            for kk in T.serial(BK):
                                for i, jj in T.Parallel(KP, BV):
                                    b_s[i, jj] += m_s[i, kk] * s_s[kt * BK + kk, jj]
                    T.copy(b_s, s_s)

    return combine_states


def combine_states(ms: torch.Tensor, s0: torch.Tensor | None, ranges: RangeMeta, loc: torch.Tensor | None = None,
                   reverse: bool = False, **config) -> torch.Tensor:
    """the state entering (forward) or the gradient leaving (reverse) every range, fp32 `[R, H, K, V]`: see
    `combine_states_kernel`. `ms` the ranges' summaries `[R, H, K, V + K]` fp32 (a delta-rule transition, with the
    ranges' own states in its first V columns unless `loc` is given), or the diagonal of a decay `[R, H, K]` (then
    `loc` `[R, H, K, V]` is required); `s0` `[N, H, K, V]` or None (zero). `config` overrides the tile config (kernel
    "combine_states")."""
    diagonal = ms.dim() == 3
    R, H, K = ms.shape[:3]
    V = loc.shape[-1] if diagonal else ms.shape[-1] - K
    out = ms.new_empty(R, H, K, V)
    loc = ms if loc is None else loc.reshape(R, H, K, V).float().contiguous()
    N = ranges.first.numel() - 1
    s0_ = s0.reshape(N * H, K, V).float().contiguous() if s0 is not None else ms.new_empty(1, K, V)
    # the config is keyed by the tokens the ranges span (at most R ranges of L chunks): an empty stand-in of that length
    tokens = ms.new_empty(R * ranges.L * BT, H, 0)
    config = tile_config("combine_states", tokens, K=K, V=V, gate="none", N=N, overrides=config)
    kernel = get_kernel(combine_states_kernel, target_for(ms.device), K=K, V=V, reverse=reverse, diagonal=diagonal,
                        **config)
    kernel(ms.contiguous(), loc, s0_, ranges.first, out, int(s0 is not None))
    return out


def range_decays(ranges: RangeMeta, gate: str, g_gamma: torch.Tensor, gc: torch.Tensor | None, K: int,
                 BT: int) -> torch.Tensor:
    """the decay of the state over every range, fp32 `[R, H, K]` (the diagonal of its transition): 2^(the sum of
    the range's log2 gates) from the chunk-local cumulative log2 gates `gc` (`[Ttot, H]` gate "g", `[Ttot, H, K]`
    gate "gk": each chunk's last row is its total), exp(tokens x g_gamma) for gate "gamma", one for "none"."""
    meta = ranges.meta
    H = g_gamma.numel()
    if gate in ("g", "gk"):
        last = gc[meta.chunk_rows(BT)[:, -1]].double()  # [NT, H(, K)] each chunk's total
        cs = torch.cat([last.new_zeros(1, *last.shape[1:]), last.cumsum(0)])
        off = meta.chunk_offsets.long()
        tot = (cs[off[1:]] - cs[off[:-1]]).float()
        d = torch.exp2(tot)
        return (d[..., None] if gate == "g" else d).expand(meta.N, H, K).contiguous()
    if gate == "gamma":
        n = (meta.cu[1:] - meta.cu[:-1]).float()
        return torch.exp(n[:, None] * g_gamma.float()[None, :])[..., None].expand(meta.N, H, K).contiguous()
    return g_gamma.new_ones(meta.N, H, K, dtype=torch.float32)


def pick_ranges(meta: SeqMeta, blocks: int, like: torch.Tensor, BT: int, dense: tuple | None) -> RangeMeta | None:
    """the chunk ranges a state pass of `blocks` blocks (sequences x heads x V tiles) runs over, or None, as
    `FLA_TL_RANGE_CHUNKS` asks: unset or 0 never (the default: on an H100 at 2 x 16384 tokens x 16 heads the
    summary pass cost what the wider grid saved), `auto` by `range_length`, a number L ranges of L chunks."""
    asked = os.environ.get("FLA_TL_RANGE_CHUNKS", "").strip().lower()
    if meta.NT == 0 or asked in ("", "0") or (asked == "auto" and like.device.type != "cuda"):
        return None
    nc_max = longest(meta, BT, dense)
    L = (range_length(nc_max, blocks, sm_count(like.device)) or 0) if asked == "auto" else int(asked)
    if L <= 0 or nc_max <= L:
        return None
    return range_meta(meta, L, BT, dense)


def state_pass_ranges(q, v, meta: SeqMeta, cu_seqlens, BT: int) -> RangeMeta | None:
    """the chunk ranges (`pick_ranges`) a chunk op's state passes run over for `q` `[B, T, H, K]` and `v`, or None:
    decided from the grid of sequences x heads x V tiles of 64, forward and backward alike."""
    B, T, H = q.shape[:3]
    return pick_ranges(meta, meta.N * H * cdiv(v.shape[-1], 64), q, BT, (B, T) if cu_seqlens is None else None)


def chunk_h_range_starts(k, v, initial_state, ranges, *, gate: str, g_gamma, gc, meta: SeqMeta, BT: int = 64,
                         **config):
    """over chunk ranges (`common.ranges`): (the state entering every range `[R, H, K, V]` fp32, the ranges' decays
    `[R, H, K]`): each range's state from zero by the forward pass over the ranges, then the combine; `meta` the
    sequences' layout (unused: the ranges carry their own)."""
    from .chunk_h import chunk_fwd_h

    _, loc = chunk_fwd_h(k, v, gate=gate, g_gamma=g_gamma, gc=gc, initial_state=None, output_final_state=True,
                         meta=ranges.meta, BT=BT, **config)
    decays = range_decays(ranges, gate, g_gamma, gc, k.shape[-1], BT)
    return combine_states(decays, initial_state, ranges, loc=loc), decays


def chunk_dh_range_ends(q, do, dht, decays, ranges, *, gate: str, g_gamma, gc, scale: float, meta: SeqMeta,
                        BT: int = 64, **config):
    """over chunk ranges: the gradient of the state leaving every range `[R, H, K, V]` fp32, from each range's
    gradient with a zero terminal gradient (the backward pass over the ranges) and the reverse combine with the
    ranges' decays (`chunk_h_range_starts`)."""
    from .chunk_h import chunk_bwd_dh

    _, dloc = chunk_bwd_dh(q, do, None, gate=gate, g_gamma=g_gamma, gc=gc, scale=scale, need_dh0=True,
                           meta=ranges.meta, BT=BT, **config)
    return combine_states(decays, dht, ranges, loc=dloc, reverse=True)
