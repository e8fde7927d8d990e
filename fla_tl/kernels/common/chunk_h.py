"""Inter-chunk state passes: forward h (`chunk_fwd_h`) and backward dh (`chunk_bwd_dh`).

Gate options ("none", "gamma", "g": see `gates`) enter through the `gate_state` / `gate_load` / `gate_row` /
`gate_last` hooks. Gate "gk" is GLA's per-key log gate: `gc` is then `[Ttot, H, K]` (chunk-local cumulative log2
gates per key), the state decays per key row (h <- diag(2^gL) h) and the chunk's keys (forward) or queries
(backward) carry the per-key factors 2^(gL - g_i) / 2^(g_i) instead of the values.
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from .gates import gate_last, gate_load, gate_or_dummy, gate_row, gate_state
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, state_or_dummy, target_for


@T.macro
def _load_key_gates(gc, g_s, t0, nvalid, i_h, i_k, K, BT, BK):
    """the chunk's per-key cumulative log2 gates `[BT, BK]` (gate "gk"); rows past the sequence end repeat the last
    valid row. Loaded elementwise before the state store: that keeps the store with the consumer warps under
    TileLang's warp specialization (with an async copy here the producer took the store, with a private copy of the
    state that is never updated)."""
    for i, j in T.Parallel(BT, BK):
        if i_k * BK + j < K:
            g_s[i, j] = T.if_then_else(
                i < nvalid, gc[t0 + i, i_h, i_k * BK + j], gc[t0 + nvalid - 1, i_h, i_k * BK + j])
        else:
            g_s[i, j] = 0


def chunk_fwd_h_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BK: int = 64,
    BV: int = 64,
    num_stages: int = 2,
    threads: int = 128,
):
    KP = pad_dim(K)
    # full tiles load with pipelined async copies, the state split in [BK, BV] blocks (more blocks for few long
    # sequences); padded head dims fall back to masked loads and one K tile
    aligned = K == KP and K % BK == 0 and V % BV == 0
    BK = BK if aligned else KP
    NK, NV = cdiv(KP, BK), cdiv(V, BV)
    Ttot, H, N, NT, NH0, NHT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NH0"), T.dynamic("NHT")
    NG = T.dynamic("NG")
    gk = gate == "gk"
    gshape = [NG, H, K] if gk else [NG, H]

    @T.prim_func
    def chunk_fwd_h(
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor(gshape, "float32"),
        h0: T.Tensor([NH0, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_offsets: T.Tensor([N + 1], "int32"),
        h: T.Tensor([NT, H, K, V], h_dtype),
        ht: T.Tensor([NHT, K, V], "float32"),
        use_h0: T.int32,
        store_ht: T.int32,
    ):
        with T.Kernel(NV, NK, N * H, threads=threads) as (i_v, i_k, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            boc = chunk_offsets[i_n]
            lg = gate_state(gate, g_gamma, i_h, BT)

            k_s = T.alloc_shared([BT, BK], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            vg_s = T.alloc_shared([BT, BV], dtype)
            b_h = T.alloc_fragment([BK, BV], "float32")
            if gk:
                g_s = T.alloc_shared([BT, BK], "float32")
                kg_s = T.alloc_shared([BT, BK], dtype)

            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(BK, BV):
                    if i_k * BK + i < K and i_v * BV + j < V:
                        b_h[i, j] = h0[i_nh, i_k * BK + i, i_v * BV + j]

            for c in T.Pipelined(T.ceildiv(eos - bos, BT), num_stages=num_stages):
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                gate_load(gate, lg, gc, t0, nvalid, i_h, BT)
                bl = gate_last(gate, lg, nvalid)
                if gk:
                    _load_key_gates(gc, g_s, t0, nvalid, i_h, i_k, K, BT, BK)
                # state entering chunk c; rows past the sequence end are zeroed in vg
                if aligned and gk:
                    # an elementwise store: with T.copy, warp specialization hands it to the producer warps
                    for i, j in T.Parallel(BK, BV):
                        h[boc + c, i_h, i_k * BK + i, i_v * BV + j] = b_h[i, j]
                    T.copy(k[t0 : t0 + BT, i_h, i_k * BK : (i_k + 1) * BK], k_s)
                    T.copy(v[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], v_s)
                elif aligned:
                    T.copy(b_h, h[boc + c, i_h, i_k * BK : (i_k + 1) * BK, i_v * BV : (i_v + 1) * BV])
                    T.copy(k[t0 : t0 + BT, i_h, i_k * BK : (i_k + 1) * BK], k_s)
                    T.copy(v[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], v_s)
                else:
                    for i, j in T.Parallel(BK, BV):
                        if i < K and i_v * BV + j < V:
                            h[boc + c, i_h, i, i_v * BV + j] = b_h[i, j]
                    for i, j in T.Parallel(BT, BK):
                        k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BV):
                        v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
                if gk:
                    # k_i 2^(gL - g_i) per key; the state decays by 2^gL per key row (gL: the chunk's last row)
                    for i, j in T.Parallel(BT, BK):
                        kg_s[i, j] = T.if_then_else(i < nvalid, k_s[i, j] * T.exp2(g_s[nvalid - 1, j] - g_s[i, j]), 0)
                    for i, j in T.Parallel(BK, BV):
                        b_h[i, j] *= T.exp2(g_s[nvalid - 1, i])
                    T.gemm(kg_s, v_s, b_h, transpose_A=True)
                else:
                    for i, j in T.Parallel(BT, BV):
                        vg_s[i, j] = T.if_then_else(i < nvalid, v_s[i, j] * T.exp2(bl - gate_row(gate, lg, i)), 0)
                    if gate != "none":
                        for i, j in T.Parallel(BK, BV):
                            b_h[i, j] *= T.exp2(bl)
                    T.gemm(k_s, vg_s, b_h, transpose_A=True)

            if store_ht == 1:
                for i, j in T.Parallel(BK, BV):
                    if i_k * BK + i < K and i_v * BV + j < V:
                        ht[i_nh, i_k * BK + i, i_v * BV + j] = b_h[i, j]

    return chunk_fwd_h


def chunk_bwd_dh_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BK: int = 64,
    BV: int = 64,
    num_stages: int = 2,
    threads: int = 128,
):
    KP = pad_dim(K)
    aligned = K == KP and K % BK == 0 and V % BV == 0
    BK = BK if aligned else KP
    NK, NV = cdiv(KP, BK), cdiv(V, BV)
    Ttot, H, N, NT, NHT, NH0 = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NHT"), T.dynamic("NH0")
    NG = T.dynamic("NG")
    gk = gate == "gk"
    gshape = [NG, H, K] if gk else [NG, H]

    @T.prim_func
    def chunk_bwd_dh(
        q: T.Tensor([Ttot, H, K], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor(gshape, "float32"),
        dht: T.Tensor([NHT, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_offsets: T.Tensor([N + 1], "int32"),
        dh: T.Tensor([NT, H, K, V], h_dtype),
        dh0: T.Tensor([NH0, K, V], "float32"),
        scale: T.float32,
        use_dht: T.int32,
        store_dh0: T.int32,
    ):
        with T.Kernel(NV, NK, N * H, threads=threads) as (i_v, i_k, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            boc = chunk_offsets[i_n]
            nc = T.ceildiv(eos - bos, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)

            q_s = T.alloc_shared([BT, BK], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            dog_s = T.alloc_shared([BT, BV], dtype)
            b_dh = T.alloc_fragment([BK, BV], "float32")
            if gk:
                g_s = T.alloc_shared([BT, BK], "float32")
                qg_s = T.alloc_shared([BT, BK], dtype)

            T.clear(b_dh)
            if use_dht == 1:
                for i, j in T.Parallel(BK, BV):
                    if i_k * BK + i < K and i_v * BV + j < V:
                        b_dh[i, j] = dht[i_nh, i_k * BK + i, i_v * BV + j]

            for cc in T.Pipelined(nc, num_stages=num_stages):
                c = nc - 1 - cc
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                gate_load(gate, lg, gc, t0, nvalid, i_h, BT)
                bl = gate_last(gate, lg, nvalid)
                if gk:
                    _load_key_gates(gc, g_s, t0, nvalid, i_h, i_k, K, BT, BK)
                # gradient of the state leaving chunk c; rows past the sequence end are zeroed in dog
                if aligned and gk:
                    # an elementwise store: with T.copy, warp specialization hands it to the producer warps
                    for i, j in T.Parallel(BK, BV):
                        dh[boc + c, i_h, i_k * BK + i, i_v * BV + j] = b_dh[i, j]
                    T.copy(q[t0 : t0 + BT, i_h, i_k * BK : (i_k + 1) * BK], q_s)
                    T.copy(do[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], do_s)
                elif aligned:
                    T.copy(b_dh, dh[boc + c, i_h, i_k * BK : (i_k + 1) * BK, i_v * BV : (i_v + 1) * BV])
                    T.copy(q[t0 : t0 + BT, i_h, i_k * BK : (i_k + 1) * BK], q_s)
                    T.copy(do[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], do_s)
                else:
                    for i, j in T.Parallel(BK, BV):
                        if i < K and i_v * BV + j < V:
                            dh[boc + c, i_h, i, i_v * BV + j] = b_dh[i, j]
                    for i, j in T.Parallel(BT, BK):
                        q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BV):
                        do_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, do[t0 + i, i_h, i_v * BV + j], 0)
                if gk:
                    # q_i 2^(g_i) scale per key; the gradient decays by 2^gL per key row
                    for i, j in T.Parallel(BT, BK):
                        qg_s[i, j] = T.if_then_else(i < nvalid, q_s[i, j] * scale * T.exp2(g_s[i, j]), 0)
                    for i, j in T.Parallel(BK, BV):
                        b_dh[i, j] *= T.exp2(g_s[nvalid - 1, i])
                    T.gemm(qg_s, do_s, b_dh, transpose_A=True)
                else:
                    for i, j in T.Parallel(BT, BV):
                        dog_s[i, j] = T.if_then_else(i < nvalid, do_s[i, j] * scale * T.exp2(gate_row(gate, lg, i)), 0)
                    if gate != "none":
                        for i, j in T.Parallel(BK, BV):
                            b_dh[i, j] *= T.exp2(bl)
                    T.gemm(q_s, dog_s, b_dh, transpose_A=True)

            if store_dh0 == 1:
                for i, j in T.Parallel(BK, BV):
                    if i_k * BK + i < K and i_v * BV + j < V:
                        dh0[i_nh, i_k * BK + i, i_v * BV + j] = b_dh[i, j]

    return chunk_bwd_dh


def chunk_fwd_h(
    k,
    v,
    *,
    gate: str,
    g_gamma,
    initial_state,
    output_final_state: bool,
    meta: SeqMeta,
    BT: int = 64,
    gc=None,
    **config,
):
    """states entering each chunk `[NT, H, K, V]` (in k's dtype) and the final state (fp32) or None; `config` sets
    the tiles."""
    Ttot, H, K = k.shape
    V = v.shape[-1]
    h = k.new_empty(meta.NT, H, K, V)
    h0, use_h0 = state_or_dummy(initial_state, k, (K, V))
    ht = k.new_empty(meta.N * H if output_final_state else 1, K, V, dtype=torch.float32)
    config = tile_config("chunk_fwd_h", k, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    kernel = get_kernel(
        chunk_fwd_h_kernel,
        target_for(k.device),
        K=K,
        V=V,
        gate=gate,
        dtype=TORCH_TO_TL[k.dtype],
        h_dtype=TORCH_TO_TL[h.dtype],
        BT=BT,
        **config,
    )
    kernel(k, v, g_gamma, gate_or_dummy(gc, k), h0, meta.cu, meta.chunk_offsets, h, ht, use_h0,
           int(output_final_state))
    return h, (ht.view(meta.N, H, K, V) if output_final_state else None)


def chunk_bwd_dh(
    q,
    do,
    dht,
    *,
    gate: str,
    g_gamma,
    scale: float,
    need_dh0: bool,
    meta: SeqMeta,
    BT: int = 64,
    gc=None,
    **config,
):
    """gradients of the state leaving each chunk `[NT, H, K, V]` and of the initial state (fp32) or None; `config`
    sets the tiles."""
    Ttot, H, K = q.shape
    V = do.shape[-1]
    dh = q.new_empty(meta.NT, H, K, V)
    dht_, use_dht = state_or_dummy(dht, q, (K, V))
    dh0 = q.new_empty(meta.N * H if need_dh0 else 1, K, V, dtype=torch.float32)
    config = tile_config("chunk_bwd_dh", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    kernel = get_kernel(
        chunk_bwd_dh_kernel,
        target_for(q.device),
        K=K,
        V=V,
        gate=gate,
        dtype=TORCH_TO_TL[q.dtype],
        h_dtype=TORCH_TO_TL[dh.dtype],
        BT=BT,
        **config,
    )
    kernel(q, do, g_gamma, gate_or_dummy(gc, q), dht_, meta.cu, meta.chunk_offsets, dh, dh0, scale, use_dht,
           int(need_dh0))
    return dh, (dh0.view(meta.N, H, K, V) if need_dh0 else None)
