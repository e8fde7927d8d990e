"""The delta rule's state passes: forward (`chunk_delta_fwd_h`: the states entering each chunk and the corrected values)
and backward (`chunk_delta_bwd_dhu`: the state gradients and the corrected values' gradients).

With the WY pair of a chunk (`common.wy.wy_repr`: w = Ai diag(beta 2^b) K, u = Ai diag(beta) V) and S the state
entering it, the chunk's corrected values are v_new = u - w S, and then, as in `chunk_h` with v_new for v,
  S <- 2^bL S + sum_j 2^(bL - b_j) k_j v_new_j^T,
with b the chunk-local cumulative log2 gates (gate "g") or zero (gate "none"). The output is `chunk_o.chunk_fwd_o` on
(q, k, v_new, h) with the same gate. One block per (V tile, sequence, head) walks the sequence with the whole [K, BV]
state in registers (w S needs every key row). Both passes form the chunk's w (and the forward pass u) from the kept
WY inverse, k, v and beta on the fly, so the pair is never written or read back (a recompute of it in the backward
costs two extra passes over the sequence).

Backward, from the last chunk to the first, with dS the gradient of the state leaving chunk c (stored as dh[c], the
convention of `chunk_h.chunk_bwd_dh`):
  dv_new = dv_local + diag(2^(bL - b)) K dS,   dv_local = scale * sum_{i>=j} 2^(b_i - b_j) (q_i . k_j) do_i,
  dS <- 2^bL dS + scale * (diag(2^b) Q)^T dO - W^T dv_new,
ending at the initial state's gradient; dv_local is formed inside the pass, per chunk.
"""

import tilelang.language as T
import torch

from ...autotune.configs import delta_pass_stages
from ...autotune.resolve import tile_config
from .gates import (
    gate_chunks,
    gate_last,
    gate_load,
    gate_load_chunk,
    gate_or_dummy,
    gate_row,
    gate_state,
    head_decay,
)
from .key_gate import SUB_CHUNK, chunk_decay, gated_row, key_gated_grads, span_limit_for
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, placeholder, state_or_dummy, target_for
from .wy import scale_columns


@T.macro
def store_chunk(src, dst, t0, i_h, c0, nvalid, aligned, BT, BC, C):
    """store a chunk's tile `src` `[BT, BC]` (shared) into dst `[Ttot, H, C]` at rows t0.. and columns c0..: a full
    chunk of an aligned kernel by one bulk copy, otherwise element by element inside the sequence and the head dim."""
    if aligned and nvalid == BT:
        T.copy(src, dst[t0 : t0 + BT, i_h, c0 : c0 + BC])
    else:
        for i, j in T.Parallel(BT, BC):
            if i < nvalid and c0 + j < C:
                dst[t0 + i, i_h, c0 + j] = src[i, j]


@T.macro
def store_state(src, dst, chunk, i_h, c0, aligned, K, KP, BC, C):
    """store a state tile `src` `[KP, BC]` (shared) into dst `[NT, H, K, C]` at chunk `chunk`, columns c0..: one bulk
    copy in an aligned kernel, otherwise element by element inside the head dims."""
    if aligned:
        T.copy(src, dst[chunk, i_h, 0:K, c0 : c0 + BC])
    else:
        for i, j in T.Parallel(KP, BC):
            if i < K and c0 + j < C:
                dst[chunk, i_h, i, c0 + j] = src[i, j]


