"""Based (`fused_chunk_based`, K <= 16) chunk by chunk, the Taylor features formed on the fly from the keys and queries.

With s_ij = scale * q_i . k_j and j <= i, `p_ij = 1 + s_ij + s_ij^2 / 2 = phi(scale q_i) . phi(k_j)` for the features
  phi(x) = [1, x_a (a < K), x_a x_b (a < b), x_a^2 / sqrt(2)]          (F = 1 + K + K (K + 1) / 2 <= 153)
so causal Based is linear attention on phi: a state `h [V, F] = sum_j v_j phi(k_j)^T` and a normaliser state
`zs [F] = sum_j phi(k_j)` carry across chunks, and inside a chunk the scores are formed directly:
  o_i = phi(scale q_i) . h + sum_{j in chunk, j <= i} p_ij v_j,   z_i = phi(scale q_i) . zs + sum_{same j} p_ij.
Every feature is `c_f * xa_{i_f} * xa_{j_f}` over the augmented row `xa = [x, 1]` (`feature_tables`), so one
parallel loop with two table lookups builds a chunk's features in shared memory; the chain rule back to x uses a
second table: `dx_a = sum_b dc_ab * G_{f(a, b)} * xa_b`, G the features' gradient.

Kernels (one block per (batch, head) and V tile of BV, walking the chunks of BT tokens in order):
- forward: o and z, fp32 and unnormalised (the division by z + eps is PyTorch, as for the attention form);
- dq: the forward walk again, `G = do h + dz zs^T` for the inter-chunk part, `ds = (do v^T + dz) (1 + s)` inside;
- dk, dv: the walk from the last chunk, with the states' gradients `dh [V, F] = sum_{i later} do_i phi(q_i)^T` and
  `dzs = sum_{i later} dz_i phi(q_i)`: `dv_j = dh phi(k_j) + sum_i p_ij do_i`, `G_j = v_j dh + dzs`.
dq and dk are per V tile (fp32 `[NV, B, T, H, K]`, summed by the launcher); dz enters the V tile 0 only. The states,
the scores and every accumulator are fp32; the features, the states' copies and p go to the gemms in the input dtype
(TF32 for fp32 inputs), as fla's kernel does.
"""

import functools

import tilelang.language as T
import torch

from ...autotune.configs import BASED_CHUNK_MAX_K as MAX_K
from ...autotune.configs import based_feature_dims as feature_dims
from ...autotune.resolve import tile_config
from ..common.utils import TORCH_TO_TL, cdiv, get_kernel, target_for


@functools.lru_cache(maxsize=32)
def feature_tables(K: int) -> tuple[list, list, list, list, list]:
    """(fi, fj, fc, pi, pc) for head dim K over the augmented row `xa = [x_0 .. x_{K-1}, 1]`:
    - feature f (of `feature_dims(K)`) is `fc[f] * xa[fi[f]] * xa[fj[f]]`; the padding features have fc = 0;
    - the chain rule: `dx_a = sum_{b <= K} pc[a (K + 1) + b] * G[pi[a (K + 1) + b]] * xa[b]` for a < K (the rows
      a >= K, up to 16, are zero)."""
    pairs = [(K, K, 1.0)] + [(a, K, 1.0) for a in range(K)]
    pairs += [(a, b, 1.0) for a in range(K) for b in range(a + 1, K)]
    pairs += [(a, a, 0.5 ** 0.5) for a in range(K)]
    index = {(a, b): f for f, (a, b, _) in enumerate(pairs)}
    pairs += [(K, K, 0.0)] * (feature_dims(K) - len(pairs))
    fi, fj, fc = (list(x) for x in zip(*pairs))
    KA, KP = K + 1, _kp(K)
    pi, pc = [0] * (KP * KA), [0.0] * (KP * KA)
    for a in range(K):
        for b in range(KA):
            f = index[(min(a, b), max(a, b))]
            pi[a * KA + b], pc[a * KA + b] = f, fc[f] * (2.0 if a == b else 1.0)
    return fi, fj, fc, pi, pc


def _kp(K: int) -> int:
    """the key tile's width: K padded to 16 (one mma k-step)."""
    return cdiv(K, 16) * 16


