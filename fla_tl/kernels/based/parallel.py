"""Based / ReBased in the attention form: causal attention with a polynomial score and no softmax, tiled like flash
attention (K <= 128, V <= 256).

With s_ij = scale * q_i . k_j and j <= i:
  p_ij = 1 + s_ij + s_ij^2 / 2 (Based) or s_ij^2 (ReBased),   o_i = sum_j p_ij v_j,   z_i = sum_j p_ij
  dp_ij = do_i . v_j + dz_i,   ds_ij = dp_ij (1 + s_ij) (Based) or 2 dp_ij s_ij (ReBased)
  dq_i = scale * sum_j ds_ij k_j,   dk_j = scale * sum_i ds_ij q_i,   dv_j = sum_i p_ij do_i
o and z are unnormalised and fp32; the division by z + eps is PyTorch around the ops' kernel-level call.

Three kernels, each block on one (batch, head) and one tile of rows, recomputing the scores:
- forward: a block of BT queries walks the key blocks up to the causal diagonal (o per BV value columns);
- dq: the same walk, with do v^T for dp;
- dk, dv: a block of BT keys walks the query blocks from the diagonal to the end.
The scores, z and every accumulator are fp32; p and ds go to the second gemms in the input dtype (z is summed from
the fp32 p: ReBased's z has no constant term and can be tiny). Tiles are input-dtype gemms on tensor cores: exact
products with fp32 accumulation for bf16 / fp16, TF32 for fp32 inputs.
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from ..common.utils import TORCH_TO_TL, cdiv, get_kernel, pad_dim, target_for


def _score(based: bool, s):
    """p(s), s the scaled fp32 score."""
    return 1 + s + 0.5 * s * s if based else s * s


def _dscore(based: bool, s):
    """dp/ds."""
    return 1 + s if based else 2 * s


def parallel_based_fwd_kernel(
    K: int,
    V: int,
    based: bool,
    dtype: str,
    # kernel config
    BT: int = 64,
    BS: int = 64,
    BV: int = 128,
    num_stages: int = 2,
    threads: int = 128,
):
    KP = pad_dim(K)
    BV = min(BV, pad_dim(V))
    NV = cdiv(V, BV)
    B, L, H = T.dynamic("B"), T.dynamic("L"), T.dynamic("H")

    @T.prim_func
    def parallel_based_fwd(
        q: T.Tensor([B, L, H, K], dtype),
        k: T.Tensor([B, L, H, K], dtype),
        v: T.Tensor([B, L, H, V], dtype),
        o: T.Tensor([B, L, H, V], "float32"),
        z: T.Tensor([B, L, H], "float32"),
        scale: T.float32,
    ):
        with T.Kernel(T.ceildiv(L, BT), B * H, NV, threads=threads) as (i_x, i_bh, i_v):
            # the longest rows (last query blocks) start first
            i_t = T.ceildiv(L, BT) - 1 - i_x
            i_b, i_h = i_bh // H, i_bh % H
            t0 = i_t * BT
            v0 = i_v * BV

            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BS, KP], dtype)
            v_s = T.alloc_shared([BS, BV], dtype)
            p_s = T.alloc_shared([BT, BS], dtype)
            b_s = T.alloc_fragment([BT, BS], "float32")
            b_p = T.alloc_fragment([BT, BS], "float32")
            b_o = T.alloc_fragment([BT, BV], "float32")
            b_zs = T.alloc_fragment([BT], "float32")
            b_z = T.alloc_fragment([BT], "float32")

            for i, d in T.Parallel(BT, KP):
                q_s[i, d] = T.if_then_else(t0 + i < L and d < K, q[i_b, t0 + i, i_h, d], 0)
            T.clear(b_o)
            T.clear(b_z)
            for c in T.Pipelined(T.ceildiv(T.min(t0 + BT, L), BS), num_stages=num_stages):
                for j, d in T.Parallel(BS, KP):
                    k_s[j, d] = T.if_then_else(c * BS + j < L and d < K, k[i_b, c * BS + j, i_h, d], 0)
                for j, d in T.Parallel(BS, BV):
                    v_s[j, d] = T.if_then_else(c * BS + j < L and v0 + d < V, v[i_b, c * BS + j, i_h, v0 + d], 0)
                T.gemm(q_s, k_s, b_s, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BS):
                    b_s[i, j] = T.if_then_else(t0 + i >= c * BS + j, _score(based, b_s[i, j] * scale), 0)
                T.copy(b_s, p_s)
                if dtype == "float32":
                    # the TF32 gemm's accumulator layout does not reduce by rows (its sums mixed rows): sum the fp32
                    # copy in shared memory through a plain fragment
                    T.copy(p_s, b_p)
                    T.reduce_sum(b_p, b_zs, dim=1)
                else:
                    T.reduce_sum(b_s, b_zs, dim=1)
                for i in T.Parallel(BT):
                    b_z[i] += b_zs[i]
                T.gemm(p_s, v_s, b_o)

            for i, d in T.Parallel(BT, BV):
                if t0 + i < L and v0 + d < V:
                    o[i_b, t0 + i, i_h, v0 + d] = b_o[i, d]
            for i in T.Parallel(BT):
                if t0 + i < L and i_v == 0:
                    z[i_b, t0 + i, i_h] = b_z[i]

    return parallel_based_fwd


def parallel_based_bwd_dq_kernel(
    K: int,
    V: int,
    based: bool,
    dtype: str,
    # kernel config
    BT: int = 64,
    BS: int = 64,
    num_stages: int = 2,
    threads: int = 128,
):
    KP, VP = pad_dim(K), pad_dim(V)
    B, L, H = T.dynamic("B"), T.dynamic("L"), T.dynamic("H")

    @T.prim_func
    def parallel_based_bwd_dq(
        q: T.Tensor([B, L, H, K], dtype),
        k: T.Tensor([B, L, H, K], dtype),
        v: T.Tensor([B, L, H, V], dtype),
        do: T.Tensor([B, L, H, V], dtype),
        dz: T.Tensor([B, L, H], "float32"),
        dq: T.Tensor([B, L, H, K], dtype),
        scale: T.float32,
    ):
        with T.Kernel(T.ceildiv(L, BT), B * H, threads=threads) as (i_x, i_bh):
            i_t = T.ceildiv(L, BT) - 1 - i_x
            i_b, i_h = i_bh // H, i_bh % H
            t0 = i_t * BT

            q_s = T.alloc_shared([BT, KP], dtype)
            do_s = T.alloc_shared([BT, VP], dtype)
            dz_s = T.alloc_shared([BT], "float32")
            k_s = T.alloc_shared([BS, KP], dtype)
            v_s = T.alloc_shared([BS, VP], dtype)
            ds_s = T.alloc_shared([BT, BS], dtype)
            b_s = T.alloc_fragment([BT, BS], "float32")
            b_dp = T.alloc_fragment([BT, BS], "float32")
            b_dq = T.alloc_fragment([BT, KP], "float32")

            for i, d in T.Parallel(BT, KP):
                q_s[i, d] = T.if_then_else(t0 + i < L and d < K, q[i_b, t0 + i, i_h, d], 0)
            for i, d in T.Parallel(BT, VP):
                do_s[i, d] = T.if_then_else(t0 + i < L and d < V, do[i_b, t0 + i, i_h, d], 0)
            for i in T.Parallel(BT):
                dz_s[i] = T.if_then_else(t0 + i < L, dz[i_b, t0 + i, i_h], 0)
            T.clear(b_dq)
            for c in T.Pipelined(T.ceildiv(T.min(t0 + BT, L), BS), num_stages=num_stages):
                for j, d in T.Parallel(BS, KP):
                    k_s[j, d] = T.if_then_else(c * BS + j < L and d < K, k[i_b, c * BS + j, i_h, d], 0)
                for j, d in T.Parallel(BS, VP):
                    v_s[j, d] = T.if_then_else(c * BS + j < L and d < V, v[i_b, c * BS + j, i_h, d], 0)
                T.gemm(q_s, k_s, b_s, transpose_B=True, clear_accum=True)
                T.gemm(do_s, v_s, b_dp, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BS):
                    ds_s[i, j] = T.if_then_else(
                        t0 + i >= c * BS + j, (b_dp[i, j] + dz_s[i]) * _dscore(based, b_s[i, j] * scale), 0
                    )
                T.gemm(ds_s, k_s, b_dq)

            for i, d in T.Parallel(BT, KP):
                if t0 + i < L and d < K:
                    dq[i_b, t0 + i, i_h, d] = b_dq[i, d] * scale

    return parallel_based_bwd_dq


def parallel_based_bwd_dkv_kernel(
    K: int,
    V: int,
    based: bool,
    dtype: str,
    # kernel config
    BT: int = 64,
    BS: int = 64,
    num_stages: int = 2,
    threads: int = 128,
):
    KP, VP = pad_dim(K), pad_dim(V)
    B, L, H = T.dynamic("B"), T.dynamic("L"), T.dynamic("H")

    @T.prim_func
    def parallel_based_bwd_dkv(
        q: T.Tensor([B, L, H, K], dtype),
        k: T.Tensor([B, L, H, K], dtype),
        v: T.Tensor([B, L, H, V], dtype),
        do: T.Tensor([B, L, H, V], dtype),
        dz: T.Tensor([B, L, H], "float32"),
        dk: T.Tensor([B, L, H, K], dtype),
        dv: T.Tensor([B, L, H, V], dtype),
        scale: T.float32,
    ):
        # a block of BT keys (rows j) walks the query blocks (columns i) from the diagonal on; the first key blocks
        # have the longest walks and start first
        with T.Kernel(T.ceildiv(L, BT), B * H, threads=threads) as (i_t, i_bh):
            i_b, i_h = i_bh // H, i_bh % H
            t0 = i_t * BT
            c0 = t0 // BS

            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, VP], dtype)
            q_s = T.alloc_shared([BS, KP], dtype)
            do_s = T.alloc_shared([BS, VP], dtype)
            dz_s = T.alloc_shared([BS], "float32")
            p_s = T.alloc_shared([BT, BS], dtype)
            ds_s = T.alloc_shared([BT, BS], dtype)
            b_s = T.alloc_fragment([BT, BS], "float32")
            b_dp = T.alloc_fragment([BT, BS], "float32")
            b_dk = T.alloc_fragment([BT, KP], "float32")
            b_dv = T.alloc_fragment([BT, VP], "float32")

            for j, d in T.Parallel(BT, KP):
                k_s[j, d] = T.if_then_else(t0 + j < L and d < K, k[i_b, t0 + j, i_h, d], 0)
            for j, d in T.Parallel(BT, VP):
                v_s[j, d] = T.if_then_else(t0 + j < L and d < V, v[i_b, t0 + j, i_h, d], 0)
            T.clear(b_dk)
            T.clear(b_dv)
            for c in T.Pipelined(T.ceildiv(L, BS) - c0, num_stages=num_stages):
                for i, d in T.Parallel(BS, KP):
                    q_s[i, d] = T.if_then_else(
                        (c0 + c) * BS + i < L and d < K, q[i_b, (c0 + c) * BS + i, i_h, d], 0
                    )
                for i, d in T.Parallel(BS, VP):
                    do_s[i, d] = T.if_then_else(
                        (c0 + c) * BS + i < L and d < V, do[i_b, (c0 + c) * BS + i, i_h, d], 0
                    )
                for i in T.Parallel(BS):
                    dz_s[i] = T.if_then_else((c0 + c) * BS + i < L, dz[i_b, (c0 + c) * BS + i, i_h], 0)
                # b_s[j, i] = k_j . q_i, b_dp[j, i] = v_j . do_i
                T.gemm(k_s, q_s, b_s, transpose_B=True, clear_accum=True)
                T.gemm(v_s, do_s, b_dp, transpose_B=True, clear_accum=True)
                for j, i in T.Parallel(BT, BS):
                    p_s[j, i] = T.if_then_else(
                        (c0 + c) * BS + i >= t0 + j and (c0 + c) * BS + i < L, _score(based, b_s[j, i] * scale), 0
                    )
                    ds_s[j, i] = T.if_then_else(
                        (c0 + c) * BS + i >= t0 + j and (c0 + c) * BS + i < L,
                        (b_dp[j, i] + dz_s[i]) * _dscore(based, b_s[j, i] * scale),
                        0,
                    )
                T.gemm(p_s, do_s, b_dv)
                T.gemm(ds_s, q_s, b_dk)

            for j, d in T.Parallel(BT, KP):
                if t0 + j < L and d < K:
                    dk[i_b, t0 + j, i_h, d] = b_dk[j, d] * scale
            for j, d in T.Parallel(BT, VP):
                if t0 + j < L and d < V:
                    dv[i_b, t0 + j, i_h, d] = b_dv[j, d]

    return parallel_based_bwd_dkv


def _launch(factory, q, v, *args, based: bool, config: dict | None):
    """launch `factory` for q `[B, T, H, K]` and v on `args`; `config` overrides the resolved tile config
    (`fla_tl.autotune`, the factory's name without `_kernel`)."""
    B, L, H, K = q.shape
    V, dtype = v.shape[-1], TORCH_TO_TL[q.dtype]
    config = tile_config(factory.__name__.removesuffix("_kernel"), q.view(B * L, H, K), K=K, V=V, gate="none", N=B,
                         overrides=config)
    get_kernel(factory, target_for(q.device), K=K, V=V, based=based, dtype=dtype, **config)(*args)


def _output(shape, dtype, device) -> torch.Tensor:
    """an output the kernels fill (uninitialised; the tests swap in NaN-filled tensors)."""
    return torch.empty(shape, dtype=dtype, device=device)


def parallel_based_fwd(q, k, v, *, scale: float, based: bool, config: dict | None = None):
    """(o `[B, T, H, V]`, z `[B, T, H]`), both fp32 and unnormalised; q, k `[B, T, H, K]`, v contiguous, one dtype;
    `config` overrides the tile config."""
    B, L, H = q.shape[:3]
    o = _output((B, L, H, v.shape[-1]), torch.float32, q.device)
    z = _output((B, L, H), torch.float32, q.device)
    if o.numel() == 0:
        return o.zero_(), z.zero_()
    _launch(parallel_based_fwd_kernel, q, v, q, k, v, o, z, scale, based=based, config=config)
    return o, z


def parallel_based_bwd(q, k, v, do, dz, *, scale: float, based: bool, dq_config: dict | None = None,
                       dkv_config: dict | None = None):
    """(dq, dk, dv) in q's dtype; do `[B, T, H, V]` in q's dtype, dz `[B, T, H]` fp32, all contiguous; the configs
    override the two passes' tile configs."""
    dq, dk, dv = (_output(x.shape, x.dtype, x.device) for x in (q, k, v))
    if q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _launch(parallel_based_bwd_dq_kernel, q, v, q, k, v, do, dz, dq, scale, based=based, config=dq_config)
    _launch(parallel_based_bwd_dkv_kernel, q, v, q, k, v, do, dz, dk, dv, scale, based=based, config=dkv_config)
    return dq, dk, dv


__all__ = [
    "parallel_based_bwd",
    "parallel_based_bwd_dkv_kernel",
    "parallel_based_bwd_dq_kernel",
    "parallel_based_fwd",
    "parallel_based_fwd_kernel",
]
