"""Titans (linear memory): the chunked forward and backward TileLang kernels and their launchers
(`chunk_titans_linear_fwd` / `chunk_titans_linear_bwd`).

Per chunk of BT tokens, with the memory M and momentum S entering it (both `[D, D]`, fp32 in registers), the
in-chunk coefficients beta, f, G, and the last rows gL = G[L], nL = N[L] and (beta_L, f_L, m_L) of
`fla_tl.reference.titans` (computed by PyTorch glue, `titans_chunk_coefs`, for all chunks at once):
  X = K M, Vn = vn(X, K, V) (fla's layer-norm gradient), O = diag(beta) Q M + diag(f) Q S - 2 A Vn,
  o = O + LN(O) w + b,   M <- beta_L M + f_L S - 2 (K * gL)^T Vn,   S <- m_L S - 2 (K * nL)^T Vn.
A = Q K^T * G (lower triangle) is one batched matmul of the glue (a [BT, BT] gemm has no warp partition for 8 warps).
One block per (sequence, head) walks the chunks (vn needs the whole row of K M). The backward walks them in reverse
from the stored entering states (bf16 / fp16 where its shared memory fits, `bwd_fits`); fp32 inputs and the other
chunk sizes take the autograd of the chunked PyTorch form (recompute).
"""

import tilelang.language as T
import torch
import torch.nn.functional as F

from ...autotune.resolve import tile_config
from ...reference.titans import chunk_titans_linear_torch, titans_chunk_scalars
from ..common.utils import TORCH_TO_TL, cdiv, get_kernel, state_or_dummy, target_for

# the TileLang backward for bf16 / fp16 inputs (False: every dtype takes the PyTorch recompute)
TL_BACKWARD = True


