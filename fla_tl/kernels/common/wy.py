"""The WY representation of the delta rule's chunks, shared by delta_rule and gated_delta_rule (and later KDA, RWKV7).

Per chunk of BT tokens with betas beta_i, keys k_i and, for gate "g", chunk-local cumulative log2 gates b_i (the
`gc` of `common.cumsum.chunk_gate_cumsum`; gate "none": b = 0):
  A_ij = beta_i (k_i . k_j) 2^(b_i - b_j) for i > j, 0 on and above the diagonal (both i, j inside the sequence);
  Ai = (I + A)^-1, solved in fp32 and stored in k's dtype `[Ttot, H, BT]` (row i of a chunk holds row i of its
  inverse; its consumers read it in that dtype anyway, for their tensor-core matmuls);
  the WY pair w = Ai diag(beta 2^b) K and u = Ai diag(beta) V, so that the chunk's state correction is u - w S (see
  `fla_tl.reference.delta_rule`). `wy_repr` computes A, Ai, w and u in one kernel per chunk (`wy_fwd_kernel`); the
  state passes of `common.chunk_delta_h` form w and u again from the kept Ai per chunk (`scale_columns`). The row
  scales go on Ai's columns: Ai diag(r) is formed from Ai rounded to k's dtype and rounded again for the tensor-core
  matmuls (`scaled_inverse`), so the forward and the backward's recompute agree.
The inverse is forward substitution in fp32 on CUDA cores, X_i = e_i - sum_{k < i} A_ik X_k, one thread per column
of X, 16 rows at a time in registers (A's key products run on tensor cores: exact products for bf16 / fp16 inputs,
TF32 for fp32 ones, as fla).
The backward (`wy_bwd`) takes the gradients of u and of w (-du S^T, formed with dq and dk from the chunk states) back
to k, v, beta and the cumulative gates.
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from .gates import gate_load, gate_or_dummy, gate_row, gate_state, head_decay
from .key_gate import SUB_CHUNK, key_gated_scores, scores_entry, span_limit_for
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, target_for


def scaled_inverse(x, r, dtype: str):
    """an entry of Ai diag(r) in `dtype`, from an entry x of Ai (fp32 or `dtype`) rounded to `dtype` first, as the
    forward keeps it, so the backward's recompute from the kept inverse gives the forward's w and u exactly."""
    return T.Cast(dtype, T.Cast("float32", T.Cast(dtype, x)) * r)


@T.macro
def scale_columns(dst, src, scale_s, gate, lg, nvalid, with_gate, BT, dtype):
    """dst = Ai diag(r) `[BT, BT]` (`scaled_inverse`) from Ai in `src` (shared), r = beta 2^b (`with_gate`) or beta
    (`scale_s` the chunk's betas): the WY pair's row scales on the inverse's columns, so w = dst K and u = dst V take
    the tiles as they are."""
    for i, j in T.Parallel(BT, BT):
        dst[i, j] = T.if_then_else(
            i < nvalid and j < nvalid,
            scaled_inverse(src[i, j], scale_s[j] * (T.exp2(gate_row(gate, lg, j)) if with_gate else 1.0), dtype), 0)


def wy_fwd_kernel(K: int, V: int, dtype: str, beta_dtype: str, gate: str, pair: bool = True, BT: int = 64, BS: int = 16,
                  BD: int = 64, threads: int = 128):
    """the WY pair of one chunk in one block: A from the chunk's key products, its inverse Ai (stored, in k's dtype),
    then w = Ai diag(beta 2^b) K and u = Ai diag(beta) V in [BT, BD] tiles. The inverse is forward substitution in
    fp32 by the first BT threads, thread j computing column j, BS rows at a time in registers (the rows above from
    shared memory, the block's own rows by substitution); the key tile stays in shared memory for w. The row scales of
    the pair go on the inverse's columns (Ai diag(beta 2^b), rounded to k's dtype), so K and V enter the products as
    they are."""
    KP = pad_dim(K)
    NV = cdiv(V, BD)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")
    NW = T.dynamic("NW")
    key_gate = gate == "gk"
    if key_gate and pair:
        raise ValueError("wy_fwd_kernel: the per-key gate (\"gk\") forms the inverse only (pair=False); the state "
                         "pass forms w and u")
    gshape = [NG, H, K] if key_gate else [NG, H]
    span_limit = span_limit_for(dtype)

    @T.prim_func
    def wy_fwd(
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        beta: T.Tensor([Ttot, H], beta_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor(gshape, "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        ai: T.Tensor([Ttot, H, BT], dtype),
        w: T.Tensor([NW, H, K], dtype),
        u: T.Tensor([NW, H, V], dtype),
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)
            gate_load(gate, lg, gc, t0, nvalid, i_h, BT)

            k_s = None if key_gate else T.alloc_shared([BT, KP], dtype)
            a_s = T.alloc_shared([BT, BT], "float32")
            x_s = T.alloc_shared([BT, BT], "float32")
            ai_s = T.alloc_shared([BT, BT], dtype)
            t_s = T.alloc_shared([BT, BD], dtype) if pair else None
            beta_s = T.alloc_shared([BT], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")
            b_y = T.alloc_fragment([BT, BD], "float32") if pair else None
            r = T.alloc_local([BS], "float32")
            xk = T.alloc_local([1], "float32")
            tx = T.get_thread_binding()

            for i in T.Parallel(BT):
                beta_s[i] = T.if_then_else(i < nvalid, T.Cast("float32", beta[t0 + i, i_h]), 0)
            # A stored transposed (a_s[j, i] = A_ij): the substitution reads the BS entries it needs per step as
            # one contiguous row (vector loads, the same address across the threads)
            if key_gate:
                # A_ij = beta_i sum_k k_i k_j 2^(G_i - G_j) per [BT, 64] key tile (`key_gate.key_gated_scores`); rows
                # past the sequence end: zero keys, the last valid row's gates
                kt_s = T.alloc_shared([BT, 64], dtype)
                g_s = T.alloc_shared([BT, 64], "float32")
                ag_s = T.alloc_shared([BT, 64], dtype)
                bg_s = T.alloc_shared([BT, 64], dtype)
                d_s = T.alloc_shared([BT, SUB_CHUNK], "float32")
                b_p = T.alloc_fragment([BT, 64], "float32")
                b_pr = T.alloc_fragment([BT], "float32")
                b_sp = T.alloc_fragment([64], "float32")
                b_span = T.alloc_fragment([1], "float32")
                T.clear(b_a)
                for i, j in T.Parallel(BT, SUB_CHUNK):
                    d_s[i, j] = 0
                for kt in T.serial(KP // 64):
                    for i, j in T.Parallel(BT, 64):
                        kt_s[i, j] = T.if_then_else(i < nvalid and kt * 64 + j < K, k[t0 + i, i_h, kt * 64 + j], 0)
                        g_s[i, j] = T.if_then_else(kt * 64 + j < K, gc[t0 + T.min(i, nvalid - 1), i_h, kt * 64 + j], 0)
                    key_gated_scores(kt_s, kt_s, g_s, ag_s, bg_s, b_a, b_p, b_pr, d_s, b_sp, b_span, nvalid,
                                     span_limit, BT, SUB_CHUNK, 64)
                for i, j in T.Parallel(BT, BT):
                    a_s[j, i] = T.if_then_else(
                        i > j and i < nvalid, scores_entry(b_a, d_s, i, j, SUB_CHUNK) * beta_s[i], 0)
            else:
                for i, j in T.Parallel(BT, KP):
                    k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                T.gemm(k_s, k_s, b_a, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BT):
                    a_s[j, i] = T.if_then_else(
                        i > j and i < nvalid,
                        b_a[i, j] * beta_s[i] * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0)
            # X = (I + A)^-1 by row blocks: X_b = e_b - A_b,<b X_<b (the rows above, from shared memory), then the
            # block's own rows by substitution (A is zero on and above the diagonal)
            if tx < BT:
                for b in T.unroll(BT // BS):
                    for i in T.unroll(BS):
                        r[i] = T.if_then_else(b * BS + i == tx, 1.0, 0.0)
                    for kk in T.serial(b * BS):
                        xk[0] = x_s[kk, tx]
                        for i in T.unroll(BS):
                            r[i] = r[i] - a_s[kk, b * BS + i] * xk[0]
                    for kk in T.unroll(BS):
                        for i in T.unroll(BS):
                            r[i] = r[i] - a_s[b * BS + kk, b * BS + i] * r[kk]
                    for i in T.unroll(BS):
                        x_s[b * BS + i, tx] = r[i]
            for i, j in T.Parallel(BT, BT):
                ai_s[i, j] = T.if_then_else(i < nvalid and j < nvalid, T.Cast(dtype, x_s[i, j]), 0)
            for i, j in T.Parallel(BT, BT):
                if i < nvalid:
                    ai[t0 + i, i_h, j] = ai_s[i, j]
            if pair:
                # w = (Ai diag(beta 2^b)) K per key tile, with the row scales on Ai's columns (no scaled key copy)
                scale_columns(ai_s, x_s, beta_s, gate, lg, nvalid, True, BT, dtype)
                for kt in T.serial(KP // BD):
                    T.gemm(ai_s, k_s[:, kt * BD : (kt + 1) * BD], b_y, clear_accum=True)
                    T.copy(b_y, t_s)
                    for i, j in T.Parallel(BT, BD):
                        if i < nvalid and kt * BD + j < K:
                            w[t0 + i, i_h, kt * BD + j] = t_s[i, j]
                # u = (Ai diag(beta)) V, per value tile
                if gate != "none":
                    scale_columns(ai_s, x_s, beta_s, gate, lg, nvalid, False, BT, dtype)
                for vt in T.serial(NV):
                    for i, j in T.Parallel(BT, BD):
                        t_s[i, j] = T.if_then_else(i < nvalid and vt * BD + j < V, v[t0 + i, i_h, vt * BD + j], 0)
                    T.gemm(ai_s, t_s, b_y, clear_accum=True)
                    T.copy(b_y, t_s)
                    for i, j in T.Parallel(BT, BD):
                        if i < nvalid and vt * BD + j < V:
                            u[t0 + i, i_h, vt * BD + j] = t_s[i, j]

    return wy_fwd


def wy_bwd_kernel(K: int, V: int, dtype: str, beta_dtype: str, gate: str, dk_dtype: str, BT: int = 64, BD: int = 64,
                  threads: int = 256):
    """the WY backward of one chunk: from du (the gradient of u, which is that of v_new = u - w S) and dw (that of w,
    -du S^T: `chunk_delta_h.chunk_delta_bwd_dqkw`), with kbg = diag(beta 2^b) K, vb = diag(beta) V:
      dAi = dw kbg^T + du vb^T,  dA = -Ai^T dAi Ai^T (strictly lower),  G = dA * 2^(b_i - b_j),
      dk += beta 2^b Ai^T dw + diag(beta) G K + G^T diag(beta) K,  dv = beta Ai^T du,
      dbeta = rows of (2^b K * Ai^T dw) + (V * Ai^T du) + (G * K K^T),
      db = rows of (kbg * Ai^T dw) + rowsum(P) - colsum(P), P = G * A;
    dk is updated in place (dk += ...); db is the gradient of the chunk-local cumulative log gate (natural units).
    The per-key gate ("gk") builds `wy_key_gate.wy_bwd_key_gate` (db per key then).
    Every input tile of the chunk is loaded into shared memory once, up front (the loads' latencies overlap); the
    dk and dv parts then run over [BT, BD] column tiles of those. Two warpgroups by default (faster than one, gated or
    not)."""
    if gate == "gk":
        from .wy_key_gate import wy_bwd_key_gate

        return wy_bwd_key_gate(K, V, dtype, beta_dtype, dk_dtype, BT=BT, BD=BD, threads=threads)
    KP, VP = pad_dim(K), pad_dim(V)
    NK, NV = cdiv(K, BD), cdiv(V, BD)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")

    @T.prim_func
    def wy_bwd(
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        beta: T.Tensor([Ttot, H], beta_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H], "float32"),
        ai: T.Tensor([Ttot, H, BT], dtype),
        du: T.Tensor([Ttot, H, V], dtype),
        dw: T.Tensor([Ttot, H, K], dtype),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dk: T.Tensor([Ttot, H, K], dk_dtype),
        dv: T.Tensor([Ttot, H, V], dtype),
        dbeta: T.Tensor([Ttot, H], "float32"),
        db: T.Tensor([Ttot, H], "float32"),
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)
            gate_load(gate, lg, gc, t0, nvalid, i_h, BT)

            k_s = T.alloc_shared([BT, KP], dtype)
            dw_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, VP], dtype)
            du_s = T.alloc_shared([BT, VP], dtype)
            ai_s = T.alloc_shared([BT, BT], dtype)
            m_s = T.alloc_shared([BT, BT], dtype)
            g2_s = T.alloc_shared([BT, BT], dtype)
            # fp32 scratch: G * K K^T for its row and column sums (other layouts than the tiles' row sums), then the
            # [BT, BD] results staged for their coalesced stores (dk's update, dv)
            f_s = T.alloc_shared([BT, BD], "float32")
            beta_s = T.alloc_shared([BT], "float32")
            dbeta_p = T.alloc_shared([BT], "float32")
            db_p = T.alloc_shared([BT], "float32")
            db_c = T.alloc_shared([BT], "float32")
            b_dai = T.alloc_fragment([BT, BT], "float32")
            b_duv = T.alloc_fragment([BT, BT], "float32")
            b_kk = T.alloc_fragment([BT, BT], "float32")
            b_m = T.alloc_fragment([BT, BT], "float32")
            b_x = T.alloc_fragment([BT, BD], "float32")
            b_y = T.alloc_fragment([BT, BD], "float32")
            b_r = T.alloc_fragment([BT], "float32")
            b_dbeta = T.alloc_fragment([BT], "float32")
            b_db = T.alloc_fragment([BT], "float32")
            b_rp = T.alloc_fragment([BT], "float32")
            b_cp = T.alloc_fragment([BT], "float32")

            for i in T.Parallel(BT):
                beta_s[i] = T.if_then_else(i < nvalid, T.Cast("float32", beta[t0 + i, i_h]), 0)
            for i, j in T.Parallel(BT, BT):
                ai_s[i, j] = T.if_then_else(i < nvalid and j < nvalid, ai[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, KP):
                k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                dw_s[i, j] = T.if_then_else(i < nvalid and j < K, dw[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, VP):
                v_s[i, j] = T.if_then_else(i < nvalid and j < V, v[t0 + i, i_h, j], 0)
                du_s[i, j] = T.if_then_else(i < nvalid and j < V, du[t0 + i, i_h, j], 0)
            T.clear(b_dbeta)
            T.clear(b_db)
            # dAi = (dw K^T) diag(beta 2^b) + (du V^T) diag(beta); K K^T
            T.gemm(dw_s, k_s, b_dai, transpose_B=True, clear_accum=True)
            T.gemm(du_s, v_s, b_duv, transpose_B=True, clear_accum=True)
            T.gemm(k_s, k_s, b_kk, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(BT, BT):
                m_s[i, j] = T.Cast(dtype, (b_dai[i, j] * T.exp2(gate_row(gate, lg, j)) + b_duv[i, j]) * beta_s[j])
            # dA = -Ai^T dAi Ai^T on the strictly lower triangle; G = dA 2^(b_i - b_j); g2 = diag(beta) G
            T.gemm(ai_s, m_s, b_m, transpose_A=True, clear_accum=True)
            T.copy(b_m, m_s)
            T.gemm(m_s, ai_s, b_dai, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(BT, BT):
                b_m[i, j] = T.if_then_else(
                    i > j and i < nvalid,
                    -b_dai[i, j] * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)) * b_kk[i, j], 0)
            # dbeta += rows of G * K K^T; P = G * A = beta_i G K K^T: db += rowsum(P) - colsum(P)
            T.copy(b_m, f_s)
            T.reduce_sum(f_s, b_rp, dim=1)
            for i in T.Parallel(BT):
                dbeta_p[i] = b_rp[i]
            for i, j in T.Parallel(BT, BT):
                f_s[i, j] = f_s[i, j] * beta_s[i]
            T.reduce_sum(f_s, b_rp, dim=1)
            for i in T.Parallel(BT):
                db_p[i] = b_rp[i]
            T.reduce_sum(f_s, b_cp, dim=0)
            for i in T.Parallel(BT):
                db_c[i] = b_cp[i]
            for i, j in T.Parallel(BT, BT):
                g2_s[i, j] = T.if_then_else(
                    i > j and i < nvalid,
                    T.Cast(dtype, -b_dai[i, j] * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)) * beta_s[i]),
                    0)
            # per key tile: dkbg = Ai^T dw; dk += beta 2^b dkbg + g2 K + g2^T K
            for kt in T.serial(NK):
                T.gemm(ai_s, dw_s[:, kt * BD : (kt + 1) * BD], b_x, transpose_A=True, clear_accum=True)
                T.gemm(g2_s, k_s[:, kt * BD : (kt + 1) * BD], b_y, clear_accum=True)
                T.gemm(g2_s, k_s[:, kt * BD : (kt + 1) * BD], b_y, transpose_A=True)
                for i, j in T.Parallel(BT, BD):
                    b_x[i, j] = b_x[i, j] * T.exp2(gate_row(gate, lg, i))
                    f_s[i, j] = b_x[i, j] * beta_s[i] + b_y[i, j]
                for i, j in T.Parallel(BT, BD):
                    if i < nvalid and kt * BD + j < K:
                        dk[t0 + i, i_h, kt * BD + j] = T.Cast(
                            dk_dtype, T.Cast("float32", dk[t0 + i, i_h, kt * BD + j]) + f_s[i, j])
                for i, j in T.Parallel(BT, BD):
                    b_x[i, j] = b_x[i, j] * k_s[i, kt * BD + j]
                T.reduce_sum(b_x, b_r, dim=1)
                for i in T.Parallel(BT):
                    b_dbeta[i] += b_r[i]
                    b_db[i] += b_r[i] * beta_s[i]
            # per value tile: dvb = Ai^T du; dv = beta dvb; dbeta += rows of V * dvb
            for vt in T.serial(NV):
                T.gemm(ai_s, du_s[:, vt * BD : (vt + 1) * BD], b_x, transpose_A=True, clear_accum=True)
                for i, j in T.Parallel(BT, BD):
                    f_s[i, j] = b_x[i, j] * beta_s[i]
                for i, j in T.Parallel(BT, BD):
                    if i < nvalid and vt * BD + j < V:
                        dv[t0 + i, i_h, vt * BD + j] = T.Cast(dtype, f_s[i, j])
                for i, j in T.Parallel(BT, BD):
                    b_x[i, j] = b_x[i, j] * v_s[i, vt * BD + j]
                T.reduce_sum(b_x, b_r, dim=1)
                for i in T.Parallel(BT):
                    b_dbeta[i] += b_r[i]
            for i in T.Parallel(BT):
                if i < nvalid:
                    dbeta[t0 + i, i_h] = b_dbeta[i] + dbeta_p[i]
                    db[t0 + i, i_h] = b_db[i] + db_p[i] - db_c[i]

    return wy_bwd


def wy_repr(k, v, beta, *, meta: SeqMeta, gc=None, pair: bool = True, BT: int = 64, **config):
    """(w = Ai diag(beta 2^b) K, u = Ai diag(beta) V, Ai in k's dtype `[Ttot, H, BT]`): the WY pair of every chunk, by
    `wy_fwd_kernel`; gc None means no gate, `[Ttot, H]` a per-token gate, `[Ttot, H, K]` a per-key one (the inverse
    only: `pair` False). Without `pair`: (None, None, Ai). `config` (tile keywords) overrides the resolved tile config
    (`fla_tl.autotune`, kernel "wy_fwd")."""
    gate = "none" if gc is None else ("gk" if gc.dim() == 3 else "g")
    k, v, beta = k.contiguous(), v.contiguous(), beta.contiguous()
    Ttot, H, K = k.shape
    ai = k.new_empty(Ttot, H, BT)
    w, u = (torch.empty_like(k), torch.empty_like(v)) if pair else (k[:1], v[:1])
    if meta.NT > 0:
        config = tile_config("wy_fwd", k, K=K, V=v.shape[-1], gate=gate, N=meta.N, overrides=config)
        kernel = get_kernel(wy_fwd_kernel, target_for(k.device), K=K, V=v.shape[-1], dtype=TORCH_TO_TL[k.dtype],
                            beta_dtype=TORCH_TO_TL[beta.dtype], gate=gate, pair=pair, BT=BT, **config)
        # the gate hooks take a per-head constant; gc already carries any (a zero one here)
        kernel(k, v, beta, head_decay(None, H, k.device), gate_or_dummy(gc, k), meta.cu, meta.chunk_indices, ai, w, u)
    return (w, u, ai) if pair else (None, None, ai)


def wy_bwd(k, v, beta, ai, du, dw, dk, *, meta: SeqMeta, gc=None, BT: int = 64, **config):
    """the WY backward (see `wy_bwd_kernel`): adds the WY share into dk `[Ttot, H, K]` in place and returns (dv in
    v's dtype, dbeta fp32 `[Ttot, H]`, db fp32 `[Ttot, H]`, the chunk-local cumulative gate's gradient; per key
    `[Ttot, H, K]` for a per-key gate gc `[Ttot, H, K]`). `config` overrides the resolved tile config (kernel
    "wy_bwd")."""
    Ttot, H, K = k.shape
    V = v.shape[-1]
    gate = "none" if gc is None else ("gk" if gc.dim() == 3 else "g")
    dv = torch.empty_like(v)
    dbeta = k.new_empty(Ttot, H, dtype=torch.float32)
    db = k.new_empty(Ttot, H, *((K,) if gate == "gk" else ()), dtype=torch.float32)
    if meta.NT == 0:
        return dv, dbeta, db
    config = tile_config("wy_bwd", k, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    kernel = get_kernel(wy_bwd_kernel, target_for(k.device), K=K, V=V, dtype=TORCH_TO_TL[k.dtype],
                        beta_dtype=TORCH_TO_TL[beta.dtype], gate=gate, dk_dtype=TORCH_TO_TL[dk.dtype], BT=BT, **config)
    kernel(k, v, beta, head_decay(None, H, k.device), gate_or_dummy(gc, k), ai, du, dw, meta.cu, meta.chunk_indices,
           dk, dv, dbeta, db)
    return dv, dbeta, db
