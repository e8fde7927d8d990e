"""Fused chunk kernels: one block per (sequence, head, V tile) walks every chunk, the state kept in registers.

Same chunk algebra as `chunk_h` / `chunk_o`, with the state never written to memory. The backward runs a forward
sweep for dq (recomputing h) and a reverse sweep for dk, dv (carrying dh); dq and dk come in partial sums over the
V tiles, summed by the launcher when V spans several tiles.
"""

import tilelang.language as T
import torch

from .chunk_h import gate_last, gate_row
from .utils import LOG2E, TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, state_or_dummy, target_for


def fused_chunk_fwd_kernel(
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
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    Ttot, H, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def fused_chunk_fwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        h0: T.Tensor([NH0, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        o: T.Tensor([Ttot, H, V], dtype),
        ht: T.Tensor([NHT, K, V], "float32"),
        scale: T.float32,
        use_h0: T.int32,
        store_ht: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            lg = g_gamma[i_h] * LOG2E

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            vg_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([KP, BV], dtype)
            s_s = T.alloc_shared([BT, BT], dtype)
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_o = T.alloc_fragment([BT, BV], "float32")
            b_s = T.alloc_fragment([BT, BT], "float32")

            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_h[i, j] = h0[i_nh, i, i_v * BV + j]

            for c in T.Pipelined(T.ceildiv(eos - bos, BT), num_stages=num_stages):
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                bl = gate_last(gate, lg, nvalid)
                for i, j in T.Parallel(BT, KP):
                    q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                    k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                for i, j in T.Parallel(BT, BV):
                    v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
                T.copy(b_h, h_s)
                T.gemm(q_s, h_s, b_o, clear_accum=True)
                T.gemm(q_s, k_s, b_s, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BT):
                    s_s[i, j] = T.if_then_else(
                        i >= j, b_s[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                    )
                for i, j in T.Parallel(BT, BV):
                    b_o[i, j] *= scale * T.exp2(gate_row(gate, lg, i))
                    vg_s[i, j] = v_s[i, j] * T.exp2(bl - gate_row(gate, lg, i))
                T.gemm(s_s, v_s, b_o)
                for i, j in T.Parallel(BT, BV):
                    if i < nvalid and i_v * BV + j < V:
                        o[t0 + i, i_h, i_v * BV + j] = b_o[i, j]
                if gate != "none":
                    for i, j in T.Parallel(KP, BV):
                        b_h[i, j] *= T.exp2(bl)
                T.gemm(k_s, vg_s, b_h, transpose_A=True)

            if store_ht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        ht[i_nh, i, i_v * BV + j] = b_h[i, j]

    return fused_chunk_fwd


def fused_chunk_bwd_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 64,
    num_stages: int = 1,
    threads: int = 256,
):
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    Ttot, H, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def fused_chunk_bwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        h0: T.Tensor([NH0, K, V], "float32"),
        dht: T.Tensor([NHT, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        dq: T.Tensor([NV, Ttot, H, K], "float32"),
        dk: T.Tensor([NV, Ttot, H, K], "float32"),
        dv: T.Tensor([Ttot, H, V], dtype),
        dh0: T.Tensor([NH0, K, V], "float32"),
        scale: T.float32,
        use_h0: T.int32,
        use_dht: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            nc = T.ceildiv(eos - bos, BT)
            lg = g_gamma[i_h] * LOG2E

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            x_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([KP, BV], dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")
            b_dq = T.alloc_fragment([BT, KP], "float32")
            b_dv = T.alloc_fragment([BT, BV], "float32")

            # forward sweep: dq_i = scale (2^b_i do_i h^T + sum_{j<=i} 2^(b_i-b_j) (do_i . v_j) k_j)
            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_h[i, j] = h0[i_nh, i, i_v * BV + j]
            for c in T.Pipelined(nc, num_stages=num_stages):
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                bl = gate_last(gate, lg, nvalid)
                for i, j in T.Parallel(BT, KP):
                    k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                for i, j in T.Parallel(BT, BV):
                    v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
                    do_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, do[t0 + i, i_h, i_v * BV + j], 0)
                T.copy(b_h, h_s)
                T.gemm(do_s, h_s, b_dq, transpose_B=True, clear_accum=True)
                T.gemm(do_s, v_s, b_a, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BT):
                    a_s[i, j] = T.if_then_else(
                        i >= j, b_a[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                    )
                for i, j in T.Parallel(BT, KP):
                    b_dq[i, j] *= scale * T.exp2(gate_row(gate, lg, i))
                for i, j in T.Parallel(BT, BV):
                    x_s[i, j] = v_s[i, j] * T.exp2(bl - gate_row(gate, lg, i))
                T.gemm(a_s, k_s, b_dq)
                for i, j in T.Parallel(BT, KP):
                    if i < nvalid and j < K:
                        dq[i_v, t0 + i, i_h, j] = b_dq[i, j]
                if gate != "none":
                    for i, j in T.Parallel(KP, BV):
                        b_h[i, j] *= T.exp2(bl)
                T.gemm(k_s, x_s, b_h, transpose_A=True)

            # reverse sweep with b_h now holding dh, the gradient of the state leaving the chunk
            T.clear(b_h)
            if use_dht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_h[i, j] = dht[i_nh, i, i_v * BV + j]
            for cc in T.Pipelined(nc, num_stages=num_stages):
                c = nc - 1 - cc
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                bl = gate_last(gate, lg, nvalid)
                for i, j in T.Parallel(BT, KP):
                    q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                    k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                for i, j in T.Parallel(BT, BV):
                    v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
                    do_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, do[t0 + i, i_h, i_v * BV + j], 0)
                T.copy(b_h, h_s)
                # dk_j = 2^(bL-b_j) v_j dh^T + scale sum_{i>=j} 2^(b_i-b_j) (do_i . v_j) q_i   (b_dq reused as dk)
                T.gemm(v_s, h_s, b_dq, transpose_B=True, clear_accum=True)
                T.gemm(do_s, v_s, b_a, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BT):
                    a_s[i, j] = T.if_then_else(
                        i >= j, b_a[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                    )
                for i, j in T.Parallel(BT, KP):
                    b_dq[i, j] *= T.exp2(bl - gate_row(gate, lg, i))
                T.gemm(a_s, q_s, b_dq, transpose_A=True)
                for i, j in T.Parallel(BT, KP):
                    if i < nvalid and j < K:
                        dk[i_v, t0 + i, i_h, j] = b_dq[i, j]
                # dv_j = 2^(bL-b_j) k_j dh + scale sum_{i>=j} 2^(b_i-b_j) (q_i . k_j) do_i
                T.gemm(k_s, h_s, b_dv, clear_accum=True)
                T.gemm(k_s, q_s, b_a, transpose_B=True, clear_accum=True)
                for j, i in T.Parallel(BT, BT):
                    a_s[j, i] = T.if_then_else(
                        i >= j, b_a[j, i] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                    )
                for i, j in T.Parallel(BT, BV):
                    b_dv[i, j] *= T.exp2(bl - gate_row(gate, lg, i))
                    x_s[i, j] = do_s[i, j] * scale * T.exp2(gate_row(gate, lg, i))
                T.gemm(a_s, do_s, b_dv)
                for i, j in T.Parallel(BT, BV):
                    if i < nvalid and i_v * BV + j < V:
                        dv[t0 + i, i_h, i_v * BV + j] = b_dv[i, j]
                # dh <- 2^bL dh + sum_i 2^b_i scale q_i do_i^T
                if gate != "none":
                    for i, j in T.Parallel(KP, BV):
                        b_h[i, j] *= T.exp2(bl)
                T.gemm(q_s, x_s, b_h, transpose_A=True)

            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        dh0[i_nh, i, i_v * BV + j] = b_h[i, j]

    return fused_chunk_bwd


def fused_chunk_fwd(q, k, v, *, gate: str, g_gamma, scale: float, initial_state, output_final_state: bool, meta: SeqMeta):
    Ttot, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty_like(v)
    h0, use_h0 = state_or_dummy(initial_state, q, (K, V))
    ht = q.new_empty(meta.N * H if output_final_state else 1, K, V, dtype=torch.float32)
    kernel = get_kernel(fused_chunk_fwd_kernel, target_for(q.device), K=K, V=V, gate=gate, dtype=TORCH_TO_TL[q.dtype])
    kernel(q, k, v, g_gamma, h0, meta.cu, o, ht, scale, use_h0, int(output_final_state))
    return o, (ht.view(meta.N, H, K, V) if output_final_state else None)


def fused_chunk_bwd(q, k, v, do, dht, *, gate: str, g_gamma, scale: float, initial_state, meta: SeqMeta, BV: int = 64):
    Ttot, H, K = q.shape
    V = v.shape[-1]
    NV = cdiv(V, BV)
    h0, use_h0 = state_or_dummy(initial_state, q, (K, V))
    dht_, use_dht = state_or_dummy(dht, q, (K, V))
    dq = q.new_empty(NV, Ttot, H, K, dtype=torch.float32)
    dk = q.new_empty(NV, Ttot, H, K, dtype=torch.float32)
    dv = torch.empty_like(v)
    dh0 = torch.empty_like(h0)
    kernel = get_kernel(
        fused_chunk_bwd_kernel, target_for(q.device), K=K, V=V, gate=gate, dtype=TORCH_TO_TL[q.dtype], BV=BV
    )
    kernel(q, k, v, do, g_gamma, h0, dht_, meta.cu, dq, dk, dv, dh0, scale, use_h0, use_dht)
    dq = dq.sum(0) if NV > 1 else dq[0]
    dk = dk.sum(0) if NV > 1 else dk[0]
    dh0 = dh0.view(meta.N, H, K, V).to(initial_state.dtype) if use_h0 else None
    return dq.to(q.dtype), dk.to(k.dtype), dv, dh0
