"""The WY backward under a per-key (diagonal) gate, KDA's: `wy.wy_bwd_kernel` with gate "gk" returns this
stage (`wy_bwd_key_gate`; one tunable kernel, "wy_bwd", for both).

Per chunk, with G the chunk-local cumulative log2 gates `[BT, K]` (`gc` `[Ttot, H, K]`), Kg = K 2^G and
S_ij = sum_k k_i k_j 2^(G_i - G_j) the per-key scores (`key_gate.key_gated_scores`), the forward formed
  A = diag(beta) S (strictly lower),  Ai = (I + A)^-1,  w = Ai diag(beta) Kg,  u = Ai diag(beta) V.
From du (the gradient of u, that of v_new = u - w S) and dw:
  dAi = (dw Kg^T + du V^T) diag(beta),  dA = -Ai^T dAi Ai^T (strictly lower),  dS = diag(beta) dA,
  dk = beta 2^G (Ai^T dw) + the row and column operands' gradients of S from dS (`key_gate.key_gated_grads`),
  dv = beta Ai^T du,  dbeta = rows of (Kg * Ai^T dw) + (V * Ai^T du) + (dA * S),
  r = beta Kg * (Ai^T dw) + k * (dS's row operand gradient) - k * (dS's column operand gradient),
r being this stage's share of the gate's rows (the derivative by G per key; `cumsum.per_key_gate_grad_chunk` scans
them). dk is updated in place. Key tiles are [BT, 64]; the chunk's values and their gradients stay in shared memory.
"""

import tilelang.language as T

from .key_gate import SUB_CHUNK, key_gated_grads, key_gated_scores, scores_entry, span_limit_for
from .utils import cdiv, pad_dim


