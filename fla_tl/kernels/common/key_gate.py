"""Intra-chunk scores under a per-key (diagonal) log gate, shared by GLA's output and gradients and KDA's WY stages.

With G_i[k] the chunk-local cumulative log2 gate of row i (rows past the sequence end repeat the last valid row), the
scores of a chunk are
  A_ij = sum_k a_i[k] b_j[k] 2^(G_i[k] - G_j[k]),  j <= i,
(GLA: a = q, b = k; KDA's WY matrix: a = b = k). The factor 2^(G_i - G_j) splits into a row factor times a column
factor, 2^(G_i - G_m) 2^(G_m - G_j) with m the middle row, as long as the chunk's decay span
max_k (G_0[k] - G_last[k]) keeps both in range (`span_limit_for`): then A is one matmul per key tile (the common case:
logsigmoid gates decay a few dozen log2 units per chunk). Strong gates would overflow there, and a key tile whose span
exceeds the limit builds A from BC-token sub-chunks (as fla):
- off-diagonal blocks (row sub-chunk r > column sub-chunk s): one matmul per row sub-chunk r, both sides referenced at
  its first row n = r BC: (a_i 2^(G_i - G_n)) . (b_j 2^(G_n - G_j)), each exponent <= 0;
- diagonal blocks: elementwise over the key channels, 2^(G_i - G_j) with j <= i, reduced over the tile.
The gradients mirror it with the same choice per key tile (`key_gated_grads`).
"""

import tilelang.language as T

# the sub-chunk of the per-key scores' strong-gate form: it bounds the gates' span inside a block (numerics, not a tile
# knob)
SUB_CHUNK = 16


def span_limit_for(dtype: str) -> float:
    """the largest log2 decay over a chunk (per key tile) for which the one-matmul form is used: its operands
    carry factors up to 2^(span) either way from the middle row, so they must stay in the dtype's normal range (with
    room for the sums of the backward); beyond it the sub-chunk form runs."""
    return 12.0 if dtype == "float16" else 100.0


def gated_row(x, gc, t0, i, i_h, j, nvalid, K, dtype, to_last: bool = False):
    """x[t0 + i, i_h, j] 2^(G_i[j]) (`to_last`: 2^(G_last[j] - G_i[j])) in `dtype`, zero outside the sequence and the
    head dim: a gated key or query tile entry formed as it loads (`gc` `[Ttot, H, K]` the cumulative log2 gates)."""
    log2 = gc[t0 + nvalid - 1, i_h, j] - gc[t0 + i, i_h, j] if to_last else gc[t0 + i, i_h, j]
    value = T.Cast(dtype, T.Cast("float32", x[t0 + i, i_h, j]) * T.exp2(log2))
    return T.if_then_else(T.And(i < nvalid, j < K), value, 0)


def chunk_decay(gc, t0, nvalid, i_h, i, K):
    """2^(G_last[i]): the chunk's decay of state row i (1 on padded rows)."""
    return T.exp2(T.if_then_else(i < K, gc[t0 + nvalid - 1, i_h, T.min(i, K - 1)], 0))


@T.macro
def tile_span(g_s, b_sp, b_span, nvalid, BT, BK):
    """b_span[0] = the largest decay of the tile's key channels over the chunk, max_k (G_0[k] - G_last[k]) (log2)."""
    for j in T.Parallel(BK):
        b_sp[j] = g_s[0, j] - g_s[nvalid - 1, j]
    T.reduce_max(b_sp, b_span, dim=0)


