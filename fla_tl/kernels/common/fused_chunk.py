"""Fused chunk kernels: one block per (sequence, head, V tile) walks every chunk, the state kept in registers.

Same chunk algebra as `chunk_h` / `chunk_o`, with the state never written to memory. The backward's dq is
the forward kernel itself on (do, v, k) with the transposed state; a reverse sweep gives dk, dv and dh0 (carrying
dh), dk in fp32 partial sums over V tiles when V spans several.
"""

import tilelang.language as T
import torch

from .gates import gate_chunks, gate_last, gate_load_chunk, gate_row, gate_state
from ...autotune.configs import BT
# the tiles' shared-memory arithmetic and heuristic live with the tile configs; re-exported here
from ...autotune.configs import ELEMENT_SIZE, SMEM_BUDGET, fused_chunk_config, fused_chunk_smem  # noqa: F401
from ...autotune.resolve import tile_config
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, state_or_dummy, target_for


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
    smem_store: bool = True,
):
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    # full tiles load with pipelined async copies; padded head dims fall back to masked loads
    aligned = K == KP and V % BV == 0
    Ttot, H, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")
    NG = T.dynamic("NG")

    @T.prim_func
    def fused_chunk_fwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, BT], "float32"),
        h0: T.Tensor([NH0, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_offsets: T.Tensor([N + 1], "int32"),
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
            lg = gate_state(gate, g_gamma, i_h, BT)

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            vg_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([KP, BV], dtype)
            s_s = T.alloc_shared([BT, BT], dtype)
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_o = T.alloc_fragment([BT, BV], "float32")
            b_s = T.alloc_fragment([BT, BT], "float32")
            if smem_store:
                o_s = T.alloc_shared([BT, BV], dtype)

            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_h[i, j] = h0[i_nh, i, i_v * BV + j]

            for c in T.Pipelined(T.ceildiv(eos - bos, BT), num_stages=num_stages):
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                gate_load_chunk(gate, lg, gc, i_h * (NG // H) + chunk_offsets[i_n] + c, BT)
                # rows past the sequence end (another sequence's, or zero past Ttot) are masked below:
                # causally in s, by zero rows in vg, and by the masked store of o. The chunk's last gate is read
                # where it is used, not bound here: a read at the top of the iteration made the consumer wait for
                # every bulk copy of the stage before its first gemm
                if aligned:
                    T.copy(q[t0 : t0 + BT, i_h, 0:K], q_s)
                    T.copy(k[t0 : t0 + BT, i_h, 0:K], k_s)
                    T.copy(v[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], v_s)
                else:
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
                    vg_s[i, j] = T.if_then_else(
                        i < nvalid, v_s[i, j] * T.exp2(gate_last(gate, lg, nvalid) - gate_row(gate, lg, i)), 0)
                T.gemm(s_s, v_s, b_o)
                if smem_store and aligned and nvalid == BT:
                    # a full chunk stores through shared memory (one bulk copy); a partial one row by row
                    T.copy(b_o, o_s)
                    T.copy(o_s, o[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV])
                else:
                    for i, j in T.Parallel(BT, BV):
                        if i < nvalid and i_v * BV + j < V:
                            o[t0 + i, i_h, i_v * BV + j] = b_o[i, j]
                if gate != "none":
                    for i, j in T.Parallel(KP, BV):
                        b_h[i, j] *= T.exp2(gate_last(gate, lg, nvalid))
                T.gemm(k_s, vg_s, b_h, transpose_A=True)

            if store_ht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        ht[i_nh, i, i_v * BV + j] = b_h[i, j]

    return fused_chunk_fwd


def fused_chunk_bwd_dkv_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 64,
    num_stages: int = 2,
    threads: int = 128,
    smem_store: bool = True,
):
    """the reverse sweep of the backward: dk (partial over V tiles), dv and dh0, carrying dh in registers.

    dq needs no kernel of its own: it is the forward kernel run on (do, v, k) with the transposed state.
    """
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    aligned = K == KP and V % BV == 0
    # one V tile writes dk directly; several write fp32 partial sums
    dk_dtype = dtype if NV == 1 else "float32"
    Ttot, H, N, NHT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NHT"), T.dynamic("NG")

    @T.prim_func
    def fused_chunk_bwd_dkv(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, BT], "float32"),
        dht: T.Tensor([NHT, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_offsets: T.Tensor([N + 1], "int32"),
        dk: T.Tensor([NV, Ttot, H, K], dk_dtype),
        dv: T.Tensor([Ttot, H, V], dtype),
        dh0: T.Tensor([N * H, K, V], "float32"),
        scale: T.float32,
        use_dht: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            nc = T.ceildiv(eos - bos, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            x_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([KP, BV], dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            b_dh = T.alloc_fragment([KP, BV], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")
            b_dk = T.alloc_fragment([BT, KP], "float32")
            b_dv = T.alloc_fragment([BT, BV], "float32")
            if smem_store:
                dk_s = T.alloc_shared([BT, KP], dk_dtype)
                dv_s = T.alloc_shared([BT, BV], dtype)

            # b_dh: the gradient of the state leaving the current chunk; rows past the sequence end are masked
            # out of every sum over i
            T.clear(b_dh)
            if use_dht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_dh[i, j] = dht[i_nh, i, i_v * BV + j]
            for cc in T.Pipelined(nc, num_stages=num_stages):
                t0 = bos + (nc - 1 - cc) * BT
                nvalid = T.min(eos - t0, BT)
                gate_load_chunk(gate, lg, gc, i_h * (NG // H) + chunk_offsets[i_n] + nc - 1 - cc, BT)
                bl = gate_last(gate, lg, nvalid)
                if aligned:
                    T.copy(q[t0 : t0 + BT, i_h, 0:K], q_s)
                    T.copy(k[t0 : t0 + BT, i_h, 0:K], k_s)
                    T.copy(v[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], v_s)
                    T.copy(do[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], do_s)
                else:
                    for i, j in T.Parallel(BT, KP):
                        q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                        k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BV):
                        v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
                        do_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, do[t0 + i, i_h, i_v * BV + j], 0)
                T.copy(b_dh, h_s)
                # dk_j = 2^(bL-b_j) v_j dh^T + scale sum_{i>=j} 2^(b_i-b_j) (do_i . v_j) q_i
                T.gemm(v_s, h_s, b_dk, transpose_B=True, clear_accum=True)
                T.gemm(do_s, v_s, b_a, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BT):
                    a_s[i, j] = T.if_then_else(
                        i >= j and i < nvalid,
                        b_a[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)),
                        0,
                    )
                for i, j in T.Parallel(BT, KP):
                    b_dk[i, j] *= T.exp2(bl - gate_row(gate, lg, i))
                T.gemm(a_s, q_s, b_dk, transpose_A=True)
                if smem_store and aligned and nvalid == BT:
                    # a full chunk stores through shared memory (one bulk copy); a partial one row by row
                    T.copy(b_dk, dk_s)
                    T.copy(dk_s, dk[i_v, t0 : t0 + BT, i_h, 0:K])
                else:
                    for i, j in T.Parallel(BT, KP):
                        if i < nvalid and j < K:
                            dk[i_v, t0 + i, i_h, j] = b_dk[i, j]
                # dv_j = 2^(bL-b_j) k_j dh + scale sum_{i>=j} 2^(b_i-b_j) (q_i . k_j) do_i
                T.gemm(k_s, h_s, b_dv, clear_accum=True)
                T.gemm(k_s, q_s, b_a, transpose_B=True, clear_accum=True)
                for j, i in T.Parallel(BT, BT):
                    a_s[j, i] = T.if_then_else(
                        i >= j and i < nvalid,
                        b_a[j, i] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)),
                        0,
                    )
                for i, j in T.Parallel(BT, BV):
                    b_dv[i, j] *= T.exp2(bl - gate_row(gate, lg, i))
                    x_s[i, j] = T.if_then_else(i < nvalid, do_s[i, j] * scale * T.exp2(gate_row(gate, lg, i)), 0)
                T.gemm(a_s, do_s, b_dv)
                if smem_store and aligned and nvalid == BT:
                    T.copy(b_dv, dv_s)
                    T.copy(dv_s, dv[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV])
                else:
                    for i, j in T.Parallel(BT, BV):
                        if i < nvalid and i_v * BV + j < V:
                            dv[t0 + i, i_h, i_v * BV + j] = b_dv[i, j]
                # dh <- 2^bL dh + sum_i 2^b_i scale q_i do_i^T
                if gate != "none":
                    for i, j in T.Parallel(KP, BV):
                        b_dh[i, j] *= T.exp2(bl)
                T.gemm(q_s, x_s, b_dh, transpose_A=True)

            for i, j in T.Parallel(KP, BV):
                if i < K and i_v * BV + j < V:
                    dh0[i_nh, i, i_v * BV + j] = b_dh[i, j]

    return fused_chunk_bwd_dkv


def fused_chunk_fwd(
    q,
    k,
    v,
    *,
    gate: str,
    g_gamma,
    scale: float,
    initial_state,
    output_final_state: bool,
    meta: SeqMeta,
    gc=None,
    **config,
):
    """the output `[Ttot, H, V]` in q's dtype and the final state (fp32) or None; `config` overrides the tiles."""
    Ttot, H, K = q.shape
    V = v.shape[-1]
    config = tile_config("fused_chunk_fwd", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    o = torch.empty_like(v)
    h0, use_h0 = state_or_dummy(initial_state, q, (K, V))
    ht = q.new_empty(meta.N * H if output_final_state else 1, K, V, dtype=torch.float32)
    kernel = get_kernel(
        fused_chunk_fwd_kernel, target_for(q.device), K=K, V=V, gate=gate, dtype=TORCH_TO_TL[q.dtype], **config
    )
    gcc = gate_chunks(gc, meta, H, config.get("BT", BT), q)
    kernel(q, k, v, g_gamma, gcc, h0, meta.cu, meta.chunk_offsets, o, ht, scale, use_h0, int(output_final_state))
    return o, (ht.view(meta.N, H, K, V) if output_final_state else None)


def fused_chunk_bwd(
    q, k, v, do, dht, *, gate: str, g_gamma, scale: float, initial_state, meta: SeqMeta, gc=None, **config
):
    """dq, dk, dv in the input dtype and dh0 (initial_state's dtype) or None; `config` overrides the dk/dv tiles."""
    Ttot, H, K = q.shape
    V = v.shape[-1]
    config = tile_config("fused_chunk_bwd_dkv", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    # dq: the forward recurrence with (q, k, v) -> (do, v, k) and the transposed state
    h0t = None if initial_state is None else initial_state.transpose(-1, -2)
    dq, _ = fused_chunk_fwd(
        do,
        v,
        k,
        gate=gate,
        g_gamma=g_gamma,
        scale=scale,
        initial_state=h0t,
        output_final_state=False,
        meta=meta,
        gc=gc,
    )
    NV = cdiv(V, config["BV"])
    dht_, use_dht = state_or_dummy(dht, q, (K, V))
    dk = q.new_empty(NV, Ttot, H, K, dtype=q.dtype if NV == 1 else torch.float32)
    dv = torch.empty_like(v)
    dh0 = q.new_empty(meta.N * H, K, V, dtype=torch.float32)
    kernel = get_kernel(
        fused_chunk_bwd_dkv_kernel,
        target_for(q.device),
        K=K,
        V=V,
        gate=gate,
        dtype=TORCH_TO_TL[q.dtype],
        **config,
    )
    gcc = gate_chunks(gc, meta, H, config.get("BT", BT), q)
    kernel(q, k, v, do, g_gamma, gcc, dht_, meta.cu, meta.chunk_offsets, dk, dv, dh0, scale, use_dht)
    dk = dk[0] if NV == 1 else dk.sum(0).to(k.dtype)
    dh0 = dh0.view(meta.N, H, K, V).to(initial_state.dtype) if initial_state is not None else None
    return dq, dk, dv, dh0
