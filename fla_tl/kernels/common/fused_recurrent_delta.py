"""The delta rules token by token, forward and backward, with the fp32 state in registers: DeltaNet, Gated DeltaNet
(a per-token log gate) and KDA (a per-key log gate).

Per sequence and value head, with the decay `D_t = Diag(exp(g_t))` (a scalar exp(g_t) for a per-token gate, the
identity without a gate) and `p_t = (D_t S_{t-1})^T k_t`:
  u_t = beta_t (v_t - p_t),   S_t = D_t S_{t-1} + k_t u_t^T,   o_t = scale S_t^T q_t.
Every column of S evolves on its own, so blocks split the value dim; q, k are read by all HV / H value heads of
their group.

Forward: one block per (V tile, sequence, value head); each value column is held by KT consecutive lanes, R = KP / KT
key rows each, so S^T k and S^T q are in-thread sums plus log2(KT) shuffles. With a per-token gate the state is kept
as c * S_hat, c the running product of the decays: a step costs S_hat += k (u / c) instead of a decay and an update
per element, and c folds back into S_hat whenever it leaves [1e-20, 1e20]; a per-key gate decays each row. With
`store_w` the forward keeps w_t = v_t - p_t (fp32) for the backward, so no state is ever stored. With a state pool
(`pool`, for serving) the states are read from and written back to pool slots in place
(`fused_recurrent_delta_rule_fwd`).

Backward in two sweeps, each block holding a `[KP, BV]` tile: lane l holds RK = KP / 32 key rows of all RV columns
of its warp, W warps side by side over V, so sums over V (dq, dk) are in-thread and cross warps once per TB tokens
through shared memory; the sum over K of du is a halving butterfly across the warp.
  1. reverse (`bwd_dkv`): dS_t = D_{t+1} dS'_{t+1} + scale q_t do_t^T,  du_t = dS_t^T k_t,  dk_t = dS_t u_t,
     dS'_t = dS_t - beta_t k_t du_t^T;  dh0 = D_1 dS'_1.
  2. forward (`bwd_dqk`), S rebuilt from w:  dk_t -= beta_t S'_t du_t (S'_t = D_t S_{t-1}),  dq_t = scale S_t do_t.
Then the caller: dv = beta du, dbeta = du . w, and the gate's gradient from the identities
  per token: dg_t = sum_{s >= t} (q_s . dq_s - v_s . dv_s) + <dht, ht>,
  per key:   dg_t = sum_{s >= t} (q_s * dq_s - k_s * (dk^write_s - dk^read_s)) + sum_v dht * ht   (each key channel),
with dk^write_t = dS_t u_t (the first sweep) and dk^read_t = -beta_t S'_t du_t (the second): k enters the update
through the write k u^T, which the decay reaches as exp(-b) k, and through the read S'^T k, which it reaches as
exp(b) k. Summed per sequence by `common.cumsum`'s per-sequence scan.

`prepare_qk`, `packed`, `qk_grads` and `group_sum` are the delta-rule entry points' shared steps on the ops'
`[B, T, ...]` tensors (checks, the L2 norm of q and k and its gradient, the sum over a key head's value heads).
"""

from typing import NamedTuple

import tilelang.language as T
import torch

from ...autotune.configs import BT
from ...autotune.resolve import tile_config
from ...reference.delta_rule import l2norm
from .gates import activated_gate
from .utils import TORCH_TO_TL, cdiv, get_kernel, pad_dim, placeholder, seq_meta, state_or_dummy, target_for

# the scale factor c of the forward's state is folded back once it leaves [C_MIN, 1 / C_MIN]
C_MIN = 1e-20