def wy_bwd_key_gate(K: int, V: int, dtype: str, beta_dtype: str, dk_dtype: str, BT: int = 64, BD: int = 64,
                           threads: int = 256):
    KP, VP = pad_dim(K), pad_dim(V)
    NK, NV = KP // 64, cdiv(V, BD)
    BC = SUB_CHUNK
    span_limit = span_limit_for(dtype)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")

    @T.macro
    def load_key_tile(k, gc, dw, kt_s, gt_s, kgt_s, dwt_s, t0, nvalid, i_h, kt):
        """key tile kt: k, its gates (rows past the sequence end: the last valid row's), k 2^G and dw (zero rows
        past the end)."""
        for i, j in T.Parallel(BT, 64):
            kt_s[i, j] = T.if_then_else(i < nvalid and kt * 64 + j < K, k[t0 + i, i_h, kt * 64 + j], 0)
            gt_s[i, j] = T.if_then_else(kt * 64 + j < K, gc[t0 + T.min(i, nvalid - 1), i_h, kt * 64 + j], 0)
            dwt_s[i, j] = T.if_then_else(i < nvalid and kt * 64 + j < K, dw[t0 + i, i_h, kt * 64 + j], 0)
        for i, j in T.Parallel(BT, 64):
            kgt_s[i, j] = T.Cast(dtype, T.Cast("float32", kt_s[i, j]) * T.exp2(gt_s[i, j]))

    @T.prim_func
    def wy_bwd(
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        beta: T.Tensor([Ttot, H], beta_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H, K], "float32"),
        ai: T.Tensor([Ttot, H, BT], dtype),
        du: T.Tensor([Ttot, H, V], dtype),
        dw: T.Tensor([Ttot, H, K], dtype),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dk: T.Tensor([Ttot, H, K], dk_dtype),
        dv: T.Tensor([Ttot, H, V], dtype),
        dbeta: T.Tensor([Ttot, H], "float32"),
        db: T.Tensor([Ttot, H, K], "float32"),
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)

            kt_s = T.alloc_shared([BT, 64], dtype)
            gt_s = T.alloc_shared([BT, 64], "float32")
            kgt_s = T.alloc_shared([BT, 64], dtype)
            dwt_s = T.alloc_shared([BT, 64], dtype)
            ag_s = T.alloc_shared([BT, 64], dtype)
            bg_s = T.alloc_shared([BT, 64], dtype)
            v_s = T.alloc_shared([BT, VP], dtype)
            du_s = T.alloc_shared([BT, VP], dtype)
            ai_s = T.alloc_shared([BT, BT], dtype)
            m_s = T.alloc_shared([BT, BT], dtype)
            ds_s = T.alloc_shared([BT, BT], "float32")
            d_s = T.alloc_shared([BT, BC], "float32")
            f_s = T.alloc_shared([BT, 64], "float32")
            beta_s = T.alloc_shared([BT], "float32")
            b_dai = T.alloc_fragment([BT, BT], "float32")
            b_s = T.alloc_fragment([BT, BT], "float32")
            b_m = T.alloc_fragment([BT, BT], "float32")
            b_x = T.alloc_fragment([BT, 64], "float32")
            b_y = T.alloc_fragment([BT, 64], "float32")
            b_da = T.alloc_fragment([BT, 64], "float32")
            b_db = T.alloc_fragment([BT, 64], "float32")
            b_p = T.alloc_fragment([BT, 64], "float32")
            b_r = T.alloc_fragment([BT], "float32")
            b_dbeta = T.alloc_fragment([BT], "float32")
            b_sp = T.alloc_fragment([64], "float32")
            b_span = T.alloc_fragment([1], "float32")

            for i in T.Parallel(BT):
                beta_s[i] = T.if_then_else(i < nvalid, T.Cast("float32", beta[t0 + i, i_h]), 0)
            for i, j in T.Parallel(BT, BT):
                ai_s[i, j] = T.if_then_else(i < nvalid and j < nvalid, ai[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, VP):
                v_s[i, j] = T.if_then_else(i < nvalid and j < V, v[t0 + i, i_h, j], 0)
                du_s[i, j] = T.if_then_else(i < nvalid and j < V, du[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, BC):
                d_s[i, j] = 0
            T.clear(b_dbeta)
            T.clear(b_s)
            # dAi = (dw Kg^T + du V^T) diag(beta); the scores S, per key tile
            T.gemm(du_s, v_s, b_dai, transpose_B=True, clear_accum=True)
            for kt in T.serial(NK):
                load_key_tile(k, gc, dw, kt_s, gt_s, kgt_s, dwt_s, t0, nvalid, i_h, kt)
                T.gemm(dwt_s, kgt_s, b_dai, transpose_B=True)
                key_gated_scores(kt_s, kt_s, gt_s, ag_s, bg_s, b_s, b_p, b_r, d_s, b_sp, b_span, nvalid, span_limit,
                                 BT, BC, 64)
            for i, j in T.Parallel(BT, BT):
                m_s[i, j] = T.Cast(dtype, b_dai[i, j] * beta_s[j])
            # dA = -Ai^T dAi Ai^T, strictly lower; dS = diag(beta) dA; dbeta += rows of dA * S
            T.gemm(ai_s, m_s, b_m, transpose_A=True, clear_accum=True)
            T.copy(b_m, m_s)
            T.gemm(m_s, ai_s, b_dai, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(BT, BT):
                b_m[i, j] = T.if_then_else(i > j and i < nvalid, -b_dai[i, j] * scores_entry(b_s, d_s, i, j, BC), 0)
                ds_s[i, j] = T.if_then_else(i > j and i < nvalid, -b_dai[i, j] * beta_s[i], 0)
            T.reduce_sum(b_m, b_r, dim=1)
            for i in T.Parallel(BT):
                b_dbeta[i] += b_r[i]
            # per key tile: the pair's share beta 2^G (Ai^T dw), then S's operands' gradients from dS
            for kt in T.serial(NK):
                load_key_tile(k, gc, dw, kt_s, gt_s, kgt_s, dwt_s, t0, nvalid, i_h, kt)
                T.gemm(ai_s, dwt_s, b_x, transpose_A=True, clear_accum=True)
                for i, j in T.Parallel(BT, 64):
                    b_p[i, j] = b_x[i, j] * T.Cast("float32", kgt_s[i, j])
                T.reduce_sum(b_p, b_r, dim=1)
                for i in T.Parallel(BT):
                    b_dbeta[i] += b_r[i]
                for i, j in T.Parallel(BT, 64):
                    b_y[i, j] = b_x[i, j] * beta_s[i] * T.exp2(gt_s[i, j])
                T.clear(b_da)
                T.clear(b_db)
                key_gated_grads(ds_s, kt_s, kt_s, gt_s, ag_s, m_s, b_x, b_da, b_db, b_sp, b_span, nvalid, span_limit,
                                BT, BC, 64)
                for i, j in T.Parallel(BT, 64):
                    f_s[i, j] = b_y[i, j] + b_da[i, j] + b_db[i, j]
                    b_p[i, j] = T.Cast("float32", kt_s[i, j]) * (b_y[i, j] + b_da[i, j] - b_db[i, j])
                for i, j in T.Parallel(BT, 64):
                    if i < nvalid and kt * 64 + j < K:
                        dk[t0 + i, i_h, kt * 64 + j] = T.Cast(
                            dk_dtype, T.Cast("float32", dk[t0 + i, i_h, kt * 64 + j]) + f_s[i, j])
                        db[t0 + i, i_h, kt * 64 + j] = b_p[i, j]
            # per value tile: dv = beta Ai^T du; dbeta += rows of V * Ai^T du
            for vt in T.serial(NV):
                T.gemm(ai_s, du_s[:, vt * BD : (vt + 1) * BD], b_x, transpose_A=True, clear_accum=True)
                for i, j in T.Parallel(BT, BD):
                    f_s[i, j] = b_x[i, j] * beta_s[i]
                for i, j in T.Parallel(BT, BD):
                    if i < nvalid and vt * BD + j < V:
                        dv[t0 + i, i_h, vt * BD + j] = T.Cast(dtype, f_s[i, j])
                for i, j in T.Parallel(BT, BD):
                    b_x[i, j] = b_x[i, j] * T.Cast("float32", v_s[i, vt * BD + j])
                T.reduce_sum(b_x, b_r, dim=1)
                for i in T.Parallel(BT):
                    b_dbeta[i] += b_r[i]
            for i in T.Parallel(BT):
                if i < nvalid:
                    dbeta[t0 + i, i_h] = b_dbeta[i]

    return wy_bwd
