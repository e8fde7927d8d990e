"""chunk_gla: GLA's per-key log gate in chunks of BT = 64 tokens.

With G_i[k] the chunk-local cumulative log2 gate of row i (`gc` `[Ttot, H, K]` fp32, rows past the sequence end repeat
the last valid row) and h[c] the state entering chunk c (`common.chunk_h` with gate "gk"):
  o_i = scale * (q_i 2^G_i) h[c] + sum_{j <= i} A_ij v_j,   A_ij = scale * sum_k q_i[k] k_j[k] 2^(G_i[k] - G_j[k]).
A is built per key tile by `common.key_gate.key_gated_scores` (one matmul referenced at the middle row while the
chunk's decay span allows, 16-token sub-chunks beyond it, as fla).
The backward mirrors it (the same choice per key tile): dA_ij = scale do_i . v_j (j <= i);
dv = A^T do + (k 2^(gL - G)) dh[c]; dq, dk from dA by `common.key_gate.key_gated_grads` plus the inter-chunk
terms scale 2^G_i (do_i h[c]^T) and 2^(gL - G_j) (v_j dh[c]^T); dg per key in the chunk-local form of
`common.cumsum.per_key_gate_grad_chunk` from r = q dq - k dk (which the dq/dk kernel writes from its fp32 dq, dk)
and the chunk states: no sum runs along the whole sequence, so rounding errors of r do not add up with T.
Every block walks K in BK-wide tiles, so shared memory does not grow with K.
"""

import tilelang.language as T
import torch

from ...autotune.configs import BT
from ...autotune.resolve import tile_config
from ..common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from ..common.cumsum import chunk_gate_cumsum, per_key_gate_grad_chunk
from ..common.gates import head_decay
from ..common.key_gate import key_gated_grads, key_gated_scores, scores_entry, span_limit_for
from ..common.ranges import chunk_dh_range_ends, chunk_h_range_starts, state_pass_ranges
from ..common.utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, seq_meta, target_for


@T.macro
def _load_chunk_qkg(q, k, gc, q_s, k_s, g_s, t0, nvalid, i_h, kk, K, BT, BK, q_shift, nq):
    """q, k and the cumulative log2 gates of key tile kk; rows past the sequence end: zero q, k and the last valid
    row's gates (so every exponent the stages form stays <= 0 there too). The query rows are read `q_shift` tokens
    later (row i: token t0 + q_shift + i), the first `nq` of them."""
    for i, j in T.Parallel(BT, BK):
        q_s[i, j] = T.if_then_else(i < nq and kk * BK + j < K, q[t0 + q_shift + i, i_h, kk * BK + j], 0)
        k_s[i, j] = T.if_then_else(i < nvalid and kk * BK + j < K, k[t0 + i, i_h, kk * BK + j], 0)
        g_s[i, j] = T.if_then_else(kk * BK + j < K, gc[t0 + T.min(i, nvalid - 1), i_h, kk * BK + j], 0)


