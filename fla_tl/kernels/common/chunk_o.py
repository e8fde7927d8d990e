"""Chunk-parallel stages: the output pass (`chunk_fwd_o`) and the gradient passes (`chunk_bwd_dv`, `chunk_bwd_dqk`).

Each block owns one chunk of one sequence and head. The state entering chunk c (`h[c]`) and the gradient of the
state leaving it (`dh[c]`) come from `chunk_h`. With b_i the in-chunk log2 decay through row i (see `chunk_h`):
  o_i  = scale * (2^b_i q_i h[c] + sum_{j<=i} 2^(b_i-b_j) (q_i . k_j) v_j)
  dv_j = 2^(bL-b_j) k_j dh[c] + scale * sum_{i>=j} 2^(b_i-b_j) (q_i . k_j) do_i
  dq_i = scale * (2^b_i do_i h[c]^T + sum_{j<=i} 2^(b_i-b_j) (do_i . v_j) k_j)
  dk_j = 2^(bL-b_j) v_j dh[c]^T + scale * sum_{i>=j} 2^(b_i-b_j) (do_i . v_j) q_i
"""

import tilelang.language as T
import torch

from .gates import gate_last, gate_load, gate_or_dummy, gate_row, gate_state
from ...autotune.resolve import tile_config
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, target_for