def _rows(lanes: int, R: int):
    """the key row of a thread's register r: vectors of VEC rows, lane-interleaved so a warp reads shared memory
    conflict-free; (VEC, row(lane, r))."""
    vec = 4 if R % 4 == 0 else (2 if R % 2 == 0 else 1)

    def row(lane, r):
        return (r // vec) * (lanes * vec) + lane * vec + r % vec

    return vec, row


def per_key(gate: str) -> bool:
    """whether the gate option decays each key row (KDA's gate: "gk", or "gk_softplus" / "gk_sigmoid" activated in the
    kernels)."""
    return gate.startswith("gk")


def log_gate(gate: str, g, A_log, dt_bias, lower_bound, t, hv, j):
    """the per-key log gate of token t, value head hv, key channel j (fp32): `g` itself (gate "gk"), or KDA's gate
    activation of the raw input with x = g + dt_bias[hv, j] and a = exp(A_log[hv]):
      "gk_softplus": -a * softplus(x),     "gk_sigmoid": lower_bound * sigmoid(a x)
    (zero `A_log` / `dt_bias` rows stand for absent ones)."""
    if gate == "gk":
        return g[t, hv, j]
    return activated_gate(gate.removeprefix("gk_"), g[t, hv, j] + dt_bias[hv, j], T.exp(A_log[hv]), lower_bound)


def fused_recurrent_delta_rule_fwd_kernel(
    K: int,
    V: int,
    gate: str,
    state_v_first: bool,
    pool: bool,
    dtype: str,
    # kernel config
    TB: int = 16,
    BV: int = 32,
    KT: int = 4,
    min_blocks: int = 4,
):
    KP = pad_dim(K, 64)
    R = KP // KT
    VEC, row = _rows(KT, R)
    NV = cdiv(V, BV)
    threads = BV * KT
    shuffles = [1 << s for s in range(KT.bit_length() - 1)]
    Ttot, H, HV, N = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("HV"), T.dynamic("N")
    NG, NH0, NHT, NW = T.dynamic("NG"), T.dynamic("NH0"), T.dynamic("NHT"), T.dynamic("NW")
    NS, NI, NA = T.dynamic("NS"), T.dynamic("NI"), T.dynamic("NA")
    SK, SV = (V, K) if state_v_first else (K, V)
    NAL, NDB = T.dynamic("NAL"), T.dynamic("NDB")
    # the per-token gate's running product c (module docstring); a per-key gate decays every row instead
    scaled = gate == "g"

    @T.macro
    def store_state(dst, i_row, h, cf, kt, col):
        for r in T.unroll(R):
            if row(kt, r) < K and col < V:
                if state_v_first:
                    dst[i_row, col, row(kt, r)] = h[r] * cf
                else:
                    dst[i_row, row(kt, r), col] = h[r] * cf

    @T.prim_func
    def fused_recurrent_delta_rule_fwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, HV, V], dtype),
        beta: T.Tensor([Ttot, HV], "float32"),
        g: T.Tensor([NG, HV, K] if per_key(gate) else [NG, HV], "float32"),
        A_log: T.Tensor([NAL], "float32"),
        dt_bias: T.Tensor([NDB, K], "float32"),
        h0: T.Tensor([NH0, SK, SV], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        o: T.Tensor([Ttot, HV, V], dtype),
        ht: T.Tensor([NHT, SK, SV], "float32"),
        w: T.Tensor([NW, HV, V], "float32"),
        slots: T.Tensor([NS, NI], "int32"),
        accepted: T.Tensor([NA], "int32"),
        scale: T.float32,
        lower_bound: T.float32,
        use_h0: T.int32,
        store_ht: T.int32,
        store_w: T.int32,
        use_accepted: T.int32,
    ):
        with T.Kernel(NV, N * HV, threads=threads) as (i_v, i_nh):
            T.annotate_min_blocks_per_sm(min_blocks)
            tx = T.get_thread_binding()
            # int32 scalars, so no index below repeats a 64-bit division
            i_hv = T.alloc_var("int32", init=i_nh % HV)
            i_h = T.alloc_var("int32", init=i_hv // (HV // H))
            bos = T.alloc_var("int32", init=cu[i_nh // HV])
            L = T.alloc_var("int32", init=cu[i_nh // HV + 1] - bos)
            c = tx // KT
            kt = tx % KT
            col = i_v * BV + c

            q_s = T.alloc_shared([TB, KP], "float32")
            k_s = T.alloc_shared([TB, KP], "float32")
            v_s = T.alloc_shared([TB, BV], "float32")
            b_s = T.alloc_shared([TB], "float32")
            d_s = T.alloc_shared([TB, KP] if per_key(gate) else [TB], "float32")
            o_s = T.alloc_shared([TB, BV], "float32")
            w_s = T.alloc_shared([TB, BV], "float32")
            h = T.alloc_local([R], "float32")  # the state column `col`, rows row(kt, :) (times 1 / cf)
            kr = T.alloc_local([R], "float32")
            qr = T.alloc_local([R], "float32")
            dr = T.alloc_local([R], "float32")
            acc = T.alloc_local([4], "float32")
            cf = T.alloc_var("float32", init=1.0)
            cn = T.alloc_var("float32", init=1.0)
            p = T.alloc_var("float32", init=0.0)
            so = T.alloc_var("float32", init=0.0)
            # the pool slot the state starts from (a negative slot is padding: a zero state, nothing written back)
            slot = T.alloc_var("int32", init=0)

            for r in T.unroll(R):
                h[r] = 0
            if pool:
                if use_accepted == 1:
                    slot = slots[i_nh // HV, accepted[i_nh // HV] - 1]
                else:
                    slot = slots[i_nh // HV, 0]
                if slot >= 0:
                    for r in T.unroll(R):
                        if row(kt, r) < K and col < V:
                            if state_v_first:
                                h[r] = ht[slot * HV + i_hv, col, row(kt, r)]
                            else:
                                h[r] = ht[slot * HV + i_hv, row(kt, r), col]
            elif use_h0 == 1:
                for r in T.unroll(R):
                    if row(kt, r) < K and col < V:
                        if state_v_first:
                            h[r] = h0[i_nh, col, row(kt, r)]
                        else:
                            h[r] = h0[i_nh, row(kt, r), col]

            for it in T.serial(T.ceildiv(L, TB)):
                t0 = bos + it * TB
                # tokens past the sequence end: zero q, k, v, beta and a unit decay leave the state unchanged
                for r, j in T.Parallel(TB, KP):
                    q_s[r, j] = T.if_then_else(it * TB + r < L and j < K, q[t0 + r, i_h, j], 0)
                    k_s[r, j] = T.if_then_else(it * TB + r < L and j < K, k[t0 + r, i_h, j], 0)
                    if per_key(gate):
                        d_s[r, j] = T.if_then_else(
                            it * TB + r < L and j < K,
                            T.exp(log_gate(gate, g, A_log, dt_bias, lower_bound, t0 + r, i_hv, j)), 1)
                for r, j in T.Parallel(TB, BV):
                    v_s[r, j] = T.if_then_else(it * TB + r < L and i_v * BV + j < V, v[t0 + r, i_hv, i_v * BV + j], 0)
                for r in T.Parallel(TB):
                    b_s[r] = T.if_then_else(it * TB + r < L, beta[t0 + r, i_hv], 0)
                    if gate == "g":
                        d_s[r] = T.if_then_else(it * TB + r < L, T.exp(g[t0 + r, i_hv]), 1)
                # the block's valid tokens only (a decode step stages one row of TB)
                for r in T.serial(T.min(TB, L - it * TB)):
                    for m in T.unroll(R // VEC):
                        for e in T.vectorized(VEC):
                            kr[m * VEC + e] = k_s[r, m * KT * VEC + kt * VEC + e]
                            qr[m * VEC + e] = q_s[r, m * KT * VEC + kt * VEC + e]
                            if per_key(gate):
                                dr[m * VEC + e] = d_s[r, m * KT * VEC + kt * VEC + e]
                    if per_key(gate):
                        for e in T.unroll(R):
                            h[e] *= dr[e]
                    # p = S_hat^T k: four partial sums, then across the KT lanes of the column
                    for e in T.unroll(4):
                        acc[e] = 0
                    for e in T.unroll(R):
                        acc[e % 4] += h[e] * kr[e]
                    p = (acc[0] + acc[1]) + (acc[2] + acc[3])
                    for s in shuffles:
                        p = p + T.shfl_xor(p, s)
                    if scaled:
                        cn = cf * d_s[r]
                        p = p * cn
                        # a block-uniform branch: fold c into S_hat before it under- or overflows
                        if cn < C_MIN or cn > 1.0 / C_MIN:
                            for e in T.unroll(R):
                                h[e] *= cn
                            cn = 1.0
                        cf = cn
                    u = b_s[r] * (v_s[r, c] - p)
                    ur = u / cf if scaled else u
                    for e in T.unroll(R):
                        h[e] += kr[e] * ur
                    for e in T.unroll(4):
                        acc[e] = 0
                    for e in T.unroll(R):
                        acc[e % 4] += h[e] * qr[e]
                    so = (acc[0] + acc[1]) + (acc[2] + acc[3])
                    for s in shuffles:
                        so = so + T.shfl_xor(so, s)
                    if kt == 0:
                        o_s[r, c] = so * (scale * cf if scaled else scale)
                        w_s[r, c] = v_s[r, c] - p
                    if pool:
                        # a slot per token (speculative decoding): the state after each token
                        if NI > 1 and it * TB + r < L:
                            if slots[i_nh // HV, it * TB + r] >= 0:
                                store_state(ht, slots[i_nh // HV, it * TB + r] * HV + i_hv, h, cf, kt, col)
                for r, j in T.Parallel(TB, BV):
                    if it * TB + r < L and i_v * BV + j < V:
                        o[t0 + r, i_hv, i_v * BV + j] = o_s[r, j]
                if store_w == 1:
                    for r, j in T.Parallel(TB, BV):
                        if it * TB + r < L and i_v * BV + j < V:
                            w[t0 + r, i_hv, i_v * BV + j] = w_s[r, j]

            if pool:
                # a slot per sequence: its final state, in place
                if NI == 1 and slot >= 0 and L > 0:
                    store_state(ht, slot * HV + i_hv, h, cf, kt, col)
            elif store_ht == 1:
                store_state(ht, i_nh, h, cf, kt, col)

    return fused_recurrent_delta_rule_fwd


def _bwd_layout(K: int, BV: int, threads: int):
    """(KP, RK, RV, W, VEC, row, halving levels, lane shift) of a backward block: W warps of 32 lanes, RK key rows and
    RV value columns a lane; after the halving levels (offset, half) lane l holds the sum of column l >> shift."""
    KP = pad_dim(K, 64)
    W = threads // 32
    RK, RV = KP // 32, BV // W
    if threads % 32 or BV % W or RV & (RV - 1) or not 4 <= RV <= 32:
        raise ValueError(f"backward tile: BV={BV} over {W} warps must give a power-of-two 4..32 columns per warp")
    VEC, row = _rows(32, RK)
    m = RV.bit_length() - 1
    levels = [(16 >> i, RV >> (i + 1)) for i in range(m)]
    shift = 5 - m
    return KP, RK, RV, W, VEC, row, levels, shift


def _warp_sum(buf, W: int, r, j):
    """the sum over the W warps' partials buf[r, :, j] (built at trace time)."""
    tot = buf[r, 0, j]
    for wi in range(1, W):
        tot = tot + buf[r, wi, j]
    return tot


def fused_recurrent_delta_rule_bwd_dkv_kernel(
    K: int,
    V: int,
    gate: str,
    state_v_first: bool,
    dtype: str,
    # kernel config
    TB: int = 8,
    BV: int = 128,
    threads: int = 256,
):
    KP, RK, RV, W, VEC, row, levels, shift = _bwd_layout(K, BV, threads)
    NV = cdiv(V, BV)
    rest = [1 << s for s in range(shift)]
    bcast = list(range(RV))
    Ttot, H, HV, N = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("HV"), T.dynamic("N")
    NG, NH0, NHT = T.dynamic("NG"), T.dynamic("NH0"), T.dynamic("NHT")
    SK, SV = (V, K) if state_v_first else (K, V)
    NAL, NDB = T.dynamic("NAL"), T.dynamic("NDB")

    @T.prim_func
    def fused_recurrent_delta_rule_bwd_dkv(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        do: T.Tensor([Ttot, HV, V], dtype),
        w: T.Tensor([Ttot, HV, V], "float32"),
        beta: T.Tensor([Ttot, HV], "float32"),
        g: T.Tensor([NG, HV, K] if per_key(gate) else [NG, HV], "float32"),
        A_log: T.Tensor([NAL], "float32"),
        dt_bias: T.Tensor([NDB, K], "float32"),
        dht: T.Tensor([NHT, SK, SV], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        du: T.Tensor([Ttot, HV, V], "float32"),
        dk: T.Tensor([NV, Ttot, HV, K], "float32"),
        dh0: T.Tensor([NH0, SK, SV], "float32"),
        scale: T.float32,
        lower_bound: T.float32,
        use_dht: T.int32,
        store_dh0: T.int32,
    ):
        with T.Kernel(NV, N * HV, threads=threads) as (i_v, i_nh):
            tx = T.get_thread_binding()
            lane = tx % 32
            wi = tx // 32
            # int32 scalars, so no index below repeats a 64-bit division
            i_hv = T.alloc_var("int32", init=i_nh % HV)
            i_h = T.alloc_var("int32", init=i_hv // (HV // H))
            bos = T.alloc_var("int32", init=cu[i_nh // HV])
            L = T.alloc_var("int32", init=cu[i_nh // HV + 1] - bos)
            nb = T.ceildiv(L, TB)

            q_s = T.alloc_shared([TB, KP], "float32")
            k_s = T.alloc_shared([TB, KP], "float32")
            do_s = T.alloc_shared([TB, BV], "float32")
            u_s = T.alloc_shared([TB, BV], "float32")
            b_s = T.alloc_shared([TB], "float32")
            d_s = T.alloc_shared([TB, KP] if per_key(gate) else [TB], "float32")
            du_s = T.alloc_shared([TB, BV], "float32")
            dk_s = T.alloc_shared([TB, W, KP], "float32")
            dh = T.alloc_local([RK * RV], "float32")  # dS rows row(lane, a), columns wi * RV + cc
            qr = T.alloc_local([RK], "float32")
            kr = T.alloc_local([RK], "float32")
            dr = T.alloc_local([RK], "float32")
            dor = T.alloc_local([RV], "float32")
            ur = T.alloc_local([RV], "float32")
            x = T.alloc_local([RV], "float32")
            dk_r = T.alloc_local([RK], "float32")
            dsum = T.alloc_var("float32", init=0.0)

            for a in T.unroll(RK):
                for cc in T.unroll(RV):
                    dh[a * RV + cc] = 0
            if use_dht == 1:
                for a in T.unroll(RK):
                    for cc in T.unroll(RV):
                        if row(lane, a) < K and i_v * BV + wi * RV + cc < V:
                            if state_v_first:
                                dh[a * RV + cc] = dht[i_nh, i_v * BV + wi * RV + cc, row(lane, a)]
                            else:
                                dh[a * RV + cc] = dht[i_nh, row(lane, a), i_v * BV + wi * RV + cc]

            for jt in T.serial(nb):
                it = nb - 1 - jt
                t0 = bos + it * TB
                for r, j in T.Parallel(TB, KP):
                    q_s[r, j] = T.if_then_else(it * TB + r < L and j < K, q[t0 + r, i_h, j] * scale, 0)
                    k_s[r, j] = T.if_then_else(it * TB + r < L and j < K, k[t0 + r, i_h, j], 0)
                for r, j in T.Parallel(TB, BV):
                    do_s[r, j] = T.if_then_else(
                        it * TB + r < L and i_v * BV + j < V, do[t0 + r, i_hv, i_v * BV + j], 0)
                    u_s[r, j] = T.if_then_else(
                        it * TB + r < L and i_v * BV + j < V, beta[t0 + r, i_hv] * w[t0 + r, i_hv, i_v * BV + j], 0)
                for r in T.Parallel(TB):
                    b_s[r] = T.if_then_else(it * TB + r < L, beta[t0 + r, i_hv], 0)
                    if gate == "g":
                        d_s[r] = T.if_then_else(it * TB + r < L, T.exp(g[t0 + r, i_hv]), 1)
                if per_key(gate):
                    for r, j in T.Parallel(TB, KP):
                        d_s[r, j] = T.if_then_else(
                            it * TB + r < L and j < K,
                            T.exp(log_gate(gate, g, A_log, dt_bias, lower_bound, t0 + r, i_hv, j)), 1)
                for rr in T.serial(TB):
                    r = TB - 1 - rr
                    for m in T.unroll(RK // VEC):
                        for e in T.vectorized(VEC):
                            qr[m * VEC + e] = q_s[r, (m * 32 + lane) * VEC + e]
                            kr[m * VEC + e] = k_s[r, (m * 32 + lane) * VEC + e]
                            if per_key(gate):
                                dr[m * VEC + e] = d_s[r, (m * 32 + lane) * VEC + e]
                    for m in T.unroll(RV // 4):
                        for e in T.vectorized(4):
                            dor[m * 4 + e] = do_s[r, wi * RV + m * 4 + e]
                            ur[m * 4 + e] = u_s[r, wi * RV + m * 4 + e]
                    # dS_t = dS_{t+1}' + scale q_t do_t^T;  x = the lane's share of du_t = dS_t^T k_t
                    for cc in T.unroll(RV):
                        x[cc] = 0
                    for a in T.unroll(RK):
                        for cc in T.unroll(RV):
                            dh[a * RV + cc] += qr[a] * dor[cc]
                            x[cc] += dh[a * RV + cc] * kr[a]
                    # dk_t = dS_t u_t (in-thread over the warp's columns)
                    for a in T.unroll(RK):
                        dk_r[a] = 0
                    for a in T.unroll(RK):
                        for cc in T.unroll(RV):
                            dk_r[a] += dh[a * RV + cc] * ur[cc]
                    for m in T.unroll(RK // VEC):
                        for e in T.vectorized(VEC):
                            dk_s[r, wi, (m * 32 + lane) * VEC + e] = dk_r[m * VEC + e]
                    # du over the 32 lanes: halve the columns at each level, then a plain butterfly
                    for off, half in levels:
                        for cc in T.unroll(half):
                            x[cc] = T.if_then_else((lane & off) != 0, x[cc + half], x[cc]) + T.shfl_xor(
                                T.if_then_else((lane & off) != 0, x[cc], x[cc + half]), off)
                    dsum = x[0]
                    for s in rest:
                        dsum = dsum + T.shfl_xor(dsum, s)
                    if lane % (1 << shift) == 0:
                        du_s[r, wi * RV + (lane >> shift)] = dsum
                    # every lane needs all RV columns: x = -beta du, gathered from the owner lanes
                    for cc in bcast:
                        x[cc] = T.shfl_sync(dsum, cc << shift) * -b_s[r]
                    # dS'_t = dS_t - beta k du^T, decayed into dS_{t-1}'s share
                    for a in T.unroll(RK):
                        for cc in T.unroll(RV):
                            if gate == "g":
                                dh[a * RV + cc] = (dh[a * RV + cc] + kr[a] * x[cc]) * d_s[r]
                            elif per_key(gate):
                                dh[a * RV + cc] = (dh[a * RV + cc] + kr[a] * x[cc]) * dr[a]
                            else:
                                dh[a * RV + cc] += kr[a] * x[cc]
                for r, j in T.Parallel(TB, BV):
                    if it * TB + r < L and i_v * BV + j < V:
                        du[t0 + r, i_hv, i_v * BV + j] = du_s[r, j]
                for r, j in T.Parallel(TB, KP):
                    if it * TB + r < L and j < K:
                        dk[i_v, t0 + r, i_hv, j] = _warp_sum(dk_s, W, r, j)

            if store_dh0 == 1:
                for a in T.unroll(RK):
                    for cc in T.unroll(RV):
                        if row(lane, a) < K and i_v * BV + wi * RV + cc < V:
                            if state_v_first:
                                dh0[i_nh, i_v * BV + wi * RV + cc, row(lane, a)] = dh[a * RV + cc]
                            else:
                                dh0[i_nh, row(lane, a), i_v * BV + wi * RV + cc] = dh[a * RV + cc]

    return fused_recurrent_delta_rule_bwd_dkv


def fused_recurrent_delta_rule_bwd_dqk_kernel(
    K: int,
    V: int,
    gate: str,
    state_v_first: bool,
    dtype: str,
    # kernel config
    TB: int = 8,
    BV: int = 128,
    threads: int = 256,
):
    KP, RK, RV, W, VEC, row, _, _ = _bwd_layout(K, BV, threads)
    NV = cdiv(V, BV)
    Ttot, H, HV, N = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("HV"), T.dynamic("N")
    NG, NH0 = T.dynamic("NG"), T.dynamic("NH0")
    SK, SV = (V, K) if state_v_first else (K, V)
    NAL, NDB = T.dynamic("NAL"), T.dynamic("NDB")

    @T.prim_func
    def fused_recurrent_delta_rule_bwd_dqk(
        k: T.Tensor([Ttot, H, K], dtype),
        do: T.Tensor([Ttot, HV, V], dtype),
        w: T.Tensor([Ttot, HV, V], "float32"),
        du: T.Tensor([Ttot, HV, V], "float32"),
        beta: T.Tensor([Ttot, HV], "float32"),
        g: T.Tensor([NG, HV, K] if per_key(gate) else [NG, HV], "float32"),
        A_log: T.Tensor([NAL], "float32"),
        dt_bias: T.Tensor([NDB, K], "float32"),
        h0: T.Tensor([NH0, SK, SV], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        dq: T.Tensor([NV, Ttot, HV, K], "float32"),
        dk: T.Tensor([NV, Ttot, HV, K], "float32"),
        scale: T.float32,
        lower_bound: T.float32,
        use_h0: T.int32,
    ):
        with T.Kernel(NV, N * HV, threads=threads) as (i_v, i_nh):
            tx = T.get_thread_binding()
            lane = tx % 32
            wi = tx // 32
            # int32 scalars, so no index below repeats a 64-bit division
            i_hv = T.alloc_var("int32", init=i_nh % HV)
            i_h = T.alloc_var("int32", init=i_hv // (HV // H))
            bos = T.alloc_var("int32", init=cu[i_nh // HV])
            L = T.alloc_var("int32", init=cu[i_nh // HV + 1] - bos)

            k_s = T.alloc_shared([TB, KP], "float32")
            do_s = T.alloc_shared([TB, BV], "float32")
            u_s = T.alloc_shared([TB, BV], "float32")
            dv_s = T.alloc_shared([TB, BV], "float32")
            d_s = T.alloc_shared([TB, KP] if per_key(gate) else [TB], "float32")
            dq_s = T.alloc_shared([TB, W, KP], "float32")
            dk_s = T.alloc_shared([TB, W, KP], "float32")
            h = T.alloc_local([RK * RV], "float32")  # S rows row(lane, a), columns wi * RV + cc
            kr = T.alloc_local([RK], "float32")
            dr = T.alloc_local([RK], "float32")
            dor = T.alloc_local([RV], "float32")
            ur = T.alloc_local([RV], "float32")
            dvr = T.alloc_local([RV], "float32")
            dq_r = T.alloc_local([RK], "float32")
            dk_r = T.alloc_local([RK], "float32")

            for a in T.unroll(RK):
                for cc in T.unroll(RV):
                    h[a * RV + cc] = 0
            if use_h0 == 1:
                for a in T.unroll(RK):
                    for cc in T.unroll(RV):
                        if row(lane, a) < K and i_v * BV + wi * RV + cc < V:
                            if state_v_first:
                                h[a * RV + cc] = h0[i_nh, i_v * BV + wi * RV + cc, row(lane, a)]
                            else:
                                h[a * RV + cc] = h0[i_nh, row(lane, a), i_v * BV + wi * RV + cc]

            for it in T.serial(T.ceildiv(L, TB)):
                t0 = bos + it * TB
                for r, j in T.Parallel(TB, KP):
                    k_s[r, j] = T.if_then_else(it * TB + r < L and j < K, k[t0 + r, i_h, j], 0)
                for r, j in T.Parallel(TB, BV):
                    do_s[r, j] = T.if_then_else(
                        it * TB + r < L and i_v * BV + j < V, do[t0 + r, i_hv, i_v * BV + j] * scale, 0)
                    u_s[r, j] = T.if_then_else(
                        it * TB + r < L and i_v * BV + j < V, beta[t0 + r, i_hv] * w[t0 + r, i_hv, i_v * BV + j], 0)
                    # minus dv = -beta du, the gradient of p
                    dv_s[r, j] = T.if_then_else(
                        it * TB + r < L and i_v * BV + j < V, -beta[t0 + r, i_hv] * du[t0 + r, i_hv, i_v * BV + j], 0)
                if gate == "g":
                    for r in T.Parallel(TB):
                        d_s[r] = T.if_then_else(it * TB + r < L, T.exp(g[t0 + r, i_hv]), 1)
                if per_key(gate):
                    for r, j in T.Parallel(TB, KP):
                        d_s[r, j] = T.if_then_else(
                            it * TB + r < L and j < K,
                            T.exp(log_gate(gate, g, A_log, dt_bias, lower_bound, t0 + r, i_hv, j)), 1)
                for r in T.serial(TB):
                    for m in T.unroll(RK // VEC):
                        for e in T.vectorized(VEC):
                            kr[m * VEC + e] = k_s[r, (m * 32 + lane) * VEC + e]
                            if per_key(gate):
                                dr[m * VEC + e] = d_s[r, (m * 32 + lane) * VEC + e]
                    for m in T.unroll(RV // 4):
                        for e in T.vectorized(4):
                            dor[m * 4 + e] = do_s[r, wi * RV + m * 4 + e]
                            ur[m * 4 + e] = u_s[r, wi * RV + m * 4 + e]
                            dvr[m * 4 + e] = dv_s[r, wi * RV + m * 4 + e]
                    # S'_t = d_t S_{t-1};  dk_t += S'_t dp_t;  S_t = S'_t + k u^T;  dq_t = scale S_t do_t
                    for a in T.unroll(RK):
                        dk_r[a] = 0
                        dq_r[a] = 0
                    for a in T.unroll(RK):
                        for cc in T.unroll(RV):
                            if gate == "g":
                                h[a * RV + cc] *= d_s[r]
                            elif per_key(gate):
                                h[a * RV + cc] *= dr[a]
                            dk_r[a] += h[a * RV + cc] * dvr[cc]
                            h[a * RV + cc] += kr[a] * ur[cc]
                            dq_r[a] += h[a * RV + cc] * dor[cc]
                    for m in T.unroll(RK // VEC):
                        for e in T.vectorized(VEC):
                            dq_s[r, wi, (m * 32 + lane) * VEC + e] = dq_r[m * VEC + e]
                            dk_s[r, wi, (m * 32 + lane) * VEC + e] = dk_r[m * VEC + e]
                for r, j in T.Parallel(TB, KP):
                    if it * TB + r < L and j < K:
                        dq[i_v, t0 + r, i_hv, j] = _warp_sum(dq_s, W, r, j)
                        dk[i_v, t0 + r, i_hv, j] = dk[i_v, t0 + r, i_hv, j] + _warp_sum(dk_s, W, r, j)

    return fused_recurrent_delta_rule_bwd_dqk


class GateActivation(NamedTuple):
    """KDA's gate activation done in the kernels (`log_gate`): `kind` "softplus" or "sigmoid", `A_log` `[HV]` and
    `dt_bias` `[HV * K]` (None: absent), `lower_bound` (the sigmoid form's)."""

    kind: str
    A_log: torch.Tensor | None
    dt_bias: torch.Tensor | None
    lower_bound: float = 0.0


def _activation_args(act: GateActivation | None, HV: int, K: int, device) -> tuple:
    """(A_log `[HV]`, dt_bias `[HV, K]` fp32, lower_bound) as the kernels read them; zeros stand for absent ones."""
    if act is None:
        return placeholder((1,), torch.float32, device), placeholder((1, K), torch.float32, device), 0.0
    A_log = act.A_log.float().contiguous() if act.A_log is not None else placeholder((HV,), torch.float32, device)
    dt_bias = (act.dt_bias.float().reshape(HV, K).contiguous() if act.dt_bias is not None
               else placeholder((HV, K), torch.float32, device))
    return A_log, dt_bias, float(act.lower_bound or 0.0)


def _gate(g, act: str | None = None) -> str:
    """the gate option of a launch: "none", "g" (per-token log gates `[Ttot, HV]`), "gk" (per-key `[Ttot, HV, K]`),
    or a per-key gate activated in the kernels, "gk_<act>" (`act` "softplus" or "sigmoid", see `log_gate`)."""
    if g is None:
        return "none"
    if g.dim() == 2:
        return "g"
    return f"gk_{act}" if act else "gk"


def fused_recurrent_delta_rule_fwd(
    q, k, v, beta, g, *, scale: float, initial_state, output_final_state: bool, state_v_first: bool, meta,
    store_w: bool, slots=None, accepted=None, act: GateActivation | None = None, **config,
):
    """(o `[Ttot, HV, V]` in q's dtype, ht `[N, HV, *state]` fp32 or None, w `[Ttot, HV, V]` fp32 or None) of
    `[Ttot, H, K]` q, k, `[Ttot, HV, V]` v (q's dtype), fp32 `[Ttot, HV]` beta and fp32 log gates g: None,
    `[Ttot, HV]` (per token) or `[Ttot, HV, K]` (per key).

    With `slots` `[N, NI]` int32 the states live in a pool, `initial_state` `[P, HV, *state]` fp32 contiguous: each
    sequence starts from slot `slots[n, accepted[n] - 1]` (`accepted` `[N]` int32; without it `slots[n, 0]`) and
    writes back in place, its final state to `slots[n, 0]` when NI == 1, else the state after its token t to
    `slots[n, t]`; a negative slot is padding (a zero state, nothing written). The pool is returned as ht.

    With `act` a per-key g is the raw gate input, activated in the kernels."""
    Ttot, _, K = q.shape
    HV, V = v.shape[1:]
    tail = (V, K) if state_v_first else (K, V)
    gate = _gate(g, act.kind if act is not None else None)
    pool = slots is not None
    o = torch.empty_like(v)
    w = q.new_empty(Ttot, HV, V, dtype=torch.float32) if store_w else placeholder((1, HV, V), torch.float32, q.device)
    if pool:
        ht, h0, use_h0 = initial_state.view(-1, *tail), placeholder((1, *tail), torch.float32, q.device), 0
    else:
        ht = q.new_empty(meta.N * HV if output_final_state else 1, *tail, dtype=torch.float32)
        h0, use_h0 = state_or_dummy(initial_state, q, tail)
    if Ttot == 0:
        # no tokens: the final state is the initial one
        if output_final_state and not pool:
            ht.copy_(h0 if use_h0 else torch.zeros_like(ht))
    else:
        config = tile_config("fused_recurrent_delta_fwd", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
        kernel = get_kernel(fused_recurrent_delta_rule_fwd_kernel, target_for(q.device), K=K, V=V, gate=gate,
                            state_v_first=state_v_first, pool=pool, dtype=TORCH_TO_TL[q.dtype], **config)
        g_ = g if g is not None else placeholder((1, HV), torch.float32, q.device)
        slots_ = slots if pool else placeholder((1, 1), torch.int32, q.device)
        accepted_ = accepted if accepted is not None else placeholder((1,), torch.int32, q.device)
        A_log, dt_bias, lower_bound = _activation_args(act, HV, K, q.device)
        kernel(q, k, v, beta, g_, A_log, dt_bias, h0, meta.cu, o, ht, w, slots_, accepted_, scale, lower_bound,
               use_h0, int(output_final_state), int(store_w), int(accepted is not None))
    if pool:
        return o, initial_state, (w if store_w else None)
    return o, (ht.view(meta.N, HV, *tail) if output_final_state else None), (w if store_w else None)


def fused_recurrent_delta_rule_bwd(
    q, k, beta, g, w, do, dht, *, scale: float, initial_state, state_v_first: bool, meta,
    act: GateActivation | None = None, **config,
):
    """(dq, dk per value head `[Ttot, HV, K]` fp32, du `[Ttot, HV, V]` fp32, dh0 fp32 `[N, HV, *state]` or None, and
    for a per-key gate the keys' share of its gradient `dk_write - dk_read` `[Ttot, HV, K]` fp32, else None): the two
    backward sweeps; dv = beta du and the gradients of beta and g are the caller's part."""
    Ttot, _, K = q.shape
    HV, V = w.shape[1:]
    tail = (V, K) if state_v_first else (K, V)
    gate = _gate(g, act.kind if act is not None else None)
    config = tile_config("fused_recurrent_delta_bwd", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    NV = cdiv(V, config["BV"])
    h0, use_h0 = state_or_dummy(initial_state, q, tail)
    dht_, use_dht = state_or_dummy(dht, q, tail)
    du = q.new_empty(Ttot, HV, V, dtype=torch.float32)
    dq = q.new_empty(NV, Ttot, HV, K, dtype=torch.float32)
    dk = q.new_empty(NV, Ttot, HV, K, dtype=torch.float32)
    dh0 = torch.empty_like(h0)
    if Ttot == 0:
        # no tokens: dh0 is dht
        if use_h0:
            dh0.copy_(dht_ if use_dht else torch.zeros_like(dh0))
    else:
        target = target_for(q.device)
        flags = dict(K=K, V=V, gate=gate, state_v_first=state_v_first, dtype=TORCH_TO_TL[q.dtype], **config)
        g_ = g if g is not None else placeholder((1, HV), torch.float32, q.device)
        A_log, dt_bias, lower_bound = _activation_args(act, HV, K, q.device)
        dkv = get_kernel(fused_recurrent_delta_rule_bwd_dkv_kernel, target, **flags)
        dkv(q, k, do, w, beta, g_, A_log, dt_bias, dht_, meta.cu, du, dk, dh0, scale, lower_bound, use_dht, use_h0)
        # the write's share of dk (the first sweep), before the second adds the correction's read share
        dk_write = dk.sum(0) if per_key(gate) else None
        dqk = get_kernel(fused_recurrent_delta_rule_bwd_dqk_kernel, target, **flags)
        dqk(k, do, w, du, beta, g_, A_log, dt_bias, h0, meta.cu, dq, dk, scale, lower_bound, use_h0)
    dq = dq.sum(0) if NV > 1 else dq[0]
    dk = dk.sum(0) if NV > 1 else dk[0]
    dkg = None
    if per_key(gate):
        # dk_write - dk_read = 2 dk_write - dk
        dkg = 2 * dk_write - dk if Ttot else torch.zeros_like(dk)
    return dq, dk, du, (dh0.view(meta.N, HV, *tail) if use_h0 else None), dkg


def prepare_qk(q, k, v, cu_seqlens, use_qk_l2norm_in_kernel: bool):
    """the checks of the TileLang delta-rule entry points, then q, k (L2-normalised on request, k in q's dtype)."""
    B, _, H, K = q.shape
    HV, V = v.shape[2:]
    if q.dtype not in TORCH_TO_TL:
        raise TypeError(f"q: dtype {q.dtype} is not supported (expected one of {sorted(map(str, TORCH_TO_TL))})")
    if K > 256 or V > 256:
        raise ValueError(f"head dims: expected K, V <= 256, got K={K}, V={V}")
    if HV % H:
        raise ValueError(f"v: expected a multiple of H={H} value heads, got HV={HV}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens: expected B == 1 with varlen inputs, got B={B}")
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
    k = k.to(q.dtype)
    return q, k


def l2norm_bwd(x, dy, eps: float = 1e-6):
    """the gradient of `l2norm(x.float()).to(x.dtype)` (`prepare_qk`) for the output gradient `dy`, in fp32:
    `dy r - x r^3 (dy . x)` with `r = 1 / sqrt(|x|^2 + eps)`."""
    x, dy = x.float(), dy.float()
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
    return dy * r - x * (r * r * r) * (dy * x).sum(-1, keepdim=True)


def qk_grads(q, k, dq, dk, use_qk_l2norm_in_kernel: bool):
    """dq, dk `[B, T, H, K]` per key head of the kernels' (normalised) q, k, rounded to their dtype, taken through the
    L2 norm when it was applied."""
    dq, dk = dq.to(q.dtype), dk.to(q.dtype)
    if use_qk_l2norm_in_kernel:
        dq, dk = l2norm_bwd(q, dq), l2norm_bwd(k, dk)
    return dq, dk


def group_sum(x, H: int):
    """`[Ttot, HV, K]` per value head -> `[Ttot, H, K]` per key head."""
    Ttot, HV, K = x.shape
    return x if HV == H else x.view(Ttot, H, HV // H, K).sum(2)


def packed(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel: bool):
    """(meta, q, k `[Ttot, H, K]` in q's dtype, v `[Ttot, HV, V]`, beta fp32 `[Ttot, HV]`, g fp32 `[Ttot, HV]` or
    `[Ttot, HV, K]` (a per-key gate) or None)."""
    q, k = prepare_qk(q, k, v, cu_seqlens, use_qk_l2norm_in_kernel)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    q_, k_ = q.reshape(B * T, H, K).contiguous(), k.reshape(B * T, H, K).contiguous()
    v_ = v.reshape(B * T, HV, V).to(q.dtype).contiguous()
    beta_ = beta.reshape(B * T, HV).float().contiguous()
    g_ = g.reshape(B * T, *g.shape[2:]).float().contiguous() if g is not None else None
    return meta, q_, k_, v_, beta_, g_