def chunk_gla_fwd_o_kernel(
    K: int,
    V: int,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BC: int = 16,
    BK: int = 64,
    BV: int = 128,
    threads: int = 256,
    bonus: bool = False,
):
    """`bonus`: RWKV6's form (`kernels/rwkv6`). The query rows are read one token later (row i: q[t0 + i + 1], zero
    past the sequence), so row i reads the state after token t0 + i; its output goes to token t0 + i + 1 with the
    bonus scale (sum_k q u k[t0 + i + 1]) v[t0 + i + 1] added (`u` `[H, K]`). A sequence's first token is not written
    (the caller's). Without it `u` is not read."""
    BK = min(BK, pad_dim(K))
    BV = min(BV, pad_dim(V))
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    span_limit = span_limit_for(dtype)
    qs = 1 if bonus else 0
    Ttot, H, N, NT, NA = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NA")

    @T.prim_func
    def chunk_gla_fwd_o(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        h: T.Tensor([NT, H, K, V], h_dtype),
        gc: T.Tensor([Ttot, H, K], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        o: T.Tensor([Ttot, H, V], dtype),
        A: T.Tensor([NA, H, BT], "float32"),
        u: T.Tensor([H, K], "float32"),
        scale: T.float32,
        store_A: T.int32,
    ):
        # chunks in the first grid dimension (the other two stop at 65535), V tiles fastest
        with T.Kernel(NV * NT, H, threads=threads) as (i_vc, i_h):
            i_v, i_c = i_vc % NV, i_vc // NV
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            nq = T.min(cu[i_n + 1] - t0 - qs, BT)

            q_s = T.alloc_shared([BT, BK], dtype)
            k_s = T.alloc_shared([BT, BK], dtype)
            g_s = T.alloc_shared([BT, BK], "float32")
            qg_s = T.alloc_shared([BT, BK], dtype)
            kg_s = T.alloc_shared([BT, BK], dtype)
            h_s = T.alloc_shared([BK, BV], h_dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            d_s = T.alloc_shared([BT, BC], "float32")
            b_o = T.alloc_fragment([BT, BV], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")
            b_p = T.alloc_fragment([BT, BK], "float32")
            b_r = T.alloc_fragment([BT], "float32")
            b_sp = T.alloc_fragment([BK], "float32")
            b_span = T.alloc_fragment([1], "float32")

            if bonus:
                b_bonus = T.alloc_fragment([BT], "float32")
                bonus_s = T.alloc_shared([BT], "float32")
                # two blocks per SM, as the plain form gets with its 128 registers
                T.annotate_min_blocks_per_sm(2)
                # sum_k q u k of each query's own token, t0 + i + 1, before the accumulators go live (inside the
                # main loop the extra registers halved the blocks per SM); q and k staged in qg_s / kg_s, coalesced
                T.clear(b_bonus)
                for kk in T.serial(NK):
                    for i, j in T.Parallel(BT, BK):
                        qg_s[i, j] = T.if_then_else(
                            i < nq and kk * BK + j < K, q[t0 + 1 + i, i_h, T.min(kk * BK + j, K - 1)], 0)
                        kg_s[i, j] = T.if_then_else(
                            i < nq and kk * BK + j < K, k[t0 + 1 + i, i_h, T.min(kk * BK + j, K - 1)], 0)
                    for i, j in T.Parallel(BT, BK):
                        b_p[i, j] = T.Cast("float32", qg_s[i, j]) * T.Cast("float32", kg_s[i, j]) * T.if_then_else(
                            kk * BK + j < K, u[i_h, T.min(kk * BK + j, K - 1)], 0)
                    T.reduce_sum(b_p, b_r, dim=1)
                    for i in T.Parallel(BT):
                        b_bonus[i] += b_r[i]
                for i in T.Parallel(BT):
                    bonus_s[i] = b_bonus[i] * scale
            T.clear(b_o)
            T.clear(b_a)
            for i, j in T.Parallel(BT, BC):
                d_s[i, j] = 0
            for kk in T.serial(NK):
                _load_chunk_qkg(q, k, gc, q_s, k_s, g_s, t0, nvalid, i_h, kk, K, BT, BK, qs, nq)
                for i, j in T.Parallel(BK, BV):
                    h_s[i, j] = T.if_then_else(
                        kk * BK + i < K and i_v * BV + j < V, h[i_c, i_h, kk * BK + i, i_v * BV + j], 0
                    )
                # inter-chunk: (q_i 2^G_i) h[c]
                for i, j in T.Parallel(BT, BK):
                    qg_s[i, j] = q_s[i, j] * T.exp2(g_s[i, j])
                T.gemm(qg_s, h_s, b_o)
                key_gated_scores(q_s, k_s, g_s, qg_s, kg_s, b_a, b_p, b_r, d_s, b_sp, b_span, nvalid, span_limit, BT,
                                 BC, BK)

            # A = b_a (+ the elementwise diagonal blocks of the tiles that took the sub-chunk path), causal
            for i, j in T.Parallel(BT, BT):
                b_a[i, j] = T.if_then_else(j <= i, scale * scores_entry(b_a, d_s, i, j, BC), 0)
            T.copy(b_a, a_s)
            if store_A == 1 and i_v == 0:
                for i, j in T.Parallel(BT, BT):
                    if i < nvalid:
                        A[t0 + i, i_h, j] = b_a[i, j]
            for i, j in T.Parallel(BT, BV):
                v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
            for i, j in T.Parallel(BT, BV):
                b_o[i, j] *= scale
            T.gemm(a_s, v_s, b_o)
            if bonus:
                # the values of the queries' own tokens, staged in v_s (coalesced) once the gemm has read it
                for i, j in T.Parallel(BT, BV):
                    v_s[i, j] = T.if_then_else(
                        i < nq and i_v * BV + j < V, v[t0 + 1 + i, i_h, T.min(i_v * BV + j, V - 1)], 0)
                for i, j in T.Parallel(BT, BV):
                    if i < nq and i_v * BV + j < V:
                        o[t0 + 1 + i, i_h, i_v * BV + j] = b_o[i, j] + bonus_s[i] * T.Cast("float32", v_s[i, j])
            else:
                for i, j in T.Parallel(BT, BV):
                    if i < nvalid and i_v * BV + j < V:
                        o[t0 + i, i_h, i_v * BV + j] = b_o[i, j]

    return chunk_gla_fwd_o


def chunk_gla_bwd_dv_kernel(
    K: int,
    V: int,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BK: int = 64,
    BV: int = 64,
    threads: int = 128,
):
    BK = min(BK, pad_dim(K))
    BV = min(BV, pad_dim(V))
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def chunk_gla_bwd_dv(
        k: T.Tensor([Ttot, H, K], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        dh: T.Tensor([NT, H, K, V], h_dtype),
        gc: T.Tensor([Ttot, H, K], "float32"),
        A: T.Tensor([Ttot, H, BT], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dv: T.Tensor([Ttot, H, V], dtype),
    ):
        # chunks in the first grid dimension (the other two stop at 65535), V tiles fastest
        with T.Kernel(NV * NT, H, threads=threads) as (i_vc, i_h):
            i_v, i_c = i_vc % NV, i_vc // NV
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)

            a_s = T.alloc_shared([BT, BT], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            kg_s = T.alloc_shared([BT, BK], dtype)
            dh_s = T.alloc_shared([BK, BV], h_dtype)
            b_dv = T.alloc_fragment([BT, BV], "float32")

            for i, j in T.Parallel(BT, BT):
                a_s[i, j] = T.if_then_else(i < nvalid, A[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, BV):
                do_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, do[t0 + i, i_h, i_v * BV + j], 0)
            # intra-chunk: A^T do
            T.gemm(a_s, do_s, b_dv, transpose_A=True, clear_accum=True)
            # inter-chunk: (k_j 2^(gL - G_j)) dh[c]
            for kk in T.serial(NK):
                for i, j in T.Parallel(BT, BK):
                    kg_s[i, j] = T.if_then_else(
                        i < nvalid and kk * BK + j < K,
                        k[t0 + i, i_h, kk * BK + j]
                        * T.exp2(gc[t0 + nvalid - 1, i_h, kk * BK + j] - gc[t0 + i, i_h, kk * BK + j]),
                        0,
                    )
                for i, j in T.Parallel(BK, BV):
                    dh_s[i, j] = T.if_then_else(
                        kk * BK + i < K and i_v * BV + j < V, dh[i_c, i_h, kk * BK + i, i_v * BV + j], 0
                    )
                T.gemm(kg_s, dh_s, b_dv)
            for i, j in T.Parallel(BT, BV):
                if i < nvalid and i_v * BV + j < V:
                    dv[t0 + i, i_h, i_v * BV + j] = b_dv[i, j]

    return chunk_gla_bwd_dv


def chunk_gla_bwd_dqk_kernel(
    K: int,
    V: int,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BC: int = 16,
    BK: int = 64,
    BV: int = 128,
    threads: int = 256,
):
    BK = min(BK, pad_dim(K))
    BV = min(BV, pad_dim(V))
    NK, NV = cdiv(K, BK), cdiv(V, BV)
    span_limit = span_limit_for(dtype)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def chunk_gla_bwd_dqk(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        h: T.Tensor([NT, H, K, V], h_dtype),
        dh: T.Tensor([NT, H, K, V], h_dtype),
        gc: T.Tensor([Ttot, H, K], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dq: T.Tensor([Ttot, H, K], dtype),
        dk: T.Tensor([Ttot, H, K], dtype),
        r: T.Tensor([Ttot, H, K], "float32"),
        scale: T.float32,
    ):
        # chunks in the first grid dimension (the other two stop at 65535), K tiles fastest
        with T.Kernel(NK * NT, H, threads=threads) as (i_kc, i_h):
            i_k, i_c = i_kc % NK, i_kc // NK
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)

            v_s = T.alloc_shared([BT, BV], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([BK, BV], h_dtype)
            dh_s = T.alloc_shared([BK, BV], h_dtype)
            q_s = T.alloc_shared([BT, BK], dtype)
            k_s = T.alloc_shared([BT, BK], dtype)
            g_s = T.alloc_shared([BT, BK], "float32")
            x_s = T.alloc_shared([BT, BK], dtype)
            da_s = T.alloc_shared([BT, BT], "float32")
            dab_s = T.alloc_shared([BT, BT], dtype)
            b_da = T.alloc_fragment([BT, BT], "float32")
            b_dq = T.alloc_fragment([BT, BK], "float32")
            b_dk = T.alloc_fragment([BT, BK], "float32")
            b_x = T.alloc_fragment([BT, BK], "float32")
            b_sp = T.alloc_fragment([BK], "float32")
            b_span = T.alloc_fragment([1], "float32")

            T.clear(b_da)
            T.clear(b_dq)
            T.clear(b_dk)
            for iv in T.serial(NV):
                for i, j in T.Parallel(BT, BV):
                    v_s[i, j] = T.if_then_else(i < nvalid and iv * BV + j < V, v[t0 + i, i_h, iv * BV + j], 0)
                    do_s[i, j] = T.if_then_else(i < nvalid and iv * BV + j < V, do[t0 + i, i_h, iv * BV + j], 0)
                for i, j in T.Parallel(BK, BV):
                    h_s[i, j] = T.if_then_else(
                        i_k * BK + i < K and iv * BV + j < V, h[i_c, i_h, i_k * BK + i, iv * BV + j], 0
                    )
                    dh_s[i, j] = T.if_then_else(
                        i_k * BK + i < K and iv * BV + j < V, dh[i_c, i_h, i_k * BK + i, iv * BV + j], 0
                    )
                # dA = do v^T; dq += do h^T; dk += v dh^T
                T.gemm(do_s, v_s, b_da, transpose_B=True)
                T.gemm(do_s, h_s, b_dq, transpose_B=True)
                T.gemm(v_s, dh_s, b_dk, transpose_B=True)

            _load_chunk_qkg(q, k, gc, q_s, k_s, g_s, t0, nvalid, i_h, i_k, K, BT, BK, 0, nvalid)
            for i, j in T.Parallel(BT, BT):
                da_s[i, j] = T.if_then_else(j <= i, b_da[i, j] * scale, 0)
            for i, j in T.Parallel(BT, BK):
                b_dq[i, j] *= scale * T.exp2(g_s[i, j])
                b_dk[i, j] *= T.exp2(g_s[nvalid - 1, j] - g_s[i, j])

            key_gated_grads(da_s, q_s, k_s, g_s, x_s, dab_s, b_x, b_dq, b_dk, b_sp, b_span, nvalid, span_limit, BT, BC,
                            BK)

            # r = q dq - k dk from the fp32 gradients, the per-key gate's gradient before its sequence scan
            for i, j in T.Parallel(BT, BK):
                if i < nvalid and i_k * BK + j < K:
                    dq[t0 + i, i_h, i_k * BK + j] = b_dq[i, j]
                    dk[t0 + i, i_h, i_k * BK + j] = b_dk[i, j]
                    r[t0 + i, i_h, i_k * BK + j] = q_s[i, j] * b_dq[i, j] - k_s[i, j] * b_dk[i, j]

    return chunk_gla_bwd_dqk


# ---------------------------------------------------------------- launchers


def _kernel(factory, ref, **kw):
    return get_kernel(factory, target_for(ref.device), dtype=TORCH_TO_TL[ref.dtype], h_dtype=TORCH_TO_TL[ref.dtype],
                      **kw)


def key_gate_cumsum(g, g_gamma, meta: SeqMeta, act=None, **config):
    """the chunk-local cumulative log2 gates `[Ttot, H, K]` fp32 of the per-key gate `g` `[B, T, H, K]` (None: no
    decay) with an optional per-head constant `g_gamma` `[H]` added to every key channel; with `act` (KDA's
    `GateActivation`, A_log `[H]`, dt_bias `[H * K]`) the gates are its activation of `g`."""
    _, _, H, K = g.shape
    decay = head_decay(g_gamma, H, g.device)
    gc = chunk_gate_cumsum(g.reshape(-1, H * K).contiguous(), decay.repeat_interleave(K), meta, BT, act=act, group=K,
                           **config)
    return gc.view(-1, H, K)


def chunk_gla_fwd_o(q, k, v, h, gc, *, scale: float, meta: SeqMeta, store_A: bool, u=None, **config):
    """(o `[Ttot, H, V]` in q's dtype, A `[Ttot, H, BT]` fp32 (the scaled intra-chunk scores) or None). With the
    RWKV6 bonus `u` `[H, K]`: the kernel's `bonus` form (queries and outputs one token later; a sequence's first
    token is left unwritten)."""
    Ttot, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty_like(v)
    A = q.new_empty(Ttot if store_A else 1, H, BT, dtype=torch.float32)
    bonus = u is not None
    u = u.float().contiguous() if bonus else gc.new_empty(H, K)
    if meta.NT > 0:
        config = tile_config("chunk_gla_fwd_o", q, K=K, V=V, gate="gk", N=meta.N, overrides=config)
        _kernel(chunk_gla_fwd_o_kernel, q, K=K, V=V, BT=BT, bonus=bonus, **config)(
            q, k, v, h, gc, meta.cu, meta.chunk_indices, o, A, u, scale, int(store_A))
    return o, (A if store_A else None)


def chunk_gla_bwd_dqkv(q, k, v, do, h, dh, gc, A, *, scale: float, meta: SeqMeta, dv_config=None, dqk_config=None):
    """dq, dk, dv in the input dtype and r = q dq - k dk `[Ttot, H, K]` fp32 (from the fp32 dq, dk)."""
    K, V = q.shape[-1], v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    r = torch.empty_like(q, dtype=torch.float32)
    if meta.NT == 0:
        return dq, dk, dv, r
    dv_config = tile_config("chunk_gla_bwd_dv", q, K=K, V=V, gate="gk", N=meta.N, overrides=dv_config)
    dqk_config = tile_config("chunk_gla_bwd_dqk", q, K=K, V=V, gate="gk", N=meta.N, overrides=dqk_config)
    _kernel(chunk_gla_bwd_dv_kernel, q, K=K, V=V, BT=BT, **dv_config)(
        k, do, dh, gc, A, meta.cu, meta.chunk_indices, dv)
    _kernel(chunk_gla_bwd_dqk_kernel, q, K=K, V=V, BT=BT, **dqk_config)(
        q, k, v, do, h, dh, gc, meta.cu, meta.chunk_indices, dq, dk, r, scale)
    return dq, dk, dv, r


def _gate(g, q):
    return g if g is not None else torch.zeros_like(q, dtype=torch.float32)


def chunk_gla_fwd(q, k, v, *, g_gamma, scale, initial_state, output_final_state, cu_seqlens, g=None, u=None,
                  keep=None):
    """(o `[B, T, H, V]`, the final state or None); with RWKV6's bonus `u` the output kernel's `bonus` form (see
    `chunk_gla_fwd_o_kernel`: the sequences' first tokens are left unwritten). A dict `keep` receives the cumulative
    gates `gc` and the intra-chunk scores `A` for `chunk_gla_bwd` (which then skips recomputing them)."""
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    gc = key_gate_cumsum(_gate(g, q), g_gamma, meta)
    q_, k_, v_ = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    kw = dict(gate="gk", g_gamma=head_decay(None, H, q.device), gc=gc, meta=meta, BT=BT)
    # few long sequences: the state pass runs over chunk ranges from the combined range starts
    ranges = state_pass_ranges(q, v, meta, cu_seqlens, BT)
    skw, h0 = kw, initial_state
    if ranges is not None:
        h0, _ = chunk_h_range_starts(k_, v_, initial_state, ranges, **kw)
        skw = {**kw, "meta": ranges.meta}
    h, ht = chunk_fwd_h(k_, v_, initial_state=h0, output_final_state=output_final_state, **skw)
    if ht is not None and ranges is not None:
        ht = ht[ranges.last]
    o, A = chunk_gla_fwd_o(q_, k_, v_, h, gc, scale=scale, meta=meta, store_A=keep is not None, u=u)
    if keep is not None:
        keep.update(gc=gc, A=A)
    return o.view(B, T, H, -1), ht


def chunk_gla_bwd(q, k, v, do, dht, *, g_gamma, scale, initial_state, cu_seqlens, g=None, ht=None, gc=None,
                  A=None):
    """(dq, dk, dv, dh0 or None, dg or None); the states (with the final one, for dg) are recomputed, and so are the
    cumulative gates `gc` and the intra-chunk scores `A` unless given (`chunk_gla_fwd`'s `keep`); `ht` is accepted
    for a uniform launcher contract."""
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    if gc is None:
        gc = key_gate_cumsum(_gate(g, q), g_gamma, meta)
    q_, k_, v_, do_ = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), do.flatten(0, 1)
    kw = dict(gate="gk", g_gamma=head_decay(None, H, q.device), gc=gc, meta=meta, BT=BT)
    # over chunk ranges as the forward ran: the range starts again, the ranges' terminal gradients by the reverse
    # combine, then both passes over the ranges
    ranges = state_pass_ranges(q, v, meta, cu_seqlens, BT)
    skw, h0, dhe = kw, initial_state, dht
    if ranges is not None:
        h0, decays = chunk_h_range_starts(k_, v_, initial_state, ranges, **kw)
        dhe = chunk_dh_range_ends(q_, do_, dht, decays, ranges, scale=scale, **kw)
        skw = {**kw, "meta": ranges.meta}
    h, h_last = chunk_fwd_h(k_, v_, initial_state=h0, output_final_state=g is not None, **skw)
    if A is None:
        _, A = chunk_gla_fwd_o(q_, k_, v_, h, gc, scale=scale, meta=meta, store_A=True)
    dh, dh0 = chunk_bwd_dh(q_, do_, dhe, scale=scale, need_dh0=initial_state is not None, **skw)
    dq, dk, dv, r = chunk_gla_bwd_dqkv(q_, k_, v_, do_, h, dh, gc, A, scale=scale, meta=meta)
    if ranges is not None:
        dh0 = dh0[ranges.first[:-1].long()] if dh0 is not None else None
        h_last = h_last[ranges.last] if h_last is not None else None
    if dh0 is not None:
        dh0 = dh0.to(initial_state.dtype)
    dg = None
    if g is not None:
        dg = per_key_gate_grad_chunk(r, h, dh, h_last, meta=meta, dg_dtype=g.dtype).view_as(g)
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dh0, dg