def _taylor(s):
    return 1 + s + 0.5 * s * s


def _stages(K: int, V: int, dtype: str, BT: int, BV: int):
    """the T.macro stages the three kernels share: the tables' loads, the chunk's features and gradient tiles, the key
    features' sums and the chain rule."""
    KP, KA, FP = _kp(K), K + 1, feature_dims(K)

    @T.macro
    def load_tables(fi, fj, fc, fi_s, fj_s, fc_s):
        for f in T.Parallel(FP):
            fi_s[f] = fi[f]
            fj_s[f] = fj[f]
            fc_s[f] = fc[f]

    @T.macro
    def load_chain_tables(pi, pc, pi_s, pc_s):
        for e in T.Parallel(KP * KA):
            pi_s[e] = pi[e]
            pc_s[e] = pc[e]

    @T.macro
    def features(x, i_b, i_h, t0, L, row_scale, x_s, xa_s, f_s, fi_s, fj_s, fc_s):
        """x_s [BT, KP] (input dtype, for the scores), xa_s [BT, KA] (fp32: row_scale * x and a ones column, zero rows
        past L) and f_s [BT, FP] (the features, input dtype) of the chunk at t0."""
        for i, d in T.Parallel(BT, KP):
            x_s[i, d] = T.if_then_else(t0 + i < L and d < K, x[i_b, t0 + i, i_h, d], 0)
        for i, d in T.Parallel(BT, KA):
            xa_s[i, d] = T.if_then_else(
                t0 + i < L, T.if_then_else(d < K, T.Cast("float32", x[i_b, t0 + i, i_h, d]) * row_scale, 1.0), 0.0
            )
        for i, f in T.Parallel(BT, FP):
            f_s[i, f] = T.Cast(dtype, fc_s[f] * xa_s[i, fi_s[f]] * xa_s[i, fj_s[f]])

    @T.macro
    def load_grads(v, do, dz, i_b, i_h, t0, v0, i_v, L, v_s, do_s, dz_s):
        """the chunk's v, do tiles [BT, BV] (V tile at v0) and dz [BT] (zero outside the V tile 0: dz enters once)."""
        for i, d in T.Parallel(BT, BV):
            v_s[i, d] = T.if_then_else(t0 + i < L and v0 + d < V, v[i_b, t0 + i, i_h, v0 + d], 0)
            do_s[i, d] = T.if_then_else(t0 + i < L and v0 + d < V, do[i_b, t0 + i, i_h, v0 + d], 0)
        for i in T.Parallel(BT):
            dz_s[i] = T.if_then_else(t0 + i < L and i_v == 0, dz[i_b, t0 + i, i_h], 0)

    @T.macro
    def load_transposed(x, i_b, i_h, t0, L, xt_s):
        """x^T [KP, BT] of the chunk: the K-major operand of a product over the chunk's rows."""
        for d, i in T.Parallel(KP, BT):
            xt_s[d, i] = T.if_then_else(t0 + i < L and d < K, x[i_b, t0 + i, i_h, d], 0)

    @T.macro
    def add_key_features(fk_s, zs_s):
        """zs [FP] += the column sums of the chunk's key features."""
        for f in T.Parallel(FP):
            for j in T.serial(BT):
                zs_s[f] += fk_s[j, f]

    @T.macro
    def chain(b_dx, g_s, xa_s, pi_s, pc_s, g_scale):
        """b_dx [BT, KP] += g_scale * d(G . phi(xa)) / dx, G = g_s [BT, FP] (fp32)."""
        for b in T.serial(KA):
            for i, a in T.Parallel(BT, KP):
                b_dx[i, a] += g_scale * pc_s[a * KA + b] * g_s[i, pi_s[a * KA + b]] * xa_s[i, b]

    return load_tables, load_chain_tables, features, load_grads, load_transposed, add_key_features, chain