@T.macro
def key_gated_scores(a_s, b_s, g_s, ag_s, bg_s, b_a, b_p, b_r, d_s, b_sp, b_span, nvalid, span_limit, BT, BC, BK):
    """one key tile's share of the scores: b_a `[BT, BT]` += the one-matmul form or the off-diagonal sub-chunk
    blocks, d_s `[BT, BC]` += the diagonal blocks of the sub-chunk form (d_s[i, jj]: row i, column (i // BC) BC + jj).
    a_s, b_s `[BT, BK]` the tile's row and column operands, g_s `[BT, BK]` fp32 its gates; ag_s, bg_s `[BT, BK]`
    scratch in the operands' dtype. Entries above the diagonal are left for the caller to mask."""
    tile_span(g_s, b_sp, b_span, nvalid, BT, BK)
    if b_span[0] < span_limit:
        # the tile's decay over the chunk is moderate: one matmul, both sides referenced at the middle row
        for i, j in T.Parallel(BT, BK):
            ag_s[i, j] = a_s[i, j] * T.exp2(g_s[i, j] - g_s[BT // 2, j])
            bg_s[i, j] = b_s[i, j] * T.exp2(g_s[BT // 2, j] - g_s[i, j])
        T.gemm(ag_s, bg_s, b_a, transpose_B=True)
    else:
        # off-diagonal blocks of row sub-chunk r, referenced at its first row
        for rr in T.serial(BT // BC - 1):
            n = (rr + 1) * BC
            for i, j in T.Parallel(BT, BK):
                ag_s[i, j] = T.if_then_else(i // BC == rr + 1, a_s[i, j] * T.exp2(g_s[i, j] - g_s[n, j]), 0)
                bg_s[i, j] = T.if_then_else(i < n, b_s[i, j] * T.exp2(g_s[n, j] - g_s[i, j]), 0)
            T.gemm(ag_s, bg_s, b_a, transpose_B=True)
        # diagonal blocks, one column of each sub-chunk at a time
        for jj in T.serial(BC):
            for i, j in T.Parallel(BT, BK):
                c = (i // BC) * BC + jj
                b_p[i, j] = T.if_then_else(c <= i, a_s[i, j] * b_s[c, j] * T.exp2(g_s[i, j] - g_s[c, j]), 0)
            T.reduce_sum(b_p, b_r, dim=1)
            for i in T.Parallel(BT):
                d_s[i, jj] += b_r[i]


def scores_entry(b_a, d_s, i, j, BC):
    """A_ij from `key_gated_scores`' accumulators (both parts; the caller masks j <= i)."""
    return b_a[i, j] + T.if_then_else(i // BC == j // BC, d_s[i, j % BC], 0)


@T.macro
def key_gated_grads(da_s, a_s, b_s, g_s, x_s, dab_s, b_x, b_da, b_db, b_sp, b_span, nvalid, span_limit, BT, BC, BK):
    """one key tile's gradients of the scores A_ij = sum_k a_i b_j 2^(G_i - G_j) from dA (`da_s` `[BT, BT]` fp32, zero
    above the diagonal): b_da `[BT, BK]` += dA (b 2^(-G)) 2^G (the row operand's), b_db += dA^T (a 2^G) 2^(-G) (the
    column operand's), with the same form per key tile as `key_gated_scores`. x_s `[BT, BK]`, dab_s `[BT, BT]` scratch
    in the operands' dtype, b_x `[BT, BK]` fp32 scratch."""
    tile_span(g_s, b_sp, b_span, nvalid, BT, BK)
    if b_span[0] < span_limit:
        # moderate decay over the chunk: one matmul each, referenced at the middle row
        for i, j in T.Parallel(BT, BT):
            dab_s[i, j] = da_s[i, j]
        for i, j in T.Parallel(BT, BK):
            x_s[i, j] = b_s[i, j] * T.exp2(g_s[BT // 2, j] - g_s[i, j])
        T.gemm(dab_s, x_s, b_x, clear_accum=True)
        for i, j in T.Parallel(BT, BK):
            b_da[i, j] += b_x[i, j] * T.exp2(g_s[i, j] - g_s[BT // 2, j])
        for i, j in T.Parallel(BT, BK):
            x_s[i, j] = a_s[i, j] * T.exp2(g_s[i, j] - g_s[BT // 2, j])
        T.gemm(dab_s, x_s, b_x, transpose_A=True, clear_accum=True)
        for i, j in T.Parallel(BT, BK):
            b_db[i, j] += b_x[i, j] * T.exp2(g_s[BT // 2, j] - g_s[i, j])
    else:
        # the row operand's, off-diagonal blocks of row sub-chunk r, referenced at its first row
        T.clear(b_x)
        for rr in T.serial(BT // BC - 1):
            n = (rr + 1) * BC
            for i, j in T.Parallel(BT, BT):
                dab_s[i, j] = T.if_then_else(i // BC == rr + 1 and j < n, da_s[i, j], 0)
            for i, j in T.Parallel(BT, BK):
                x_s[i, j] = T.if_then_else(i < n, b_s[i, j] * T.exp2(g_s[n, j] - g_s[i, j]), 0)
            T.gemm(dab_s, x_s, b_x)
        for i, j in T.Parallel(BT, BK):
            b_da[i, j] += T.if_then_else(i >= BC, b_x[i, j] * T.exp2(g_s[i, j] - g_s[(i // BC) * BC, j]), 0)
        # the column operand's, off-diagonal blocks of column sub-chunk s, referenced at its last row
        T.clear(b_x)
        for s in T.serial(BT // BC - 1):
            m = (s + 1) * BC - 1
            for j, i in T.Parallel(BT, BT):
                dab_s[j, i] = T.if_then_else(j // BC == s and i > m, da_s[i, j], 0)
            for i, j in T.Parallel(BT, BK):
                x_s[i, j] = T.if_then_else(i > m, a_s[i, j] * T.exp2(g_s[i, j] - g_s[m, j]), 0)
            T.gemm(dab_s, x_s, b_x)
        for i, j in T.Parallel(BT, BK):
            b_db[i, j] += T.if_then_else(
                i < BT - BC, b_x[i, j] * T.exp2(g_s[(i // BC) * BC + BC - 1, j] - g_s[i, j]), 0)
        # diagonal blocks, elementwise
        for i, j in T.Parallel(BT, BK):
            for jj in T.serial(BC):
                c = (i // BC) * BC + jj
                b_da[i, j] += T.if_then_else(c <= i, da_s[i, c] * b_s[c, j] * T.exp2(g_s[i, j] - g_s[c, j]), 0)
                b_db[i, j] += T.if_then_else(c >= i, da_s[c, i] * a_s[c, j] * T.exp2(g_s[c, j] - g_s[i, j]), 0)
