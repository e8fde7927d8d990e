"""The delta rule's fused forward: one block per (V tile, sequence, head) walks every chunk with the state in
registers and writes only the output (and the final state).

Per chunk, with the WY pair w, u of `common.wy` and S the state entering it (b the chunk-local cumulative log2 gates,
zero for gate "none"):
  v_new = u - w S,   o = scale * (diag(2^b) Q S + (Q K^T * 2^(b_i - b_j), i >= j) v_new),
  S <- 2^bL S + (diag(2^(bL - b)) K)^T v_new,
i.e. `chunk_delta_h.chunk_delta_fwd_h` and `chunk_o.chunk_fwd_o` in one pass, without writing the states or v_new.
Rows past a sequence's end only reach output rows that are not stored, and are zeroed before the state update.
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from .gates import gate_chunks, gate_last, gate_load_chunk, gate_row, gate_state, head_decay
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, state_or_dummy, target_for


def fused_chunk_delta_fwd_kernel(
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
    # full tiles load with pipelined async copies; padded head dims fall back to masked loads
    aligned = K == KP and V % BV == 0
    Ttot, H, N, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NG")
    NH0, NHT = T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def fused_chunk_delta_fwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        w: T.Tensor([Ttot, H, K], dtype),
        u: T.Tensor([Ttot, H, V], dtype),
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
            w_s = T.alloc_shared([BT, KP], dtype)
            u_s = T.alloc_shared([BT, BV], dtype)
            vn_s = T.alloc_shared([BT, BV], dtype)
            vg_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([KP, BV], dtype)
            s_s = T.alloc_shared([BT, BT], dtype)
            o_s = T.alloc_shared([BT, BV], dtype)
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_v = T.alloc_fragment([BT, BV], "float32")
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
                gate_load_chunk(gate, lg, gc, i_h * (NG // H) + chunk_offsets[i_n] + c, BT)
                # the chunk's last gate is read where it is used (see `fused_chunk`: bound here, its read made the
                # consumer wait for every bulk copy of the stage first)
                if aligned:
                    T.copy(k[t0 : t0 + BT, i_h, 0:K], k_s)
                    T.copy(q[t0 : t0 + BT, i_h, 0:K], q_s)
                    T.copy(w[t0 : t0 + BT, i_h, 0:K], w_s)
                    T.copy(u[t0 : t0 + BT, i_h, i_v * BV : (i_v + 1) * BV], u_s)
                else:
                    for i, j in T.Parallel(BT, KP):
                        q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                        k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                        w_s[i, j] = T.if_then_else(i < nvalid and j < K, w[t0 + i, i_h, j], 0)
                    for i, j in T.Parallel(BT, BV):
                        u_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, u[t0 + i, i_h, i_v * BV + j], 0)
                T.copy(b_h, h_s)
                # v_new = u - w S; o = q S (scaled below) + the causal scores times v_new
                T.gemm(w_s, h_s, b_v, clear_accum=True)
                T.gemm(q_s, h_s, b_o, clear_accum=True)
                T.gemm(q_s, k_s, b_s, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BV):
                    b_v[i, j] = T.Cast("float32", u_s[i, j]) - b_v[i, j]
                for i, j in T.Parallel(BT, BV):
                    vn_s[i, j] = T.Cast(dtype, b_v[i, j])
                    vg_s[i, j] = T.if_then_else(
                        i < nvalid,
                        T.Cast(dtype, b_v[i, j] * T.exp2(gate_last(gate, lg, nvalid) - gate_row(gate, lg, i))), 0)
                for i, j in T.Parallel(BT, BT):
                    s_s[i, j] = T.if_then_else(
                        i >= j, b_s[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                    )
                for i, j in T.Parallel(BT, BV):
                    b_o[i, j] *= scale * T.exp2(gate_row(gate, lg, i))
                T.gemm(s_s, vn_s, b_o)
                if aligned and nvalid == BT:
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

    return fused_chunk_delta_fwd



def fused_chunk_delta_fwd(q, k, w, u, *, gate: str, gc, scale: float, initial_state, output_final_state: bool,
                          meta: SeqMeta, BT: int = 64, **config):
    """(o `[Ttot, H, V]` in q's dtype, final state fp32 `[N, H, K, V]` or None); q, k, w `[Ttot, H, K]`, u
    `[Ttot, H, V]` per value head, gc `[Ttot, H]` for gate "g"."""
    H, K = k.shape[1:]
    V = u.shape[-1]
    o = torch.empty_like(u)
    ht = k.new_empty(meta.N * H if output_final_state else 1, K, V, dtype=torch.float32)
    h0, use_h0 = state_or_dummy(initial_state, k, (K, V))
    if meta.NT > 0:
        config = tile_config("fused_chunk_delta_fwd", k, K=K, V=V, gate=gate, N=meta.N, overrides=config)
        kernel = get_kernel(fused_chunk_delta_fwd_kernel, target_for(k.device), K=K, V=V, gate=gate,
                            dtype=TORCH_TO_TL[k.dtype], BT=BT, **config)
        gcc = gate_chunks(gc, meta, H, BT, k)
        kernel(q, k, w, u, head_decay(None, H, k.device), gcc, h0, meta.cu, meta.chunk_offsets, o, ht, scale, use_h0,
               int(output_final_state))
    elif output_final_state:
        ht = h0 if use_h0 else ht.zero_()
    return o, (ht.view(meta.N, H, K, V) if output_final_state else None)


def fused_blocks(N: int, H: int, V: int, BV: int = 64) -> int:
    """the fused forward's grid size (sequences x heads x V tiles)."""
    return N * H * cdiv(V, BV)