def based_fwd_fused_chunk_kernel(
    K: int,
    V: int,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 128,
    num_stages: int = 1,
    threads: int = 256,
):
    KP, KA, FP = _kp(K), K + 1, feature_dims(K)
    NV = cdiv(V, BV)
    B, L, H = T.dynamic("B"), T.dynamic("L"), T.dynamic("H")
    load_tables, _, features, _, _, add_key_features, _ = _stages(K, V, dtype, BT, BV)

    @T.prim_func
    def based_fwd_fused_chunk(
        q: T.Tensor([B, L, H, K], dtype),
        k: T.Tensor([B, L, H, K], dtype),
        v: T.Tensor([B, L, H, V], dtype),
        o: T.Tensor([B, L, H, V], "float32"),
        z: T.Tensor([B, L, H], "float32"),
        fi: T.Tensor([FP], "int32"),
        fj: T.Tensor([FP], "int32"),
        fc: T.Tensor([FP], "float32"),
        scale: T.float32,
    ):
        with T.Kernel(NV, B * H, threads=threads) as (i_v, i_bh):
            i_b, i_h = i_bh // H, i_bh % H
            v0 = i_v * BV

            fi_s = T.alloc_shared([FP], "int32")
            fj_s = T.alloc_shared([FP], "int32")
            fc_s = T.alloc_shared([FP], "float32")
            zs_s = T.alloc_shared([FP], "float32")  # sum of the earlier keys' features
            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            xq_s = T.alloc_shared([BT, KA], "float32")
            xk_s = T.alloc_shared([BT, KA], "float32")
            fq_s = T.alloc_shared([BT, FP], dtype)
            fk_s = T.alloc_shared([BT, FP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            h_s = T.alloc_shared([BV, FP], dtype)
            p_s = T.alloc_shared([BT, BT], dtype)
            pf_s = T.alloc_shared([BT, BT], "float32")
            b_h = T.alloc_fragment([BV, FP], "float32")  # sum of the earlier v_j phi(k_j)^T
            b_o = T.alloc_fragment([BT, BV], "float32")
            b_s = T.alloc_fragment([BT, BT], "float32")
            b_zf = T.alloc_fragment([BT, 32], "float32")
            b_z = T.alloc_fragment([BT], "float32")

            load_tables(fi, fj, fc, fi_s, fj_s, fc_s)
            for f in T.Parallel(FP):
                zs_s[f] = 0
            T.clear(b_h)
            for c in T.Pipelined(T.ceildiv(L, BT), num_stages=num_stages):
                t0 = c * BT
                features(q, i_b, i_h, t0, L, scale, q_s, xq_s, fq_s, fi_s, fj_s, fc_s)
                features(k, i_b, i_h, t0, L, 1.0, k_s, xk_s, fk_s, fi_s, fj_s, fc_s)
                for i, d in T.Parallel(BT, BV):
                    v_s[i, d] = T.if_then_else(t0 + i < L and v0 + d < V, v[i_b, t0 + i, i_h, v0 + d], 0)
                # the earlier chunks: phi(q) h^T and phi(q) . zs
                T.copy(b_h, h_s)
                T.gemm(fq_s, h_s, b_o, transpose_B=True, clear_accum=True)
                # this chunk: p = 1 + s + s^2 / 2 (j <= i)
                T.gemm(q_s, k_s, b_s, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BT):
                    p_s[i, j] = T.if_then_else(i >= j, _taylor(b_s[i, j] * scale), 0)
                    pf_s[i, j] = T.if_then_else(i >= j, _taylor(b_s[i, j] * scale), 0)
                # z: phi(q) . zs and the fp32 row sums of p, in one reduction
                T.clear(b_zf)
                for f in T.serial(FP // 32):
                    for i, r in T.Parallel(BT, 32):
                        b_zf[i, r] += fq_s[i, f * 32 + r] * zs_s[f * 32 + r]
                for j in T.serial(BT // 32):
                    for i, r in T.Parallel(BT, 32):
                        b_zf[i, r] += pf_s[i, j * 32 + r]
                T.reduce_sum(b_zf, b_z, dim=1)
                T.gemm(p_s, v_s, b_o)
                for i, d in T.Parallel(BT, BV):
                    if t0 + i < L and v0 + d < V:
                        o[i_b, t0 + i, i_h, v0 + d] = b_o[i, d]
                if i_v == 0:
                    for i in T.Parallel(BT):
                        if t0 + i < L:
                            z[i_b, t0 + i, i_h] = b_z[i]
                # the states take this chunk's keys
                T.gemm(v_s, fk_s, b_h, transpose_A=True)
                add_key_features(fk_s, zs_s)

    return based_fwd_fused_chunk


def based_bwd_dq_fused_chunk_kernel(
    K: int,
    V: int,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 128,
    num_stages: int = 1,
    threads: int = 256,
):
    KP, KA, FP = _kp(K), K + 1, feature_dims(K)
    NV = cdiv(V, BV)
    B, L, H = T.dynamic("B"), T.dynamic("L"), T.dynamic("H")
    (load_tables, load_chain_tables, features, load_grads, load_transposed, add_key_features,
     chain) = _stages(K, V, dtype, BT, BV)

    @T.prim_func
    def based_bwd_dq_fused_chunk(
        q: T.Tensor([B, L, H, K], dtype),
        k: T.Tensor([B, L, H, K], dtype),
        v: T.Tensor([B, L, H, V], dtype),
        do: T.Tensor([B, L, H, V], dtype),
        dz: T.Tensor([B, L, H], "float32"),
        dq: T.Tensor([NV, B, L, H, K], "float32"),
        fi: T.Tensor([FP], "int32"),
        fj: T.Tensor([FP], "int32"),
        fc: T.Tensor([FP], "float32"),
        pi: T.Tensor([KP * KA], "int32"),
        pc: T.Tensor([KP * KA], "float32"),
        scale: T.float32,
    ):
        with T.Kernel(NV, B * H, threads=threads) as (i_v, i_bh):
            i_b, i_h = i_bh // H, i_bh % H
            v0 = i_v * BV

            fi_s = T.alloc_shared([FP], "int32")
            fj_s = T.alloc_shared([FP], "int32")
            fc_s = T.alloc_shared([FP], "float32")
            pi_s = T.alloc_shared([KP * KA], "int32")
            pc_s = T.alloc_shared([KP * KA], "float32")
            zs_s = T.alloc_shared([FP], "float32")
            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            kt_s = T.alloc_shared([KP, BT], dtype)  # k^T, the ds k product's K-major operand
            xq_s = T.alloc_shared([BT, KA], "float32")
            xk_s = T.alloc_shared([BT, KA], "float32")
            fq_s = T.alloc_shared([BT, FP], dtype)
            fk_s = T.alloc_shared([BT, FP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            dz_s = T.alloc_shared([BT], "float32")
            ht_s = T.alloc_shared([FP, BV], dtype)  # h^T: the do h product's K-major operand
            g_s = T.alloc_shared([BT, FP], "float32")
            ds_s = T.alloc_shared([BT, BT], dtype)
            b_h = T.alloc_fragment([BV, FP], "float32")
            b_g = T.alloc_fragment([BT, FP], "float32")
            b_s = T.alloc_fragment([BT, BT], "float32")
            b_dp = T.alloc_fragment([BT, BT], "float32")
            b_dq = T.alloc_fragment([BT, KP], "float32")

            load_tables(fi, fj, fc, fi_s, fj_s, fc_s)
            load_chain_tables(pi, pc, pi_s, pc_s)
            for f in T.Parallel(FP):
                zs_s[f] = 0
            T.clear(b_h)
            for c in T.Pipelined(T.ceildiv(L, BT), num_stages=num_stages):
                t0 = c * BT
                features(q, i_b, i_h, t0, L, scale, q_s, xq_s, fq_s, fi_s, fj_s, fc_s)
                features(k, i_b, i_h, t0, L, 1.0, k_s, xk_s, fk_s, fi_s, fj_s, fc_s)
                load_grads(v, do, dz, i_b, i_h, t0, v0, i_v, L, v_s, do_s, dz_s)
                load_transposed(k, i_b, i_h, t0, L, kt_s)
                # this chunk: ds = (do v^T + dz) (1 + s), dq = scale ds k
                T.gemm(q_s, k_s, b_s, transpose_B=True, clear_accum=True)
                T.gemm(do_s, v_s, b_dp, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(BT, BT):
                    ds_s[i, j] = T.if_then_else(i >= j, (b_dp[i, j] + dz_s[i]) * (1 + b_s[i, j] * scale), 0)
                T.gemm(ds_s, kt_s, b_dq, transpose_B=True, clear_accum=True)
                for i, a in T.Parallel(BT, KP):
                    b_dq[i, a] *= scale
                # the earlier chunks: G = do h + dz zs^T, the gradient of phi(scale q)
                for f, d in T.Parallel(FP, BV):
                    ht_s[f, d] = b_h[d, f]
                T.gemm(do_s, ht_s, b_g, transpose_B=True, clear_accum=True)
                for i, f in T.Parallel(BT, FP):
                    g_s[i, f] = b_g[i, f] + dz_s[i] * zs_s[f]
                chain(b_dq, g_s, xq_s, pi_s, pc_s, scale)
                for i, a in T.Parallel(BT, KP):
                    if t0 + i < L and a < K:
                        dq[i_v, i_b, t0 + i, i_h, a] = b_dq[i, a]
                T.gemm(v_s, fk_s, b_h, transpose_A=True)
                add_key_features(fk_s, zs_s)

    return based_bwd_dq_fused_chunk


def based_bwd_dkv_fused_chunk_kernel(
    K: int,
    V: int,
    dtype: str,
    # kernel config
    BT: int = 64,
    BV: int = 128,
    num_stages: int = 1,
    threads: int = 256,
):
    KP, KA, FP = _kp(K), K + 1, feature_dims(K)
    NV = cdiv(V, BV)
    B, L, H = T.dynamic("B"), T.dynamic("L"), T.dynamic("H")
    (load_tables, load_chain_tables, features, load_grads, load_transposed, add_key_features,
     chain) = _stages(K, V, dtype, BT, BV)

    @T.prim_func
    def based_bwd_dkv_fused_chunk(
        q: T.Tensor([B, L, H, K], dtype),
        k: T.Tensor([B, L, H, K], dtype),
        v: T.Tensor([B, L, H, V], dtype),
        do: T.Tensor([B, L, H, V], dtype),
        dz: T.Tensor([B, L, H], "float32"),
        dk: T.Tensor([NV, B, L, H, K], "float32"),
        dv: T.Tensor([B, L, H, V], dtype),
        fi: T.Tensor([FP], "int32"),
        fj: T.Tensor([FP], "int32"),
        fc: T.Tensor([FP], "float32"),
        pi: T.Tensor([KP * KA], "int32"),
        pc: T.Tensor([KP * KA], "float32"),
        scale: T.float32,
    ):
        with T.Kernel(NV, B * H, threads=threads) as (i_v, i_bh):
            i_b, i_h = i_bh // H, i_bh % H
            v0 = i_v * BV
            NT = T.ceildiv(L, BT)

            fi_s = T.alloc_shared([FP], "int32")
            fj_s = T.alloc_shared([FP], "int32")
            fc_s = T.alloc_shared([FP], "float32")
            pi_s = T.alloc_shared([KP * KA], "int32")
            pc_s = T.alloc_shared([KP * KA], "float32")
            dzs_s = T.alloc_shared([FP], "float32")  # sum of the later dz_i phi(scale q_i)
            q_s = T.alloc_shared([BT, KP], dtype)
            qt_s = T.alloc_shared([KP, BT], dtype)  # q^T, the ds^T q product's K-major operand
            k_s = T.alloc_shared([BT, KP], dtype)
            xq_s = T.alloc_shared([BT, KA], "float32")
            xk_s = T.alloc_shared([BT, KA], "float32")
            fq_s = T.alloc_shared([BT, FP], dtype)
            fk_s = T.alloc_shared([BT, FP], dtype)
            v_s = T.alloc_shared([BT, BV], dtype)
            do_s = T.alloc_shared([BT, BV], dtype)
            dz_s = T.alloc_shared([BT], "float32")
            dh_s = T.alloc_shared([BV, FP], dtype)
            dht_s = T.alloc_shared([FP, BV], dtype)  # dh^T: the v dh product's K-major operand
            g_s = T.alloc_shared([BT, FP], "float32")
            p_s = T.alloc_shared([BT, BT], dtype)
            ds_s = T.alloc_shared([BT, BT], dtype)
            b_dh = T.alloc_fragment([BV, FP], "float32")  # sum of the later do_i phi(scale q_i)^T
            b_g = T.alloc_fragment([BT, FP], "float32")
            b_s = T.alloc_fragment([BT, BT], "float32")
            b_dp = T.alloc_fragment([BT, BT], "float32")
            b_dk = T.alloc_fragment([BT, KP], "float32")
            b_dv = T.alloc_fragment([BT, BV], "float32")

            load_tables(fi, fj, fc, fi_s, fj_s, fc_s)
            load_chain_tables(pi, pc, pi_s, pc_s)
            for f in T.Parallel(FP):
                dzs_s[f] = 0
            T.clear(b_dh)
            for c in T.Pipelined(NT, num_stages=num_stages):
                t0 = (NT - 1 - c) * BT
                features(q, i_b, i_h, t0, L, scale, q_s, xq_s, fq_s, fi_s, fj_s, fc_s)
                features(k, i_b, i_h, t0, L, 1.0, k_s, xk_s, fk_s, fi_s, fj_s, fc_s)
                load_grads(v, do, dz, i_b, i_h, t0, v0, i_v, L, v_s, do_s, dz_s)
                load_transposed(q, i_b, i_h, t0, L, qt_s)
                # the later chunks: dv = phi(k) dh^T, G = v dh + dzs, the gradient of phi(k)
                T.copy(b_dh, dh_s)
                for f, d in T.Parallel(FP, BV):
                    dht_s[f, d] = b_dh[d, f]
                T.gemm(fk_s, dh_s, b_dv, transpose_B=True, clear_accum=True)
                T.gemm(v_s, dht_s, b_g, transpose_B=True, clear_accum=True)
                for j, f in T.Parallel(BT, FP):
                    g_s[j, f] = b_g[j, f] + dzs_s[f]
                # this chunk, keys j on the rows: s[j, i] = k_j . q_i, dv += p^T do, dk = scale ds^T q
                T.gemm(k_s, q_s, b_s, transpose_B=True, clear_accum=True)
                T.gemm(v_s, do_s, b_dp, transpose_B=True, clear_accum=True)
                for j, i in T.Parallel(BT, BT):
                    p_s[j, i] = T.if_then_else(i >= j, _taylor(b_s[j, i] * scale), 0)
                    ds_s[j, i] = T.if_then_else(i >= j, (b_dp[j, i] + dz_s[i]) * (1 + b_s[j, i] * scale), 0)
                T.gemm(p_s, do_s, b_dv)
                T.gemm(ds_s, qt_s, b_dk, transpose_B=True, clear_accum=True)
                for j, a in T.Parallel(BT, KP):
                    b_dk[j, a] *= scale
                chain(b_dk, g_s, xk_s, pi_s, pc_s, 1.0)
                for j, a in T.Parallel(BT, KP):
                    if t0 + j < L and a < K:
                        dk[i_v, i_b, t0 + j, i_h, a] = b_dk[j, a]
                for j, d in T.Parallel(BT, BV):
                    if t0 + j < L and v0 + d < V:
                        dv[i_b, t0 + j, i_h, v0 + d] = b_dv[j, d]
                # the states take this chunk's queries
                T.gemm(do_s, fq_s, b_dh, transpose_A=True)
                for f in T.Parallel(FP):
                    for i in T.serial(BT):
                        dzs_s[f] += fq_s[i, f] * dz_s[i]

    return based_bwd_dkv_fused_chunk


@functools.lru_cache(maxsize=32)
def _device_tables(K: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    fi, fj, fc, pi, pc = feature_tables(K)
    ints = dict(dtype=torch.int32, device=device)
    floats = dict(dtype=torch.float32, device=device)
    return (torch.tensor(fi, **ints), torch.tensor(fj, **ints), torch.tensor(fc, **floats),
            torch.tensor(pi, **ints), torch.tensor(pc, **floats))


def _kernel(factory, q, v, config: dict | None):
    """(the kernel of `factory` for q `[B, T, H, K]`, v, its V tile count); `config` overrides the resolved tile
    config (`fla_tl.autotune`, the factory's name without `_kernel`)."""
    B, L, H, K = q.shape
    V, dtype = v.shape[-1], TORCH_TO_TL[q.dtype]
    config = tile_config(factory.__name__.removesuffix("_kernel"), q.view(B * L, H, K), K=K, V=V, gate="none", N=B,
                         overrides=config)
    return get_kernel(factory, target_for(q.device), K=K, V=V, dtype=dtype, **config), cdiv(V, config["BV"])


def _output(shape, dtype, device) -> torch.Tensor:
    """an output the kernels fill (uninitialised; the tests swap in NaN-filled tensors)."""
    return torch.empty(shape, dtype=dtype, device=device)


def based_fused_chunk_fwd(q, k, v, *, scale: float, config: dict | None = None):
    """(o `[B, T, H, V]`, z `[B, T, H]`), both fp32 and unnormalised; q, k `[B, T, H, K]`, v contiguous, one dtype;
    `config` overrides the tile config."""
    B, L, H = q.shape[:3]
    o = _output((B, L, H, v.shape[-1]), torch.float32, q.device)
    z = _output((B, L, H), torch.float32, q.device)
    if o.numel() == 0:
        return o.zero_(), z.zero_()
    kernel, _ = _kernel(based_fwd_fused_chunk_kernel, q, v, config)
    kernel(q, k, v, o, z, *_device_tables(q.shape[-1], q.device)[:3], scale)
    return o, z


def based_fused_chunk_bwd(q, k, v, do, dz, *, scale: float, dq_config: dict | None = None,
                          dkv_config: dict | None = None):
    """(dq, dk, dv) in q's dtype; do `[B, T, H, V]` in q's dtype, dz `[B, T, H]` fp32, all contiguous; the configs
    override the two walks' tile configs."""
    if q.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    tables = _device_tables(q.shape[-1], q.device)
    kernel, NV = _kernel(based_bwd_dq_fused_chunk_kernel, q, v, dq_config)
    dq = _output((NV, *q.shape), torch.float32, q.device)
    kernel(q, k, v, do, dz, dq, *tables, scale)
    kernel, NV = _kernel(based_bwd_dkv_fused_chunk_kernel, q, v, dkv_config)
    dk = _output((NV, *k.shape), torch.float32, q.device)
    dv = _output(v.shape, v.dtype, v.device)
    kernel(q, k, v, do, dz, dk, dv, *tables, scale)
    return dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv


def fused_chunk_based_fwd(q, k, v, *, scale: float):
    """(o `[B, T, H, V]`, z `[B, T, H]`), fp32 and unnormalised: causal Based attention by the chunked feature-map
    kernels. q, k `[B, T, H, K]` (K <= 16), v `[B, T, H, V]` (V <= 256), contiguous, on one CUDA device and of one
    dtype (bf16, fp16 or fp32). fp32 inputs run the attention form (`parallel.py`, the same function): their feature
    tiles and states would need more shared memory than a block has."""
    if q.dtype == torch.float32:
        from .parallel import parallel_based_fwd

        return parallel_based_fwd(q, k, v, scale=scale, based=True)
    return based_fused_chunk_fwd(q, k, v, scale=scale)


def fused_chunk_based_bwd(q, k, v, do, dz, *, scale: float):
    """(dq, dk, dv) in q's dtype of :func:`fused_chunk_based_fwd`; do `[B, T, H, V]` in q's dtype, dz `[B, T, H]`
    fp32, all contiguous."""
    if q.dtype == torch.float32:
        from .parallel import parallel_based_bwd

        return parallel_based_bwd(q, k, v, do, dz, scale=scale, based=True)
    return based_fused_chunk_bwd(q, k, v, do, dz, scale=scale)


__all__ = [
    "MAX_K",
    "based_bwd_dkv_fused_chunk_kernel",
    "based_bwd_dq_fused_chunk_kernel",
    "based_fused_chunk_bwd",
    "based_fused_chunk_fwd",
    "based_fwd_fused_chunk_kernel",
    "feature_dims",
    "feature_tables",
    "fused_chunk_based_bwd",
    "fused_chunk_based_fwd",
]