def chunk_delta_fwd_h_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 64,
    num_stages: int = 2,
    threads: int = 128,
):
    """the states entering each chunk and the corrected values v_new = u - w S, with the chunk's WY pair formed here
    from the kept inverse (`wy.scale_columns`: u = Ai diag(beta) V rounded to the input dtype as `wy.wy_fwd_kernel`
    stores it, w = Ai diag(beta 2^b) K in [BT, 64] key tiles), so w and u are never written or read."""
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    key_gate = gate == "gk"
    # full tiles load with pipelined bulk copies; padded head dims fall back to masked loads, and so does the per-key
    # gate (its gated key tiles are formed as they load)
    aligned = K == KP and V % BV == 0 and not key_gate
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")
    NH0, NHT = T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def chunk_delta_fwd_h(
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        ai: T.Tensor([Ttot, H, BT], dtype),
        betac: T.Tensor([H, NT, BT], "float32"),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([Ttot, H, K] if key_gate else [NG, BT], "float32"),
        h0: T.Tensor([NH0, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_offsets: T.Tensor([N + 1], "int32"),
        h: T.Tensor([NT, H, K, V], dtype),
        v_new: T.Tensor([Ttot, H, V], dtype),
        ht: T.Tensor([NHT, K, V], "float32"),
        use_h0: T.int32,
        store_ht: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            boc = chunk_offsets[i_n]
            lg = gate_state(gate, g_gamma, i_h, BT)

            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            ai_s = T.alloc_shared([BT, BT], dtype)
            beta_s = T.alloc_shared([BT], "float32")
            aw_s = T.alloc_shared([BT, BT], dtype)
            wn_s = T.alloc_shared([BT, KP], dtype)
            h_s = T.alloc_shared([KP, BV], dtype)
            vg_s = T.alloc_shared([BT, BV], dtype)
            vn_s = T.alloc_shared([BT, BV], dtype)
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_v = T.alloc_fragment([BT, BV], "float32")
            b_y = T.alloc_fragment([BT, 64], "float32")
            if key_gate:
                kd_s = T.alloc_shared([BT, KP], dtype)

            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_h[i, j] = h0[i_nh, i, i_v * BV + j]

            for c in T.Pipelined(T.ceildiv(eos - bos, BT), num_stages=num_stages):
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                # the chunk's last gate is read where it is used (see `fused_chunk`: bound here, its read made the
                # consumer wait for every bulk copy of the stage first)
                # rows past the sequence end: the scaled inverse is zero there, v_new's store and vg mask them
                if aligned:
                    gate_load_chunk(gate, lg, gc, i_h * (NG // H) + boc + c, BT)
                    T.copy(betac[i_h, boc + c, 0:BT], beta_s)
                    T.copy(k[t0 : t0 + BT, i_h, 0:K], k_s)
                    T.copy(ai[t0 : t0 + BT, i_h, 0:BT], ai_s)
                    T.copy(v[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], v_s)
                else:
                    # element loads only (a bulk copy beside them raced in the warp-specialized pipeline), beta and the
                    # gates masked too (an unmasked load broke the 16-bit kernels' code generation)
                    gate_load_chunk(gate, lg, gc, i_h * (NG // H) + boc + c, BT, nvalid)
                    for i in T.Parallel(BT):
                        beta_s[i] = T.if_then_else(i < nvalid, betac[i_h, boc + c, i], 0)
                    if key_gate:
                        # K 2^G (w's keys) and K 2^(G_last - G) (the state update's), formed as they load
                        for i, j in T.Parallel(BT, KP):
                            k_s[i, j] = gated_row(k, gc, t0, i, i_h, j, nvalid, K, dtype)
                            kd_s[i, j] = gated_row(k, gc, t0, i, i_h, j, nvalid, K, dtype, to_last=True)
                    else:
                        for i, j in T.Parallel(BT, KP):
                            k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BT):
                        ai_s[i, j] = T.if_then_else(i < nvalid, ai[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BV):
                        v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
                # u = (Ai diag(beta)) V, rounded to the input dtype as the forward stores it
                scale_columns(aw_s, ai_s, beta_s, gate, lg, nvalid, False, BT, dtype)
                T.gemm(aw_s, v_s, b_v, clear_accum=True)
                for i, j in T.Parallel(BT, BV):
                    b_v[i, j] = T.Cast("float32", T.Cast(dtype, b_v[i, j]))
                # the state entering chunk c, staged for w S and stored from shared memory (one bulk copy)
                T.copy(b_h, h_s)
                store_state(h_s, h, boc + c, i_h, i_v * BV, aligned, K, KP, BV, V)
                # -w = -(Ai diag(beta 2^b)) K, per [BT, 64] key tile (per-key gate: -(Ai diag(beta)) (K 2^G), the
                # gated keys as loaded)
                if gate != "none" and not key_gate:
                    scale_columns(aw_s, ai_s, beta_s, gate, lg, nvalid, True, BT, dtype)
                for kt in T.unroll(KP // 64):
                    T.gemm(aw_s, k_s[:, kt * 64 : (kt + 1) * 64], b_y, clear_accum=True)
                    for i, j in T.Parallel(BT, 64):
                        wn_s[i, kt * 64 + j] = T.Cast(dtype, -b_y[i, j])
                # v_new = u - w S   [BT, BV], in one product over the whole state (one product per row slice of
                # the state tile gave wrong v_new with two consumer warpgroups, every run alike; right with one)
                T.gemm(wn_s, h_s, b_v)
                for i, j in T.Parallel(BT, BV):
                    b_v[i, j] = T.if_then_else(i < nvalid, b_v[i, j], 0)
                for i, j in T.Parallel(BT, BV):
                    vn_s[i, j] = T.Cast(dtype, b_v[i, j])
                    vg_s[i, j] = T.Cast(dtype, b_v[i, j] * T.exp2(gate_last(gate, lg, nvalid) - gate_row(gate, lg, i)))
                store_chunk(vn_s, v_new, t0, i_h, i_v * BV, nvalid, aligned, BT, BV, V)
                if key_gate:
                    # S <- diag(2^G_last) S + (K 2^(G_last - G))^T v_new (vg = v_new: gate_row is 0 here)
                    for i, j in T.Parallel(KP, BV):
                        b_h[i, j] *= chunk_decay(gc, t0, nvalid, i_h, i, K)
                    T.gemm(kd_s, vg_s, b_h, transpose_A=True)
                else:
                    if gate != "none":
                        for i, j in T.Parallel(KP, BV):
                            b_h[i, j] *= T.exp2(gate_last(gate, lg, nvalid))
                    T.gemm(k_s, vg_s, b_h, transpose_A=True)

            if store_ht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        ht[i_nh, i, i_v * BV + j] = b_h[i, j]

    return chunk_delta_fwd_h


def chunk_delta_bwd_dhu_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 64,
    num_stages: int = 2,
    threads: int = 128,
):
    """the state gradients and the corrected values' gradients, walking each sequence backwards; dv_local (the chunk's
    causal scores on dO) is formed here per chunk, and W^T dv_new as K^T ((Ai diag(beta 2^b))^T dv_new) from the kept
    inverse, so neither dv_local nor w is written or read."""
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    key_gate = gate == "gk"
    # full tiles load with pipelined bulk copies; padded head dims fall back to masked loads, and so does the per-key
    # gate (its gated q and k tiles are formed as they load)
    aligned = K == KP and V % BV == 0 and not key_gate
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")
    NHT, NH0, NA = T.dynamic("NHT"), T.dynamic("NH0"), T.dynamic("NA")

    @T.prim_func
    def chunk_delta_bwd_dhu(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        ai: T.Tensor([Ttot, H, BT], dtype),
        betac: T.Tensor([H, NT, BT], "float32"),
        do: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([Ttot, H, K] if key_gate else [NG, BT], "float32"),
        aqk: T.Tensor([NA, H, BT], "float32"),
        dht: T.Tensor([NHT, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_offsets: T.Tensor([N + 1], "int32"),
        dh: T.Tensor([NT, H, K, V], dtype),
        dv_new: T.Tensor([Ttot, H, V], dtype),
        dh0: T.Tensor([NH0, K, V], "float32"),
        scale: T.float32,
        use_dht: T.int32,
        store_dh0: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            boc = chunk_offsets[i_n]
            nc = T.ceildiv(eos - bos, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            ai_s = T.alloc_shared([BT, BT], dtype)
            beta_s = T.alloc_shared([BT], "float32")
            do_s = T.alloc_shared([BT, BV], dtype)
            aw_s = T.alloc_shared([BT, BT], dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            dog_s = T.alloc_shared([BT, BV], dtype)
            dvo_s = T.alloc_shared([BT, BV], dtype)
            t_s = T.alloc_shared([BT, BV], dtype)
            dh_s = T.alloc_shared([KP, BV], dtype)
            b_dh = T.alloc_fragment([KP, BV], "float32")
            b_dv = T.alloc_fragment([BT, BV], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")
            if key_gate:
                kd_s = T.alloc_shared([BT, KP], dtype)

            T.clear(b_dh)
            if use_dht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_dh[i, j] = dht[i_nh, i, i_v * BV + j]

            for cc in T.Pipelined(nc, num_stages=num_stages):
                c = nc - 1 - cc
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                # the chunk's last gate is read where it is used (see `fused_chunk`: bound here, its read made the
                # consumer wait for every bulk copy of the stage first)
                # rows past the sequence end: the scaled inverse and the scores are zero there, and they are zeroed in
                # dv_new and in the gated do
                if aligned:
                    gate_load_chunk(gate, lg, gc, i_h * (NG // H) + boc + c, BT)
                    T.copy(betac[i_h, boc + c, 0:BT], beta_s)
                    T.copy(q[t0 : t0 + BT, i_h, 0:K], q_s)
                    T.copy(k[t0 : t0 + BT, i_h, 0:K], k_s)
                    T.copy(ai[t0 : t0 + BT, i_h, 0:BT], ai_s)
                    T.copy(do[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], do_s)
                else:
                    # element loads only (a bulk copy beside them raced in the warp-specialized pipeline), beta and the
                    # gates masked too (an unmasked load broke the 16-bit kernels' code generation)
                    gate_load_chunk(gate, lg, gc, i_h * (NG // H) + boc + c, BT, nvalid)
                    for i in T.Parallel(BT):
                        beta_s[i] = T.if_then_else(i < nvalid, betac[i_h, boc + c, i], 0)
                    if key_gate:
                        # Q 2^G, K 2^G (w's keys) and K 2^(G_last - G) (the state update's), formed as they load
                        for i, j in T.Parallel(BT, KP):
                            q_s[i, j] = gated_row(q, gc, t0, i, i_h, j, nvalid, K, dtype)
                            k_s[i, j] = gated_row(k, gc, t0, i, i_h, j, nvalid, K, dtype)
                            kd_s[i, j] = gated_row(k, gc, t0, i, i_h, j, nvalid, K, dtype, to_last=True)
                    else:
                        for i, j in T.Parallel(BT, KP):
                            q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                            k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BT):
                        ai_s[i, j] = T.if_then_else(i < nvalid, ai[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BV):
                        do_s[i, j] = T.if_then_else(
                            i < nvalid and i_v * BV + j < V, do[t0 + i, i_h, i_v * BV + j], 0)
                # Ai diag(beta 2^b), with which w = (Ai diag(beta 2^b)) K
                scale_columns(aw_s, ai_s, beta_s, gate, lg, nvalid, True, BT, dtype)
                # the causal scores a[j, i] = scale 2^(b_i - b_j) (k_j . q_i), i >= j inside the sequence; per-key
                # gate: the forward's scores A_qk (scale included)
                if key_gate:
                    for j, i in T.Parallel(BT, BT):
                        a_s[j, i] = T.if_then_else(i >= j and i < nvalid, T.Cast(dtype, aqk[t0 + i, i_h, j]), 0)
                else:
                    T.gemm(k_s, q_s, b_a, transpose_B=True, clear_accum=True)
                    for j, i in T.Parallel(BT, BT):
                        a_s[j, i] = T.if_then_else(
                            i >= j and i < nvalid,
                            b_a[j, i] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0)
                # the gradient of the state leaving chunk c, staged for the products and stored from shared memory
                T.copy(b_dh, dh_s)
                store_state(dh_s, dh, boc + c, i_h, i_v * BV, aligned, K, KP, BV, V)
                # dv_new = a dO + diag(2^(bL - b)) K dS   [BT, BV] (per-key gate: (K 2^(G_last - G)) dS)
                T.gemm(kd_s if key_gate else k_s, dh_s, b_dv, clear_accum=True)
                for i, j in T.Parallel(BT, BV):
                    b_dv[i, j] = T.if_then_else(
                        i < nvalid, b_dv[i, j] * T.exp2(gate_last(gate, lg, nvalid) - gate_row(gate, lg, i)), 0)
                T.gemm(a_s, do_s, b_dv)
                for i, j in T.Parallel(BT, BV):
                    dvo_s[i, j] = T.Cast(dtype, b_dv[i, j])
                    dog_s[i, j] = T.if_then_else(
                        i < nvalid,
                        T.Cast(dtype, T.Cast("float32", do_s[i, j]) * scale * T.exp2(gate_row(gate, lg, i))),
                        0,
                    )
                # W^T dv_new = K^T t with t = (Ai diag(beta 2^b))^T dv_new   [BT, BV] (w itself is never formed)
                T.gemm(aw_s, dvo_s, b_dv, transpose_A=True, clear_accum=True)
                for i, j in T.Parallel(BT, BV):
                    t_s[i, j] = T.Cast(dtype, -b_dv[i, j])
                # dS <- 2^bL dS + Q^T diag(scale 2^b) dO - K^T t (per-key gate: diag(2^G_last) dS + scale (Q 2^G)^T
                # dO - (K 2^G)^T t, the gated tiles as loaded)
                if key_gate:
                    for i, j in T.Parallel(KP, BV):
                        b_dh[i, j] *= chunk_decay(gc, t0, nvalid, i_h, i, K)
                elif gate != "none":
                    for i, j in T.Parallel(KP, BV):
                        b_dh[i, j] *= T.exp2(gate_last(gate, lg, nvalid))
                T.gemm(q_s, dog_s, b_dh, transpose_A=True)
                T.gemm(k_s, t_s, b_dh, transpose_A=True)
                store_chunk(dvo_s, dv_new, t0, i_h, i_v * BV, nvalid, aligned, BT, BV, V)

            if store_dh0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        dh0[i_nh, i, i_v * BV + j] = b_dh[i, j]

    return chunk_delta_bwd_dhu


def chunk_delta_bwd_dqkw_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    # kernel config
    BT: int = 64,
    BK: int = 128,
    BV: int = 64,
    num_stages: int = 2,
    threads: int = 256,
):
    """per [BT, BK] key tile of a chunk, from the corrected values v_new, their gradients du = dv_new, the states h
    entering the chunk and dh the gradients of those leaving it:
      dq = scale * (diag(2^b) dO S^T + (dO v_new^T * 2^(b_i - b_j), i >= j) K),
      dk = diag(2^(bL - b)) v_new dS^T + (dO v_new^T * 2^(b_i - b_j), i >= j)^T Q (scale included),
      dw = -du S^T,
    and for gate "g" the two parts of the gate's gradient (`cumsum.chunk_gate_grad_scan`), as sums over this key
    tile: the rows r = q . dq - k . dk and the chunk's state term <S', dS> with S' = 2^bL S + K^T diag(2^(bL - b))
    v_new the state leaving the chunk, = 2^bL <S, dS> + sum_i k_i . (the dS part of dk_i)."""
    BK = min(BK, pad_dim(K))
    NK = cdiv(K, BK)
    NV = cdiv(V, BV)
    key_gate = gate == "gk"
    span_limit = span_limit_for(dtype)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")

    @T.prim_func
    def chunk_delta_bwd_dqkw(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        du: T.Tensor([Ttot, H, V], dtype),
        h: T.Tensor([NT, H, K, V], dtype),
        dh: T.Tensor([NT, H, K, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H, K] if key_gate else [NG, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dq: T.Tensor([Ttot, H, K], dtype),
        dk: T.Tensor([Ttot, H, K], dtype),
        dw: T.Tensor([Ttot, H, K], dtype),
        r: T.Tensor([Ttot, H, K] if key_gate else [NK, Ttot, H], "float32"),
        cs: T.Tensor([NK, NT, H], "float32"),
        scale: T.float32,
    ):
        # chunks in the first grid dimension (the other two stop at 65535), K tiles fastest
        with T.Kernel(NK * NT, H, threads=threads) as (i_kc, i_h):
            i_k, i_c = i_kc % NK, i_kc // NK
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)
            gate_load(gate, lg, gc, t0, nvalid, i_h, BT)
            bl = gate_last(gate, lg, nvalid)
            k0 = i_k * BK

            q_s = T.alloc_shared([BT, BK], dtype)
            k_s = T.alloc_shared([BT, BK], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            du_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([BK, BV], dtype)
            dh_s = T.alloc_shared([BK, BV], dtype)
            ds_s = T.alloc_shared([BT, BT], dtype)
            o_s = T.alloc_shared([BT, BK], dtype)
            b_dq = T.alloc_fragment([BT, BK], "float32")
            b_dk = T.alloc_fragment([BT, BK], "float32")
            b_dw = T.alloc_fragment([BT, BK], "float32")
            b_ds = T.alloc_fragment([BT, BT], "float32")
            b_r = T.alloc_fragment([BT], "float32")
            b_c = T.alloc_fragment([1], "float32")
            if key_gate:
                g_s = T.alloc_shared([BT, BK], "float32")
                x_s = T.alloc_shared([BT, BK], dtype)
                da_s = T.alloc_shared([BT, BT], "float32")
                b_x = T.alloc_fragment([BT, BK], "float32")
                b_sp = T.alloc_fragment([BK], "float32")
                b_span = T.alloc_fragment([1], "float32")
            if gate == "g":
                b_hh = T.alloc_fragment([BK, BV], "float32")
                b_hr = T.alloc_fragment([BK], "float32")
                b_hc = T.alloc_fragment([1], "float32")
                T.clear(b_hh)

            T.clear(b_dq)
            T.clear(b_dk)
            T.clear(b_dw)
            T.clear(b_ds)
            for iv in T.Pipelined(NV, num_stages=num_stages):
                for i, j in T.Parallel(BT, BV):
                    v_s[i, j] = T.if_then_else(i < nvalid and iv * BV + j < V, v[t0 + i, i_h, iv * BV + j], 0)
                    do_s[i, j] = T.if_then_else(i < nvalid and iv * BV + j < V, do[t0 + i, i_h, iv * BV + j], 0)
                    du_s[i, j] = T.if_then_else(i < nvalid and iv * BV + j < V, du[t0 + i, i_h, iv * BV + j], 0)
                for i, j in T.Parallel(BK, BV):
                    h_s[i, j] = T.if_then_else(k0 + i < K and iv * BV + j < V, h[i_c, i_h, k0 + i, iv * BV + j], 0)
                    dh_s[i, j] = T.if_then_else(k0 + i < K and iv * BV + j < V, dh[i_c, i_h, k0 + i, iv * BV + j], 0)
                # ds = dO v_new^T; dq += dO S^T; dk += v_new dS^T; dw += du S^T (negated at the store)
                T.gemm(do_s, v_s, b_ds, transpose_B=True)
                T.gemm(do_s, h_s, b_dq, transpose_B=True)
                T.gemm(v_s, dh_s, b_dk, transpose_B=True)
                T.gemm(du_s, h_s, b_dw, transpose_B=True)
                if gate == "g":
                    for i, j in T.Parallel(BK, BV):
                        b_hh[i, j] += T.Cast("float32", h_s[i, j]) * T.Cast("float32", dh_s[i, j])

            for i, j in T.Parallel(BT, BK):
                q_s[i, j] = T.if_then_else(i < nvalid and k0 + j < K, q[t0 + i, i_h, k0 + j], 0)
                k_s[i, j] = T.if_then_else(i < nvalid and k0 + j < K, k[t0 + i, i_h, k0 + j], 0)
            for i, j in T.Parallel(BT, BK):
                o_s[i, j] = T.Cast(dtype, -b_dw[i, j])
            for i, j in T.Parallel(BT, BK):
                if i < nvalid and k0 + j < K:
                    dw[t0 + i, i_h, k0 + j] = o_s[i, j]
            if key_gate:
                # the per-key gate: dA = scale dO v_new^T (j <= i) through `key_gate.key_gated_grads`, the state
                # terms scaled per key, r = q dq - k dk per key (the gate's rows before `per_key_gate_grad_chunk`)
                for i, j in T.Parallel(BT, BK):
                    g_s[i, j] = T.if_then_else(k0 + j < K, gc[t0 + T.min(i, nvalid - 1), i_h, T.min(k0 + j, K - 1)],
                                               0)
                for i, j in T.Parallel(BT, BT):
                    da_s[i, j] = T.if_then_else(j <= i, b_ds[i, j] * scale, 0)
                for i, j in T.Parallel(BT, BK):
                    b_dq[i, j] *= scale * T.exp2(g_s[i, j])
                    b_dk[i, j] *= T.exp2(g_s[nvalid - 1, j] - g_s[i, j])
                key_gated_grads(da_s, q_s, k_s, g_s, x_s, ds_s, b_x, b_dq, b_dk, b_sp, b_span, nvalid, span_limit, BT,
                                SUB_CHUNK, BK)
                for i, j in T.Parallel(BT, BK):
                    if i < nvalid and k0 + j < K:
                        r[t0 + i, i_h, k0 + j] = (T.Cast("float32", q_s[i, j]) * b_dq[i, j]
                                                  - T.Cast("float32", k_s[i, j]) * b_dk[i, j])
            else:
                for i, j in T.Parallel(BT, BT):
                    ds_s[i, j] = T.if_then_else(
                        i >= j, b_ds[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                    )
                for i, j in T.Parallel(BT, BK):
                    b_dq[i, j] *= scale * T.exp2(gate_row(gate, lg, i))
                    b_dk[i, j] *= T.exp2(bl - gate_row(gate, lg, i))
            if gate == "g":
                # the state term: 2^bL <S, dS> + sum_i k_i . (the dS part of dk_i); b_dw is free after dw's store
                for i, j in T.Parallel(BT, BK):
                    b_dw[i, j] = T.Cast("float32", k_s[i, j]) * b_dk[i, j]
                T.reduce_sum(b_dw, b_r, dim=1)
                T.reduce_sum(b_r, b_c, dim=0)
                T.reduce_sum(b_hh, b_hr, dim=1)
                T.reduce_sum(b_hr, b_hc, dim=0)
                cs[i_k, i_c, i_h] = b_hc[0] * T.exp2(bl) + b_c[0]
            if not key_gate:
                T.gemm(ds_s, k_s, b_dq)
                T.gemm(ds_s, q_s, b_dk, transpose_A=True)
            if gate == "g":
                for i, j in T.Parallel(BT, BK):
                    b_dw[i, j] = T.Cast("float32", q_s[i, j]) * b_dq[i, j] - T.Cast("float32", k_s[i, j]) * b_dk[i, j]
                T.reduce_sum(b_dw, b_r, dim=1)
                for i in T.Parallel(BT):
                    if i < nvalid:
                        r[i_k, t0 + i, i_h] = b_r[i]
            # dq, dk staged in shared memory for coalesced stores
            T.copy(b_dq, o_s)
            for i, j in T.Parallel(BT, BK):
                if i < nvalid and k0 + j < K:
                    dq[t0 + i, i_h, k0 + j] = o_s[i, j]
            T.copy(b_dk, o_s)
            for i, j in T.Parallel(BT, BK):
                if i < nvalid and k0 + j < K:
                    dk[t0 + i, i_h, k0 + j] = o_s[i, j]

    return chunk_delta_bwd_dqkw


def chunk_delta_fwd_h(k, v, beta, ai, *, gate: str, gc, initial_state, output_final_state: bool, meta: SeqMeta,
                      BT: int = 64, **config):
    """(states entering each chunk `[NT, H, K, V]` in k's dtype, corrected values v_new `[Ttot, H, V]` in v's dtype,
    final state fp32 `[N, H, K, V]` or None); k `[Ttot, H, K]`, v `[Ttot, H, V]`, beta fp32 `[Ttot, H]` per value head,
    ai the kept WY inverse (`wy.wy_repr`), gc `[Ttot, H]` for gate "g", `[Ttot, H, K]` for the per-key gate "gk"."""
    _, H, K = k.shape
    V = v.shape[-1]
    h = k.new_empty(meta.NT, H, K, V)
    v_new = torch.empty_like(v)
    ht = k.new_empty(meta.N * H if output_final_state else 1, K, V, dtype=torch.float32)
    h0, use_h0 = state_or_dummy(initial_state, k, (K, V))
    if meta.NT > 0:
        config = {"num_stages": delta_pass_stages(K, TORCH_TO_TL[k.dtype]),
                  **tile_config("chunk_delta_fwd_h", k, K=K, V=V, gate=gate, N=meta.N, overrides=config)}
        kernel = get_kernel(chunk_delta_fwd_h_kernel, target_for(k.device), K=K, V=V, gate=gate,
                            dtype=TORCH_TO_TL[k.dtype], BT=BT, **config)
        kernel(k, v, ai, gate_chunks(beta, meta, H, BT, k).view(H, meta.NT, BT), head_decay(None, H, k.device),
               gc if gate == "gk" else gate_chunks(gc, meta, H, BT, k), h0, meta.cu, meta.chunk_offsets, h, v_new, ht,
               use_h0, int(output_final_state))
    elif output_final_state:
        ht = h0 if use_h0 else ht.zero_()
    return h, v_new, (ht.view(meta.N, H, K, V) if output_final_state else None)


def chunk_delta_bwd_dhu(q, k, beta, ai, do, dht, *, gate: str, gc, scale: float, need_dh0: bool, meta: SeqMeta,
                        aqk=None, BT: int = 64, **config):
    """(dh `[NT, H, K, V]` the gradients of the states leaving each chunk, in q's dtype; dv_new `[Ttot, H, V]` the
    corrected values' gradients; dh0 fp32 `[N, H, K, V]` or None); beta, ai as in `chunk_delta_fwd_h`, dht `[N, H, K,
    V]` or None; for the per-key gate "gk" gc `[Ttot, H, K]` and the forward's intra-chunk scores `aqk` `[Ttot, H,
    BT]` fp32 (`gla.chunk.chunk_gla_fwd_o`, scale included)."""
    _, H, K = q.shape
    V = do.shape[-1]
    dh = q.new_empty(meta.NT, H, K, V)
    dv_new = torch.empty_like(do)
    dh0 = q.new_empty(meta.N * H if need_dh0 else 1, K, V, dtype=torch.float32)
    dht_, use_dht = state_or_dummy(dht, q, (K, V))
    if meta.NT > 0:
        config = {"num_stages": delta_pass_stages(K, TORCH_TO_TL[q.dtype]),
                  **tile_config("chunk_delta_bwd_dhu", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)}
        kernel = get_kernel(chunk_delta_bwd_dhu_kernel, target_for(q.device), K=K, V=V, gate=gate,
                            dtype=TORCH_TO_TL[q.dtype], BT=BT, **config)
        kernel(q, k, ai, gate_chunks(beta, meta, H, BT, q).view(H, meta.NT, BT), do, head_decay(None, H, q.device),
               gc if gate == "gk" else gate_chunks(gc, meta, H, BT, q),
               aqk if aqk is not None else placeholder((1, H, BT), torch.float32, q.device), dht_, meta.cu,
               meta.chunk_offsets, dh, dv_new, dh0, scale, use_dht, int(need_dh0))
    elif need_dh0:
        dh0 = dht_ if use_dht else dh0.zero_()
    return dh, dv_new, (dh0.view(meta.N, H, K, V) if need_dh0 else None)


def chunk_delta_bwd_dqkw(q, k, v_new, do, du, h, dh, *, gate: str, gc, scale: float, meta: SeqMeta, BT: int = 64,
                         config: dict | None = None):
    """(dq, dk, dw `[Ttot, H, K]` in q's dtype, and for gate "g" the gate's rows r `[Ttot, H]` and state terms `[NT,
    H]` fp32, for the per-key gate "gk" (gc `[Ttot, H, K]`) the rows r = q dq - k dk `[Ttot, H, K]` fp32 and None,
    else None, None): see `chunk_delta_bwd_dqkw_kernel`; du the corrected values' gradients (`dv_new`).
    `config` overrides the resolved tile config (kernel "chunk_delta_bwd_dqkw")."""
    Ttot, H, K = q.shape
    V = do.shape[-1]
    dq, dk, dw = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    if meta.NT == 0:
        return dq, dk, dw, None, None
    config = tile_config("chunk_delta_bwd_dqkw", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    kernel = get_kernel(chunk_delta_bwd_dqkw_kernel, target_for(q.device), K=K, V=V, gate=gate,
                        dtype=TORCH_TO_TL[q.dtype], BT=BT, **config)
    NK = cdiv(K, min(config.get("BK", 128), pad_dim(K)))
    r = q.new_empty(*((Ttot, H, K) if gate == "gk" else (NK, Ttot, H)), dtype=torch.float32)
    cs = q.new_empty(NK, meta.NT, H, dtype=torch.float32)
    kernel(q, k, v_new, do, du, h, dh, head_decay(None, H, q.device), gate_or_dummy(gc, q), meta.cu,
           meta.chunk_indices, dq, dk, dw, r, cs, scale)
    if gate == "gk":
        return dq, dk, dw, r, None
    if gate != "g":
        return dq, dk, dw, None, None
    return dq, dk, dw, r.sum(0) if NK > 1 else r[0], cs.sum(0) if NK > 1 else cs[0]