def chunk_fwd_o_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 64,
    threads: int = 128,
):
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")

    @T.prim_func
    def chunk_fwd_o(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        h: T.Tensor([NT, H, K, V], h_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        o: T.Tensor([Ttot, H, V], dtype),
        scale: T.float32,
    ):
        # chunks in the first grid dimension (the other two stop at 65535), V tiles fastest
        with T.Kernel(NV * NT, H, threads=threads) as (i_vc, i_h):
            i_v, i_c = i_vc % NV, i_vc // NV
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)
            gate_load(gate, lg, gc, t0, nvalid, i_h, BT)

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([KP, BV], h_dtype)
            s_s = T.alloc_shared([BT, BT], dtype)
            b_o = T.alloc_fragment([BT, BV], "float32")
            b_s = T.alloc_fragment([BT, BT], "float32")

            for i, j in T.Parallel(BT, KP):
                q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, BV):
                v_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, v[t0 + i, i_h, i_v * BV + j], 0)
            for i, j in T.Parallel(KP, BV):
                h_s[i, j] = T.if_then_else(i < K and i_v * BV + j < V, h[i_c, i_h, i, i_v * BV + j], 0)

            T.gemm(q_s, h_s, b_o, clear_accum=True)
            T.gemm(q_s, k_s, b_s, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(BT, BT):
                s_s[i, j] = T.if_then_else(
                    i >= j, b_s[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                )
            for i, j in T.Parallel(BT, BV):
                b_o[i, j] *= scale * T.exp2(gate_row(gate, lg, i))
            T.gemm(s_s, v_s, b_o)

            for i, j in T.Parallel(BT, BV):
                if i < nvalid and i_v * BV + j < V:
                    o[t0 + i, i_h, i_v * BV + j] = b_o[i, j]

    return chunk_fwd_o


def chunk_bwd_dv_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 64,
    threads: int = 128,
):
    KP = pad_dim(K)
    NV = cdiv(V, BV)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")

    @T.prim_func
    def chunk_bwd_dv(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        dh: T.Tensor([NT, H, K, V], h_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dv: T.Tensor([Ttot, H, V], dtype),
        scale: T.float32,
    ):
        # chunks in the first grid dimension (the other two stop at 65535), V tiles fastest
        with T.Kernel(NV * NT, H, threads=threads) as (i_vc, i_h):
            i_v, i_c = i_vc % NV, i_vc // NV
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)
            gate_load(gate, lg, gc, t0, nvalid, i_h, BT)
            bl = gate_last(gate, lg, nvalid)

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            dh_s = T.alloc_shared([KP, BV], h_dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            b_dv = T.alloc_fragment([BT, BV], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")

            for i, j in T.Parallel(BT, KP):
                q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, BV):
                do_s[i, j] = T.if_then_else(i < nvalid and i_v * BV + j < V, do[t0 + i, i_h, i_v * BV + j], 0)
            for i, j in T.Parallel(KP, BV):
                dh_s[i, j] = T.if_then_else(i < K and i_v * BV + j < V, dh[i_c, i_h, i, i_v * BV + j], 0)

            # b_a[j, i] = k_j . q_i, kept where i >= j
            T.gemm(k_s, q_s, b_a, transpose_B=True, clear_accum=True)
            T.gemm(k_s, dh_s, b_dv, clear_accum=True)
            for j, i in T.Parallel(BT, BT):
                a_s[j, i] = T.if_then_else(
                    i >= j, b_a[j, i] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                )
            for j, c in T.Parallel(BT, BV):
                b_dv[j, c] *= T.exp2(bl - gate_row(gate, lg, j))
            T.gemm(a_s, do_s, b_dv)

            for i, j in T.Parallel(BT, BV):
                if i < nvalid and i_v * BV + j < V:
                    dv[t0 + i, i_h, i_v * BV + j] = b_dv[i, j]

    return chunk_bwd_dv


def chunk_bwd_dqk_kernel(
    K: int,
    V: int,
    gate: str,
    dtype: str,
    h_dtype: str,
    # kernel config
    BT: int = 64,
    BK: int = 128,
    BV: int = 64,
    num_stages: int = 2,
    threads: int = 256,
):
    BK = min(BK, pad_dim(K))
    NK = cdiv(K, BK)
    NV = cdiv(V, BV)
    # a per-token gate's gradient is formed from dq, dk (common.cumsum): keep them fp32 there
    dqk_dtype = "float32" if gate == "g" else dtype
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")

    @T.prim_func
    def chunk_bwd_dqk(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        h: T.Tensor([NT, H, K, V], h_dtype),
        dh: T.Tensor([NT, H, K, V], h_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dq: T.Tensor([Ttot, H, K], dqk_dtype),
        dk: T.Tensor([Ttot, H, K], dqk_dtype),
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

            q_s = T.alloc_shared([BT, BK], dtype)
            k_s = T.alloc_shared([BT, BK], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([BK, BV], h_dtype)
            dh_s = T.alloc_shared([BK, BV], h_dtype)
            ds_s = T.alloc_shared([BT, BT], dtype)
            b_dq = T.alloc_fragment([BT, BK], "float32")
            b_dk = T.alloc_fragment([BT, BK], "float32")
            b_ds = T.alloc_fragment([BT, BT], "float32")

            T.clear(b_dq)
            T.clear(b_dk)
            T.clear(b_ds)
            for iv in T.Pipelined(NV, num_stages=num_stages):
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
                # ds[i, j] = do_i . v_j; dq += do h^T; dk += v dh^T
                T.gemm(do_s, v_s, b_ds, transpose_B=True)
                T.gemm(do_s, h_s, b_dq, transpose_B=True)
                T.gemm(v_s, dh_s, b_dk, transpose_B=True)

            for i, j in T.Parallel(BT, BK):
                q_s[i, j] = T.if_then_else(i < nvalid and i_k * BK + j < K, q[t0 + i, i_h, i_k * BK + j], 0)
                k_s[i, j] = T.if_then_else(i < nvalid and i_k * BK + j < K, k[t0 + i, i_h, i_k * BK + j], 0)
            for i, j in T.Parallel(BT, BT):
                ds_s[i, j] = T.if_then_else(
                    i >= j, b_ds[i, j] * scale * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                )
            for i, j in T.Parallel(BT, BK):
                b_dq[i, j] *= scale * T.exp2(gate_row(gate, lg, i))
                b_dk[i, j] *= T.exp2(bl - gate_row(gate, lg, i))
            T.gemm(ds_s, k_s, b_dq)
            T.gemm(ds_s, q_s, b_dk, transpose_A=True)

            for i, j in T.Parallel(BT, BK):
                if i < nvalid and i_k * BK + j < K:
                    dq[t0 + i, i_h, i_k * BK + j] = b_dq[i, j]
                    dk[t0 + i, i_h, i_k * BK + j] = b_dk[i, j]

    return chunk_bwd_dqk


def _launch(factory, ref, *args, **kw):
    K, V = kw.pop("K"), kw.pop("V")
    kernel = get_kernel(
        factory,
        target_for(ref.device),
        K=K,
        V=V,
        dtype=TORCH_TO_TL[ref.dtype],
        h_dtype=TORCH_TO_TL[ref.dtype],
        **kw,
    )
    kernel(*args)


def chunk_fwd_o(q, k, v, h, *, gate: str, g_gamma, scale: float, meta: SeqMeta, BT: int = 64, gc=None, **config):
    """the output `[Ttot, H, V]` in q's dtype; `config` sets the tiles."""
    o = torch.empty_like(v)
    if meta.NT == 0:
        return o
    K, V = q.shape[-1], v.shape[-1]
    config = tile_config("chunk_fwd_o", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    _launch(
        chunk_fwd_o_kernel, q, q, k, v, h, g_gamma, gate_or_dummy(gc, q), meta.cu, meta.chunk_indices, o, scale,
        K=K, V=V, gate=gate, BT=BT, **config,
    )
    return o


def chunk_bwd_dqkv(
    q, k, v, do, h, dh, *, gate: str, g_gamma, scale: float, meta: SeqMeta, BT: int = 64, gc=None, dv_config=None,
    dqk_config=None,
):
    """dq, dk, dv in the input dtype (dq, dk in fp32 for gate "g"); `dv_config` / `dqk_config` set the tiles of the
    two kernels."""
    K, V = q.shape[-1], v.shape[-1]
    # fp32 dq, dk with a per-token gate (its gradient is formed from them; the caller casts)
    dqk_dtype = torch.float32 if gate == "g" else q.dtype
    dq, dk = torch.empty_like(q, dtype=dqk_dtype), torch.empty_like(k, dtype=dqk_dtype)
    dv = torch.empty_like(v)
    if meta.NT == 0:
        return dq, dk, dv
    dv_config = tile_config("chunk_bwd_dv", q, K=K, V=V, gate=gate, N=meta.N, overrides=dv_config)
    dqk_config = tile_config("chunk_bwd_dqk", q, K=K, V=V, gate=gate, N=meta.N, overrides=dqk_config)
    _launch(
        chunk_bwd_dv_kernel, q, q, k, do, dh, g_gamma, gate_or_dummy(gc, q), meta.cu, meta.chunk_indices, dv, scale,
        K=K, V=V, gate=gate, BT=BT, **dv_config,
    )
    _launch(
        chunk_bwd_dqk_kernel, q, q, k, v, do, h, dh, g_gamma, gate_or_dummy(gc, q), meta.cu, meta.chunk_indices, dq, dk, scale,
        K=K, V=V, gate=gate, BT=BT, **dqk_config,
    )
    return dq, dk, dv
