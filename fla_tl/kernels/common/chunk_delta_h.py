"""The delta rule's forward state pass (`chunk_delta_fwd_h`): the states entering each chunk and the corrected values.

With the WY pair of a chunk (`common.wy.wy_repr`: w = Ai diag(beta 2^b) K, u = Ai diag(beta) V) and S the state
entering it, the chunk's corrected values are v_new = u - w S, and then, as in `chunk_h` with v_new for v,
  S <- 2^bL S + sum_j 2^(bL - b_j) k_j v_new_j^T,
with b the chunk-local cumulative log2 gates (gate "g") or zero (gate "none"). The output is `chunk_o.chunk_fwd_o` on
(q, k, v_new, h) with the same gate. One block per (V tile, sequence, head) walks the sequence with the whole [K, BV]
state in registers (w S needs every key row). Built and compile-tested; not yet run on a GPU or used by the ops.
"""

import tilelang.language as T
import torch

from .gates import gate_last, gate_load, gate_or_dummy, gate_row, gate_state, head_decay
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, state_or_dummy, target_for


def chunk_delta_fwd_h_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 64,
    threads: int = 128,
):
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")
    NH0, NHT = T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def chunk_delta_fwd_h(
        k: T.Tensor([Ttot, H, K], dtype),
        w: T.Tensor([Ttot, H, K], dtype),
        u: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H], "float32"),
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
            w_s = T.alloc_shared([BT, KP], dtype)
            h_s = T.alloc_shared([KP, BV], dtype)
            vg_s = T.alloc_shared([BT, BV], dtype)
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_v = T.alloc_fragment([BT, BV], "float32")

            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        b_h[i, j] = h0[i_nh, i, i_v * BV + j]

            for c in T.serial(T.ceildiv(eos - bos, BT)):
                t0 = bos + c * BT
                nvalid = T.min(eos - t0, BT)
                gate_load(gate, lg, gc, t0, nvalid, i_h, BT)
                bl = gate_last(gate, lg, nvalid)
                for i, j in T.Parallel(BT, KP):
                    k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                    w_s[i, j] = T.if_then_else(i < nvalid and j < K, w[t0 + i, i_h, j], 0)
                # the state entering chunk c, stored and staged for w S
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        h[boc + c, i_h, i, i_v * BV + j] = b_h[i, j]
                T.copy(b_h, h_s)
                # v_new = u - w S   [BT, BV]
                T.gemm(w_s, h_s, b_v, clear_accum=True)
                for i, j in T.Parallel(BT, BV):
                    b_v[i, j] = T.if_then_else(
                        i < nvalid and i_v * BV + j < V, u[t0 + i, i_h, i_v * BV + j] - b_v[i, j], 0)
                for i, j in T.Parallel(BT, BV):
                    if i < nvalid and i_v * BV + j < V:
                        v_new[t0 + i, i_h, i_v * BV + j] = b_v[i, j]
                    vg_s[i, j] = b_v[i, j] * T.exp2(bl - gate_row(gate, lg, i))
                if gate != "none":
                    for i, j in T.Parallel(KP, BV):
                        b_h[i, j] *= T.exp2(bl)
                T.gemm(k_s, vg_s, b_h, transpose_A=True)

            if store_ht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        ht[i_nh, i, i_v * BV + j] = b_h[i, j]

    return chunk_delta_fwd_h


def chunk_delta_fwd_h(k, w, u, *, gate: str, gc, initial_state, output_final_state: bool, meta: SeqMeta,
                      BT: int = 64, **config):
    """(states entering each chunk `[NT, H, K, V]` in k's dtype, corrected values v_new `[Ttot, H, V]` in u's dtype,
    final state fp32 `[N, H, K, V]` or None); k, w `[Ttot, H, K]` and u `[Ttot, H, V]` per value head, gc `[Ttot, H]`
    for gate "g"."""
    Ttot, H, K = k.shape
    V = u.shape[-1]
    h = k.new_empty(meta.NT, H, K, V)
    v_new = torch.empty_like(u)
    ht = k.new_empty(meta.N * H if output_final_state else 1, K, V, dtype=torch.float32)
    h0, use_h0 = state_or_dummy(initial_state, k, (K, V))
    if meta.NT > 0:
        kernel = get_kernel(chunk_delta_fwd_h_kernel, target_for(k.device), K=K, V=V, gate=gate,
                            dtype=TORCH_TO_TL[k.dtype], BT=BT, **config)
        kernel(k, w, u, head_decay(None, H, k.device), gate_or_dummy(gc, k), h0, meta.cu, meta.chunk_offsets, h,
               v_new, ht, use_h0, int(output_final_state))
    elif output_final_state:
        ht = h0 if use_h0 else ht.zero_()
    return h, v_new, (ht.view(meta.N, H, K, V) if output_final_state else None)