def titans_fwd_chunk_kernel(
    D: int,
    dtype: str,
    # kernel config
    BT: int = 16,
    threads: int = 256,
):
    B, Tn, H, NT = T.dynamic("B"), T.dynamic("Tn"), T.dynamic("H"), T.dynamic("NT")
    NH0, NHT, NS = T.dynamic("NH0"), T.dynamic("NHT"), T.dynamic("NS")

    @T.prim_func
    def titans_fwd_chunk(
        q: T.Tensor([B, Tn, H, D], dtype),
        k: T.Tensor([B, Tn, H, D], dtype),
        v: T.Tensor([B, Tn, H, D], dtype),
        w: T.Tensor([H, D], "float32"),
        bias: T.Tensor([H, D], "float32"),
        beta: T.Tensor([B, H, NT, BT], "float32"),
        f: T.Tensor([B, H, NT, BT], "float32"),
        A: T.Tensor([B, H, NT, BT, BT], "float32"),
        gL: T.Tensor([B, H, NT, BT], "float32"),
        nL: T.Tensor([B, H, NT, BT], "float32"),
        cL: T.Tensor([B, H, NT, 4], "float32"),
        h0: T.Tensor([NH0, D, D], "float32"),
        o: T.Tensor([B, Tn, H, D], dtype),
        ht: T.Tensor([NHT, D, D], "float32"),
        hm: T.Tensor([NS, D, D], dtype),
        hs: T.Tensor([NS, D, D], dtype),
        eps: T.float32,
        use_h0: T.int32,
        store_ht: T.int32,
        store_h: T.int32,
    ):
        with T.Kernel(B * H, threads=threads) as i_bh:
            i_b = i_bh // H
            i_h = i_bh % H

            q_s = T.alloc_shared([BT, D], dtype)
            k_s = T.alloc_shared([BT, D], dtype)
            m_s = T.alloc_shared([D, D], dtype)
            s_s = T.alloc_shared([D, D], dtype)
            vn_s = T.alloc_shared([BT, D], dtype)
            kg_s = T.alloc_shared([BT, D], dtype)
            kn_s = T.alloc_shared([BT, D], dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            b_m = T.alloc_fragment([D, D], "float32")
            b_s = T.alloc_fragment([D, D], "float32")
            x_s = T.alloc_shared([BT, D], "float32")
            o_s = T.alloc_shared([BT, D], "float32")
            b_km = T.alloc_fragment([BT, D], "float32")  # gemm accumulators: K M and A Vn
            # row-reduced tiles in a layout of their own (a reduce over a gemm-accumulator layout does not lower)
            b_x = T.alloc_fragment([BT, D], "float32")  # K M, then its normalised form
            b_g = T.alloc_fragment([BT, D], "float32")
            b_t = T.alloc_fragment([BT, D], "float32")
            b_qm = T.alloc_fragment([BT, D], "float32")
            b_qs = T.alloc_fragment([BT, D], "float32")
            b_o = T.alloc_fragment([BT, D], "float32")
            r_1 = T.alloc_fragment([BT], "float32")
            r_2 = T.alloc_fragment([BT], "float32")
            r_std = T.alloc_fragment([BT], "float32")

            T.clear(b_s)
            T.clear(b_m)
            if use_h0 == 1:
                for i, j in T.Parallel(D, D):
                    b_m[i, j] = h0[i_bh, i, j]

            for c in T.serial(T.ceildiv(Tn, BT)):
                t0 = c * BT
                for i, j in T.Parallel(BT, D):
                    q_s[i, j] = T.if_then_else(t0 + i < Tn, q[i_b, t0 + i, i_h, j], 0)
                    k_s[i, j] = T.if_then_else(t0 + i < Tn, k[i_b, t0 + i, i_h, j], 0)
                T.copy(b_m, m_s)
                T.copy(b_s, s_s)
                if store_h == 1:
                    # the states entering chunk c, as the gemms see them (for the backward)
                    for i, j in T.Parallel(D, D):
                        hm[i_bh * T.ceildiv(Tn, BT) + c, i, j] = m_s[i, j]
                        hs[i_bh * T.ceildiv(Tn, BT) + c, i, j] = s_s[i, j]
                T.gemm(k_s, m_s, b_km, clear_accum=True)  # [BT, D]
                T.gemm(q_s, m_s, b_qm, clear_accum=True)
                T.gemm(q_s, s_s, b_qs, clear_accum=True)

                # Vn from X = K M: x^ = LN(x), g = (w x^ + b - v + k) w, vn = D g - sum(g)/(s D) - x^ sum(g x^)/(s D)
                T.copy(b_km, x_s)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = x_s[i, j]
                T.reduce_sum(b_x, r_1, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = b_x[i, j] - r_1[i] / D
                    b_t[i, j] = b_x[i, j] * b_x[i, j]
                T.reduce_sum(b_t, r_2, dim=1)
                for i in T.Parallel(BT):
                    r_std[i] = T.sqrt(r_2[i] / D + eps)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = b_x[i, j] / r_std[i]
                    b_g[i, j] = (w[i_h, j] * b_x[i, j] + bias[i_h, j]
                                 - T.if_then_else(t0 + i < Tn, v[i_b, t0 + i, i_h, j], 0) + k_s[i, j]) * w[i_h, j]
                    b_t[i, j] = b_g[i, j] * b_x[i, j]
                T.reduce_sum(b_g, r_1, dim=1)
                T.reduce_sum(b_t, r_2, dim=1)
                for i, j in T.Parallel(BT, D):
                    vn_s[i, j] = T.if_then_else(
                        t0 + i < Tn, D * b_g[i, j] - (r_1[i] + b_x[i, j] * r_2[i]) / (r_std[i] * D), 0)
                    kg_s[i, j] = k_s[i, j] * (-2.0 * gL[i_b, i_h, c, i])
                    kn_s[i, j] = k_s[i, j] * (-2.0 * nL[i_b, i_h, c, i])
                for i, j in T.Parallel(BT, BT):
                    a_s[i, j] = A[i_b, i_h, c, i, j]
                T.gemm(a_s, vn_s, b_km, clear_accum=True)  # [BT, D]

                # O = beta Q M + f Q S - 2 A Vn, then o = O + LN(O) w + b
                for i, j in T.Parallel(BT, D):
                    o_s[i, j] = beta[i_b, i_h, c, i] * b_qm[i, j] + f[i_b, i_h, c, i] * b_qs[i, j] - 2.0 * b_km[i, j]
                for i, j in T.Parallel(BT, D):
                    b_o[i, j] = o_s[i, j]
                T.reduce_sum(b_o, r_1, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_t[i, j] = (b_o[i, j] - r_1[i] / D) * (b_o[i, j] - r_1[i] / D)
                T.reduce_sum(b_t, r_2, dim=1)
                for i in T.Parallel(BT):
                    r_std[i] = T.sqrt(r_2[i] / D + eps)
                for i, j in T.Parallel(BT, D):
                    if t0 + i < Tn:
                        o[i_b, t0 + i, i_h, j] = (b_o[i, j] + (b_o[i, j] - r_1[i] / D) / r_std[i] * w[i_h, j]
                                                  + bias[i_h, j])

                # M <- beta_L M + f_L S + (-2 K gL)^T Vn,  S <- m_L S + (-2 K nL)^T Vn
                for i, j in T.Parallel(D, D):
                    b_m[i, j] = cL[i_b, i_h, c, 0] * b_m[i, j] + cL[i_b, i_h, c, 1] * b_s[i, j]
                    b_s[i, j] = cL[i_b, i_h, c, 2] * b_s[i, j]
                T.gemm(kg_s, vn_s, b_m, transpose_A=True)
                T.gemm(kn_s, vn_s, b_s, transpose_A=True)

            if store_ht == 1:
                for i, j in T.Parallel(D, D):
                    ht[i_bh, i, j] = b_m[i, j]

    return titans_fwd_chunk


def titans_bwd_chunk_kernel(
    D: int,
    dtype: str,
    # kernel config
    BT: int = 16,
    threads: int = 256,
):
    """the reverse sweep: one block per (sequence, head) walks the chunks backwards with dM, dS `[D, D]` in fp32
    registers, recomputing each chunk's forward from the stored entering states (hm, hs)."""
    B, Tn, H, NT = T.dynamic("B"), T.dynamic("Tn"), T.dynamic("H"), T.dynamic("NT")
    NHT, NS = T.dynamic("NHT"), T.dynamic("NS")

    @T.prim_func
    def titans_bwd_chunk(
        q: T.Tensor([B, Tn, H, D], dtype),
        k: T.Tensor([B, Tn, H, D], dtype),
        v: T.Tensor([B, Tn, H, D], dtype),
        do: T.Tensor([B, Tn, H, D], dtype),
        w: T.Tensor([H, D], "float32"),
        bias: T.Tensor([H, D], "float32"),
        beta: T.Tensor([B, H, NT, BT], "float32"),
        f: T.Tensor([B, H, NT, BT], "float32"),
        A: T.Tensor([B, H, NT, BT, BT], "float32"),
        gL: T.Tensor([B, H, NT, BT], "float32"),
        nL: T.Tensor([B, H, NT, BT], "float32"),
        cL: T.Tensor([B, H, NT, 4], "float32"),
        hm: T.Tensor([NS, D, D], dtype),
        hs: T.Tensor([NS, D, D], dtype),
        dht: T.Tensor([NHT, D, D], "float32"),
        dq: T.Tensor([B, Tn, H, D], "float32"),
        dk: T.Tensor([B, Tn, H, D], "float32"),
        dv: T.Tensor([B, Tn, H, D], "float32"),
        dout: T.Tensor([B, Tn, H, D], "float32"),  # dO, the gradient of the pre-norm output
        vn_out: T.Tensor([B, Tn, H, D], "float32"),
        dbeta: T.Tensor([B, H, NT, BT], "float32"),
        df: T.Tensor([B, H, NT, BT], "float32"),
        dgL: T.Tensor([B, H, NT, BT], "float32"),
        dnL: T.Tensor([B, H, NT, BT], "float32"),
        dcL: T.Tensor([B, H, NT, 4], "float32"),
        dwb: T.Tensor([B * H, 2, D], "float32"),
        dh0: T.Tensor([B * H, D, D], "float32"),
        eps: T.float32,
        use_dht: T.int32,
    ):
        with T.Kernel(B * H, threads=threads) as i_bh:
            i_b = i_bh // H
            i_h = i_bh % H
            NC = T.ceildiv(Tn, BT)

            q_s = T.alloc_shared([BT, D], dtype)
            k_s = T.alloc_shared([BT, D], dtype)
            m_s = T.alloc_shared([D, D], dtype)
            s_s = T.alloc_shared([D, D], dtype)
            dm_s = T.alloc_shared([D, D], dtype)
            ds_s = T.alloc_shared([D, D], dtype)
            vn_s = T.alloc_shared([BT, D], dtype)
            kg_s = T.alloc_shared([BT, D], dtype)
            kn_s = T.alloc_shared([BT, D], dtype)
            do_s = T.alloc_shared([BT, D], dtype)
            bdo_s = T.alloc_shared([BT, D], dtype)
            fdo_s = T.alloc_shared([BT, D], dtype)
            dx_s = T.alloc_shared([BT, D], dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            x_s = T.alloc_shared([BT, D], "float32")  # K M, then P = Vn dM'^T
            qm_s = T.alloc_shared([BT, D], "float32")  # Q M, then dX M^T
            qs_s = T.alloc_shared([BT, D], "float32")
            o_s = T.alloc_shared([BT, D], "float32")  # O, then R = Vn dS'^T
            dvn_s = T.alloc_shared([BT, D], "float32")
            b_dm = T.alloc_fragment([D, D], "float32")
            b_ds = T.alloc_fragment([D, D], "float32")
            acc = T.alloc_fragment([BT, D], "float32")  # gemm accumulator
            b_x = T.alloc_fragment([BT, D], "float32")  # x^
            b_u = T.alloc_fragment([BT, D], "float32")  # U = w x^ + b - v + k (g = U w)
            b_o = T.alloc_fragment([BT, D], "float32")  # O^, then dU
            b_do = T.alloc_fragment([BT, D], "float32")
            b_dvn = T.alloc_fragment([BT, D], "float32")
            b_t = T.alloc_fragment([BT, D], "float32")
            acc_w = T.alloc_fragment([BT, D], "float32")
            acc_b = T.alloc_fragment([BT, D], "float32")
            r_1 = T.alloc_fragment([BT], "float32")
            r_2 = T.alloc_fragment([BT], "float32")
            r_std = T.alloc_fragment([BT], "float32")
            r_s1 = T.alloc_fragment([BT], "float32")
            r_s2 = T.alloc_fragment([BT], "float32")
            r_p = T.alloc_fragment([BT], "float32")
            r_r = T.alloc_fragment([BT], "float32")
            r_c = T.alloc_fragment([BT], "float32")
            r_w = T.alloc_fragment([D], "float32")
            r_one = T.alloc_fragment([1], "float32")

            T.clear(b_dm)
            T.clear(b_ds)
            T.clear(acc_w)
            T.clear(acc_b)
            if use_dht == 1:
                for i, j in T.Parallel(D, D):
                    b_dm[i, j] = dht[i_bh, i, j]

            for cc in T.serial(NC):
                c = NC - 1 - cc
                t0 = c * BT
                for i, j in T.Parallel(BT, D):
                    q_s[i, j] = T.if_then_else(t0 + i < Tn, q[i_b, t0 + i, i_h, j], 0)
                    k_s[i, j] = T.if_then_else(t0 + i < Tn, k[i_b, t0 + i, i_h, j], 0)
                for i, j in T.Parallel(D, D):
                    m_s[i, j] = hm[i_bh * NC + c, i, j]
                    s_s[i, j] = hs[i_bh * NC + c, i, j]
                T.copy(b_dm, dm_s)
                T.copy(b_ds, ds_s)
                for i, j in T.Parallel(BT, BT):
                    a_s[i, j] = -2.0 * A[i_b, i_h, c, i, j]

                # <dM', M>, <dM', S>, <dS', S> (the gradients of beta_L, f_L, m_L), 16 rows at a time
                for e in T.serial(3):
                    T.clear(r_c)
                    for rb in T.serial(D // BT):
                        for i, j in T.Parallel(BT, D):
                            b_t[i, j] = T.if_then_else(
                                e == 2, ds_s[rb * BT + i, j], dm_s[rb * BT + i, j]) * T.if_then_else(
                                e == 0, m_s[rb * BT + i, j], s_s[rb * BT + i, j])
                        T.reduce_sum(b_t, r_c, dim=1, clear=False)
                    T.reduce_sum(r_c, r_one, dim=0)
                    for i in T.Parallel(1):
                        dcL[i_b, i_h, c, e + i] = r_one[i]

                # the chunk's forward again: x^, U, Vn, O, O^
                T.gemm(k_s, m_s, acc, clear_accum=True)
                T.copy(acc, x_s)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = x_s[i, j]
                T.reduce_sum(b_x, r_1, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = b_x[i, j] - r_1[i] / D
                    b_t[i, j] = b_x[i, j] * b_x[i, j]
                T.reduce_sum(b_t, r_2, dim=1)
                for i in T.Parallel(BT):
                    r_std[i] = T.sqrt(r_2[i] / D + eps)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = b_x[i, j] / r_std[i]
                    b_u[i, j] = (w[i_h, j] * b_x[i, j] + bias[i_h, j]
                                 - T.if_then_else(t0 + i < Tn, v[i_b, t0 + i, i_h, j], 0) + k_s[i, j])
                    b_t[i, j] = b_u[i, j] * w[i_h, j]
                    b_dvn[i, j] = b_u[i, j] * w[i_h, j] * b_x[i, j]
                T.reduce_sum(b_t, r_s1, dim=1)
                T.reduce_sum(b_dvn, r_s2, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_t[i, j] = T.if_then_else(
                        t0 + i < Tn, D * b_u[i, j] * w[i_h, j] - (r_s1[i] + b_x[i, j] * r_s2[i]) / (r_std[i] * D), 0)
                    vn_s[i, j] = b_t[i, j]
                    kg_s[i, j] = k_s[i, j] * (-2.0 * gL[i_b, i_h, c, i])
                    kn_s[i, j] = k_s[i, j] * (-2.0 * nL[i_b, i_h, c, i])
                for i, j in T.Parallel(BT, D):
                    if t0 + i < Tn:
                        vn_out[i_b, t0 + i, i_h, j] = b_t[i, j]
                T.gemm(q_s, m_s, acc, clear_accum=True)
                T.copy(acc, qm_s)
                T.gemm(q_s, s_s, acc, clear_accum=True)
                T.copy(acc, qs_s)
                T.gemm(a_s, vn_s, acc, clear_accum=True)  # -2 A Vn
                for i, j in T.Parallel(BT, D):
                    o_s[i, j] = beta[i_b, i_h, c, i] * qm_s[i, j] + f[i_b, i_h, c, i] * qs_s[i, j] + acc[i, j]
                for i, j in T.Parallel(BT, D):
                    b_o[i, j] = o_s[i, j]
                T.reduce_sum(b_o, r_1, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_o[i, j] = b_o[i, j] - r_1[i] / D
                    b_t[i, j] = b_o[i, j] * b_o[i, j]
                T.reduce_sum(b_t, r_2, dim=1)
                for i in T.Parallel(BT):
                    r_c[i] = T.sqrt(r_2[i] / D + eps)

                # dO = do + (dO^ - mean(dO^) - O^ mean(dO^ O^)) / s_O, dO^ = do w
                for i, j in T.Parallel(BT, D):
                    b_o[i, j] = b_o[i, j] / r_c[i]
                    b_do[i, j] = T.if_then_else(t0 + i < Tn, do[i_b, t0 + i, i_h, j], 0)
                    acc_w[i, j] += b_do[i, j] * b_o[i, j]
                    acc_b[i, j] += b_do[i, j]
                    b_t[i, j] = b_do[i, j] * w[i_h, j]
                    b_dvn[i, j] = b_do[i, j] * w[i_h, j] * b_o[i, j]
                T.reduce_sum(b_t, r_1, dim=1)
                T.reduce_sum(b_dvn, r_2, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_do[i, j] = b_do[i, j] + (b_t[i, j] - r_1[i] / D - b_o[i, j] * r_2[i] / D) / r_c[i]
                    do_s[i, j] = b_do[i, j]
                    bdo_s[i, j] = beta[i_b, i_h, c, i] * b_do[i, j]
                    fdo_s[i, j] = f[i_b, i_h, c, i] * b_do[i, j]
                    b_t[i, j] = b_do[i, j] * qm_s[i, j]
                    b_dvn[i, j] = b_do[i, j] * qs_s[i, j]
                for i, j in T.Parallel(BT, D):
                    if t0 + i < Tn:
                        dout[i_b, t0 + i, i_h, j] = b_do[i, j]
                T.reduce_sum(b_t, r_1, dim=1)
                T.reduce_sum(b_dvn, r_2, dim=1)
                for i in T.Parallel(BT):
                    dbeta[i_b, i_h, c, i] = r_1[i]
                    df[i_b, i_h, c, i] = r_2[i]

                # dVn = -2 A^T dO - 2 (K gL) dM' - 2 (K nL) dS';  P = Vn dM'^T, R = Vn dS'^T
                T.gemm(a_s, do_s, acc, transpose_A=True, clear_accum=True)
                T.gemm(kg_s, dm_s, acc)
                T.gemm(kn_s, ds_s, acc)
                T.copy(acc, dvn_s)
                T.gemm(vn_s, dm_s, acc, transpose_B=True, clear_accum=True)
                T.copy(acc, x_s)
                T.gemm(vn_s, ds_s, acc, transpose_B=True, clear_accum=True)
                T.copy(acc, o_s)
                for i, j in T.Parallel(BT, D):
                    b_t[i, j] = k_s[i, j] * x_s[i, j]
                    b_dvn[i, j] = k_s[i, j] * o_s[i, j]
                T.reduce_sum(b_t, r_1, dim=1)
                T.reduce_sum(b_dvn, r_2, dim=1)
                for i in T.Parallel(BT):
                    dgL[i_b, i_h, c, i] = -2.0 * r_1[i]
                    dnL[i_b, i_h, c, i] = -2.0 * r_2[i]

                # Vn's backward: p = sum dVn, r = sum dVn x^, dg = D dVn - c (p + x^ r), dU = dg w,
                # dx^ = -c s2 dVn - c r g + dU w, ds = c (p s1 + r s2) / s, with c = 1 / (s D)
                for i, j in T.Parallel(BT, D):
                    b_dvn[i, j] = dvn_s[i, j]
                    b_t[i, j] = dvn_s[i, j] * b_x[i, j]
                T.reduce_sum(b_dvn, r_p, dim=1)
                T.reduce_sum(b_t, r_r, dim=1)
                for i, j in T.Parallel(BT, D):
                    # b_o <- dg, then dU = dg w;  dw += dg U + dU x^,  db += dU
                    b_o[i, j] = D * b_dvn[i, j] - (r_p[i] + b_x[i, j] * r_r[i]) / (r_std[i] * D)
                    acc_w[i, j] += b_o[i, j] * (b_u[i, j] + w[i_h, j] * b_x[i, j])
                    b_o[i, j] = b_o[i, j] * w[i_h, j]
                    acc_b[i, j] += b_o[i, j]
                    b_dvn[i, j] = (-(r_s2[i] * b_dvn[i, j] + r_r[i] * b_u[i, j] * w[i_h, j]) / (r_std[i] * D)
                                   + b_o[i, j] * w[i_h, j])
                    b_t[i, j] = b_dvn[i, j] * b_x[i, j]
                for i, j in T.Parallel(BT, D):
                    if t0 + i < Tn:
                        dv[i_b, t0 + i, i_h, j] = -b_o[i, j]
                T.reduce_sum(b_dvn, r_1, dim=1)
                T.reduce_sum(b_t, r_2, dim=1)
                for i, j in T.Parallel(BT, D):
                    dx_s[i, j] = ((b_dvn[i, j] - r_1[i] / D - b_x[i, j] * r_2[i] / D) / r_std[i]
                                  + (r_p[i] * r_s1[i] + r_r[i] * r_s2[i]) / (r_std[i] * r_std[i] * D * D) * b_x[i, j])

                # dk = dX M^T + dU - 2 gL P - 2 nL R,  dq = (beta dO) M^T + (f dO) S^T
                T.gemm(dx_s, m_s, acc, transpose_B=True, clear_accum=True)
                T.copy(acc, qm_s)
                for i, j in T.Parallel(BT, D):
                    if t0 + i < Tn:
                        dk[i_b, t0 + i, i_h, j] = (qm_s[i, j] + b_o[i, j] - 2.0 * gL[i_b, i_h, c, i] * x_s[i, j]
                                                   - 2.0 * nL[i_b, i_h, c, i] * o_s[i, j])
                T.gemm(bdo_s, m_s, acc, transpose_B=True, clear_accum=True)
                T.gemm(fdo_s, s_s, acc, transpose_B=True)
                for i, j in T.Parallel(BT, D):
                    if t0 + i < Tn:
                        dq[i_b, t0 + i, i_h, j] = acc[i, j]

                # dM <- beta_L dM' + K^T dX + Q^T (beta dO),  dS <- f_L dM' + m_L dS' + Q^T (f dO)
                for i, j in T.Parallel(D, D):
                    b_ds[i, j] = cL[i_b, i_h, c, 1] * b_dm[i, j] + cL[i_b, i_h, c, 2] * b_ds[i, j]
                    b_dm[i, j] = cL[i_b, i_h, c, 0] * b_dm[i, j]
                T.gemm(k_s, dx_s, b_dm, transpose_A=True)
                T.gemm(q_s, bdo_s, b_dm, transpose_A=True)
                T.gemm(q_s, fdo_s, b_ds, transpose_A=True)

            for i, j in T.Parallel(D, D):
                dh0[i_bh, i, j] = b_dm[i, j]
            T.reduce_sum(acc_w, r_w, dim=0)
            for j in T.Parallel(D):
                dwb[i_bh, 0, j] = r_w[j]
            T.reduce_sum(acc_b, r_w, dim=0)
            for j in T.Parallel(D):
                dwb[i_bh, 1, j] = r_w[j]

    return titans_bwd_chunk


def titans_chunk_coefs(theta, alpha, eta, BT: int):
    """fp32 in-chunk coefficients of every chunk from `[B, T, H]` scalars: beta, f, gL, nL `[B, H, NT, BT]`, G
    `[B, H, NT, BT, BT]` and (beta_L, f_L, m_L, 0) `[B, H, NT, 4]` at each chunk's last token. The tokens past T are
    padded with theta = alpha = 0, eta = 1 (rows past the end never reach an output)."""
    B, T, H = theta.shape
    NT = cdiv(T, BT)
    pad = NT * BT - T
    theta, alpha, eta = (x.float().transpose(1, 2) for x in (theta, alpha, eta))
    theta, alpha = F.pad(theta, (0, pad)), F.pad(alpha, (0, pad))
    eta = F.pad(eta, (0, pad), value=1.0)
    beta, f, G, N, m = titans_chunk_scalars(*(x.view(B, H, NT, BT) for x in (theta, alpha, eta)))
    last = torch.full((NT,), BT - 1, device=theta.device)
    last[-1] = (T - 1) % BT
    ar = torch.arange(NT, device=theta.device)
    gL, nL = G[:, :, ar, last], N[:, :, ar, last]
    cL = torch.stack([beta[:, :, ar, last], f[:, :, ar, last], m[:, :, ar, last], torch.zeros_like(m[..., 0])], -1)
    return beta.contiguous(), f.contiguous(), G.contiguous(), gL.contiguous(), nL.contiguous(), cL.contiguous()


def _chunked(x, BT: int):
    """`[B, T, H, D]` -> `[B, H, NT, BT, D]`, zero-padded past T."""
    B, T, H, D = x.shape
    pad = cdiv(T, BT) * BT - T
    return (F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).view(B, -1, BT, H, D).permute(0, 3, 1, 2, 4)


def _unchunked(x, T: int):
    """`[B, H, NT, BT, D]` -> `[B, T, H, D]`."""
    B, H, NT, BT, D = x.shape
    return x.reshape(B, H, NT * BT, D)[:, :, :T].transpose(1, 2)


def titans_fwd(q, k, v, w, b, theta, alpha, eta, *, eps: float, chunk_size: int, initial_state,
               output_final_state: bool, store_states: bool = False, **config):
    """(o `[B, T, H, D]` in q's dtype, final memory fp32 `[B, H, D, D]` or None, and with `store_states` the states
    entering each chunk (hm, hs) `[B * H * NT, D, D]` in q's dtype) by the TileLang kernel; `config` overrides the
    tile config (kernel "titans_fwd_chunk")."""
    B, T, H, D = q.shape
    q = q.contiguous()  # the kernel's layout; the tile config reads it as [B * T, H, D]
    BT = chunk_size
    beta, f, G, gL, nL, cL = titans_chunk_coefs(theta.reshape(B, T, H), alpha.reshape(B, T, H),
                                                eta.reshape(B, T, H), BT)
    # the in-chunk attention (Q K^T * G), lower triangle incl. the diagonal: a batched matmul of the glue
    A = (torch.matmul(_chunked(q, BT), _chunked(k, BT).transpose(-1, -2)).float() * G).tril().contiguous()
    o = torch.empty_like(q)
    ht = q.new_empty(B * H if output_final_state else 1, D, D, dtype=torch.float32)
    h0, use_h0 = state_or_dummy(initial_state, q, (D, D))
    config = tile_config("titans_fwd_chunk", q.view(B * T, H, D), K=D, V=D, gate="none", N=B,
                         overrides=config)
    kernel = get_kernel(titans_fwd_chunk_kernel, target_for(q.device), D=D, dtype=TORCH_TO_TL[q.dtype], BT=BT,
                        **config)
    NS = B * H * G.shape[2] if store_states else 1
    hm, hs = q.new_empty(NS, D, D), q.new_empty(NS, D, D)
    kernel(q, k.contiguous(), v.contiguous(), w.reshape(H, D).float().contiguous(),
           b.reshape(H, D).float().contiguous(), beta, f, A, gL, nL, cL, h0, o, ht, hm, hs, float(eps), use_h0,
           int(output_final_state), int(store_states))
    return o, (ht.view(B, H, D, D) if output_final_state else None), ((hm, hs) if store_states else None)


def titans_bwd(q, k, v, w, b, theta, alpha, eta, do, dht, hm, hs, *, eps: float, chunk_size: int, **config):
    """the gradients (dq, dk, dv, dw, db, dtheta, dalpha, deta, dh0), fp32, by the TileLang reverse sweep and the
    PyTorch glue: the in-chunk attention's share of dq, dk (batched matmuls) and the coefficients' backward to theta,
    alpha, eta (the vector-Jacobian product of `titans_chunk_coefs`); `config` overrides the tile config (kernel
    "titans_bwd_chunk")."""
    B, T, H, D = q.shape
    q = q.contiguous()  # the kernel's layout; the tile config reads it as [B * T, H, D]
    BT = chunk_size
    # torch.func.vjp (not autograd): a custom op's backward runs below the autograd dispatch key
    th, al, et = (x.detach().reshape(B, T, H).float() for x in (theta, alpha, eta))
    coefs, coefs_vjp = torch.func.vjp(lambda *xs: titans_chunk_coefs(*xs, BT), th, al, et)
    beta, f, G, gL, nL, cL = coefs
    qc, kc = _chunked(q, BT).float(), _chunked(k, BT).float()
    QK = torch.matmul(qc, kc.transpose(-1, -2)).tril()
    A = (QK * G).contiguous()
    NT = G.shape[2]
    dq, dk, dv, dout, vn = (q.new_empty(B, T, H, D, dtype=torch.float32) for _ in range(5))
    dbeta, df, dgL, dnL = (torch.zeros_like(beta) for _ in range(4))
    dcL = torch.zeros_like(cL)
    dwb = q.new_empty(B * H, 2, D, dtype=torch.float32)
    dh0 = q.new_empty(B * H, D, D, dtype=torch.float32)
    dht_, use_dht = state_or_dummy(dht, q, (D, D))
    config = tile_config("titans_bwd_chunk", q.view(B * T, H, D), K=D, V=D, gate="none", N=B,
                         overrides=config)
    kernel = get_kernel(titans_bwd_chunk_kernel, target_for(q.device), D=D, dtype=TORCH_TO_TL[q.dtype], BT=BT,
                        **config)
    kernel(q, k.contiguous(), v.contiguous(), do.to(q.dtype).contiguous(),
           w.reshape(H, D).float().contiguous(), b.reshape(H, D).float().contiguous(), beta, f, A, gL, nL, cL, hm, hs,
           dht_, dq, dk, dv, dout, vn, dbeta, df, dgL, dnL, dcL, dwb, dh0, float(eps), use_dht)
    # the in-chunk attention A = tril(Q K^T) * G: dA = -2 dO Vn^T, dG = dA * tril(Q K^T), d(Q K^T) = dA * G
    dA = torch.matmul(_chunked(dout, BT), _chunked(vn, BT).transpose(-1, -2)).mul_(-2.0).tril_()
    dAG = dA * G
    dq += _unchunked(torch.matmul(dAG, kc), T)
    dk += _unchunked(torch.matmul(dAG.transpose(-1, -2), qc), T)
    dcL[..., 3] = 0
    dth, dal, det = coefs_vjp((dbeta, df, dA * QK, dgL, dnL, dcL))
    dwb = dwb.view(B, H, 2, D).sum(0)
    return (dq, dk, dv, dwb[:, 0], dwb[:, 1], dth, dal, det, dh0.view(B, H, D, D))


def bwd_fits(D: int, BT: int, elem: int) -> bool:
    """whether the backward kernel's shared memory (4 [D, D] and 9 [BT, D] tiles in q's dtype, 5 [BT, D] fp32 tiles)
    fits a Hopper block (227 KB): D = 128 takes BT = 16 only."""
    return 4 * D * D * elem + 9 * BT * D * elem + 5 * BT * D * 4 + BT * BT * elem <= 220 * 1024


def tl_backward(D: int, chunk_size: int, dtype: torch.dtype) -> bool:
    """whether the TileLang backward runs: it stages M, S, dM, dS in q's dtype in shared memory, so bf16 / fp16
    within the budget (`bwd_fits`); the other inputs take the PyTorch recompute."""
    return (TL_BACKWARD and dtype in (torch.bfloat16, torch.float16)
            and bwd_fits(D, chunk_size, torch.empty((), dtype=dtype).element_size()))


def chunk_titans_linear_fwd(q, k, v, w, b, theta, alpha, eta, initial_state, *, eps: float, chunk_size: int,
                            output_final_state: bool, requires_grad: bool):
    """(o `[B, T, H, D]` in q's dtype, final memory fp32 `[B, H, D, D]` or None) by the forward kernel, followed by
    the residuals of :func:`chunk_titans_linear_bwd`: the states entering each chunk (hm, hs) when a backward will
    run on the TileLang kernel (`requires_grad` and `tl_backward`), else none."""
    store = requires_grad and tl_backward(q.shape[-1], chunk_size, q.dtype)
    o, ht, states = titans_fwd(q, k, v, w, b, theta, alpha, eta, eps=eps, chunk_size=chunk_size,
                               initial_state=initial_state, output_final_state=output_final_state,
                               store_states=store)
    return (o, ht, *states) if store else (o, ht)


def chunk_titans_linear_bwd(q, k, v, w, b, theta, alpha, eta, initial_state, do, dht, states, *, eps: float,
                            chunk_size: int):
    """the gradients of (q, k, v, w, b, theta, alpha, eta, initial_state) in their inputs' shapes and dtypes (None
    for an absent initial state), for the output gradients do and dht (either may be None): by the TileLang reverse
    sweep from the stored `states` (hm, hs), or without them by the vector-Jacobian product of the chunked PyTorch
    form, recomputed in fp32 from the inputs."""
    saved = (q, k, v, w, b, theta, alpha, eta, initial_state)
    if states is not None:
        hm, hs = states
        do = torch.zeros_like(q) if do is None else do
        grads = titans_bwd(q, k, v, w, b, theta, alpha, eta, do, dht, hm, hs, eps=eps, chunk_size=chunk_size)
        return [g.reshape(x.shape).to(x.dtype) if x is not None else None for g, x in zip(grads, saved)]
    # the vector-Jacobian product of the chunked PyTorch form in fp32 (torch.func: a custom op's backward runs below
    # the autograd dispatch key)
    present = [i for i, x in enumerate(saved) if x is not None]

    def form(*xs):
        full = [None] * len(saved)
        for i, x in zip(present, xs):
            full[i] = x
        o, ht = chunk_titans_linear_torch(*full[:8], eps, chunk_size, full[8], dht is not None)
        return (o, ht) if dht is not None else (o,)

    outs, form_vjp = torch.func.vjp(form, *(saved[i].detach().float() for i in present))
    cotangents = (do.float() if do is not None else torch.zeros_like(outs[0]),)
    if dht is not None:
        cotangents += (dht.float(),)
    result = [None] * len(saved)
    for i, g in zip(present, form_vjp(cotangents)):
        result[i] = g.to(saved[i].dtype)
    return result
