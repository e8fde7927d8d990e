"""Token-by-token kernels: one block per (sequence, head, V tile) carries the fp32 state `[K, BV]` in registers.

Tokens are staged TB at a time into shared memory (positions clamped to the sequence, masked to zero past it),
then stepped one by one:  h = 2^lg h + k v^T;  o = scale * h^T q, with lg the log2 decay of the step: the head's
constant (gate "gamma"), the token's gate plus that constant (gate "g", `g` `[Ttot, H]` fp32), or a decay per key
row of the state (gate "gk", GLA's `g` `[Ttot, H, K]` fp32, plus the constant). `reverse` walks each sequence
backwards; `state_v_first` stores initial / final states as `[V, K]`. The backward recomputes h forward for dq, then
walks back with dh for dk, dv; dq and dk come in fp32 partial sums when V spans several tiles.
"""

import tilelang.language as T
import torch

# the backward's heuristic tiles live with the tile configs; re-exported here
from ...autotune.configs import fused_recurrent_bwd_config  # noqa: F401
from ...autotune.resolve import tile_config
from .gates import gate_or_dummy
from .utils import LOG2E, TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, state_or_dummy, target_for


def _pos(reverse, bos, eos, s):
    """sequence position of step s."""
    return eos - 1 - s if reverse else bos + s


@T.macro
def _stage_gates(gate, g_s, g, g_gamma, reverse, bos, eos, it, L, i_h, TB, K, KP):
    """stage the log2 decays of steps it * TB ... + TB - 1 (gates "g" and "gk"; zero past the sequence end)."""
    if gate == "g":
        for r in T.Parallel(TB):
            t = _pos(reverse, bos, eos, it * TB + r)
            g_s[r] = T.if_then_else(it * TB + r < L, (g[t, i_h] + g_gamma[i_h]) * LOG2E, 0)
    if gate == "gk":
        for r, j in T.Parallel(TB, KP):
            t = _pos(reverse, bos, eos, it * TB + r)
            g_s[r, j] = T.if_then_else(it * TB + r < L and j < K, (g[t, i_h, j] + g_gamma[i_h]) * LOG2E, 0)


def _step_decay(gate, decay, g_s, r):
    return T.exp2(g_s[r]) if gate == "g" else decay


def _gate_shapes(gate, NG, H, K, TB, KP):
    """(shape of the gate input, shape of its staging buffer) per gate option."""
    if gate == "gk":
        return [NG, H, K], [TB, KP]
    return [NG, H], [TB]


def fused_recurrent_fwd_kernel(
    K: int,
    V: int,
    gate: str,
    reverse: bool,
    state_v_first: bool,
    dtype: str,
    # kernel config
    TB: int = 16,
    BV: int = 32,
    num_stages: int = 2,
    threads: int = 128,
):
    KP = pad_dim(K, 16)
    NV = cdiv(V, BV)
    Ttot, H, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")
    NG = T.dynamic("NG")
    SK, SV = (V, K) if state_v_first else (K, V)
    g_shape, gs_shape = _gate_shapes(gate, NG, H, K, TB, KP)

    @T.prim_func
    def fused_recurrent_fwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        g: T.Tensor(g_shape, "float32"),
        h0: T.Tensor([NH0, SK, SV], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        o: T.Tensor([Ttot, H, V], dtype),
        ht: T.Tensor([NHT, SK, SV], "float32"),
        scale: T.float32,
        use_h0: T.int32,
        store_ht: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            L = eos - bos
            decay = T.exp2(g_gamma[i_h] * LOG2E) if gate == "gamma" else 1.0
            g_s = T.alloc_shared(gs_shape, "float32")  # the steps' log2 decays (gates "g", "gk")

            q_s = T.alloc_shared([TB, KP], "float32")
            k_s = T.alloc_shared([TB, KP], "float32")
            v_s = T.alloc_shared([TB, BV], "float32")
            o_s = T.alloc_shared([TB, BV], "float32")
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_hq = T.alloc_fragment([KP, BV], "float32")
            b_o = T.alloc_fragment([BV], "float32")

            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        if state_v_first:
                            b_h[i, j] = h0[i_nh, i_v * BV + j, i]
                        else:
                            b_h[i, j] = h0[i_nh, i, i_v * BV + j]

            for it in T.Pipelined(T.ceildiv(L, TB), num_stages=num_stages):
                for r, j in T.Parallel(TB, KP):
                    t = _pos(reverse, bos, eos, it * TB + r)
                    q_s[r, j] = T.if_then_else(it * TB + r < L and j < K, q[t, i_h, j], 0)
                    k_s[r, j] = T.if_then_else(it * TB + r < L and j < K, k[t, i_h, j], 0)
                for r, j in T.Parallel(TB, BV):
                    t = _pos(reverse, bos, eos, it * TB + r)
                    v_s[r, j] = T.if_then_else(it * TB + r < L and i_v * BV + j < V, v[t, i_h, i_v * BV + j], 0)
                _stage_gates(gate, g_s, g, g_gamma, reverse, bos, eos, it, L, i_h, TB, K, KP)
                for r in T.serial(TB):
                    if gate == "gk":
                        # a decay per key row (staged as zero past the sequence end)
                        for i, j in T.Parallel(KP, BV):
                            b_h[i, j] = b_h[i, j] * T.exp2(g_s[r, i]) + k_s[r, i] * v_s[r, j]
                            b_hq[i, j] = b_h[i, j] * q_s[r, i]
                    else:
                        # steps past the sequence end (zero k, v) must not decay the state either
                        dr = T.if_then_else(it * TB + r < L, _step_decay(gate, decay, g_s, r), 1.0)
                        for i, j in T.Parallel(KP, BV):
                            b_h[i, j] = b_h[i, j] * dr + k_s[r, i] * v_s[r, j]
                            b_hq[i, j] = b_h[i, j] * q_s[r, i]
                    T.reduce_sum(b_hq, b_o, dim=0)
                    for j in T.Parallel(BV):
                        o_s[r, j] = b_o[j] * scale
                for r, j in T.Parallel(TB, BV):
                    if it * TB + r < L and i_v * BV + j < V:
                        o[_pos(reverse, bos, eos, it * TB + r), i_h, i_v * BV + j] = o_s[r, j]

            if store_ht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        if state_v_first:
                            ht[i_nh, i_v * BV + j, i] = b_h[i, j]
                        else:
                            ht[i_nh, i, i_v * BV + j] = b_h[i, j]

    return fused_recurrent_fwd


def fused_recurrent_bwd_kernel(
    K: int,
    V: int,
    gate: str,
    reverse: bool,
    state_v_first: bool,
    dtype: str,
    # kernel config
    TB: int = 16,
    BV: int = 32,
    num_stages: int = 2,
    threads: int = 128,
):
    KP = pad_dim(K, 16)
    NV = cdiv(V, BV)
    # one V tile writes dq, dk directly; several write fp32 partial sums; with a per-token gate they stay fp32 for
    # the gate's gradient (common.cumsum.gate_grad)
    dqk_dtype = dtype if NV == 1 and gate not in ("g", "gk") else "float32"
    Ttot, H, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")
    NG = T.dynamic("NG")
    SK, SV = (V, K) if state_v_first else (K, V)
    g_shape, gs_shape = _gate_shapes(gate, NG, H, K, TB, KP)

    @T.prim_func
    def fused_recurrent_bwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        g_gamma: T.Tensor([H], "float32"),
        g: T.Tensor(g_shape, "float32"),
        h0: T.Tensor([NH0, SK, SV], "float32"),
        dht: T.Tensor([NHT, SK, SV], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        dq: T.Tensor([NV, Ttot, H, K], dqk_dtype),
        dk: T.Tensor([NV, Ttot, H, K], dqk_dtype),
        dv: T.Tensor([Ttot, H, V], dtype),
        dh0: T.Tensor([NH0, SK, SV], "float32"),
        scale: T.float32,
        use_h0: T.int32,
        use_dht: T.int32,
    ):
        with T.Kernel(NV, N * H, threads=threads) as (i_v, i_nh):
            i_n = i_nh // H
            i_h = i_nh % H
            bos = cu[i_n]
            eos = cu[i_n + 1]
            L = eos - bos
            nb = T.ceildiv(L, TB)
            decay = T.exp2(g_gamma[i_h] * LOG2E) if gate == "gamma" else 1.0
            g_s = T.alloc_shared(gs_shape, "float32")  # the steps' log2 decays (gates "g", "gk")

            a_s = T.alloc_shared([TB, KP], "float32")
            k_s = T.alloc_shared([TB, KP], "float32")
            v_s = T.alloc_shared([TB, BV], "float32")
            do_s = T.alloc_shared([TB, BV], "float32")
            ak_s = T.alloc_shared([TB, KP], "float32")
            av_s = T.alloc_shared([TB, BV], "float32")
            b_h = T.alloc_fragment([KP, BV], "float32")
            b_x = T.alloc_fragment([KP, BV], "float32")
            b_rk = T.alloc_fragment([KP], "float32")
            b_rv = T.alloc_fragment([BV], "float32")

            # forward in the processing order: dq_t = scale * h_t do_t
            T.clear(b_h)
            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        if state_v_first:
                            b_h[i, j] = h0[i_nh, i_v * BV + j, i]
                        else:
                            b_h[i, j] = h0[i_nh, i, i_v * BV + j]
            for it in T.Pipelined(nb, num_stages=num_stages):
                for r, j in T.Parallel(TB, KP):
                    t = _pos(reverse, bos, eos, it * TB + r)
                    k_s[r, j] = T.if_then_else(it * TB + r < L and j < K, k[t, i_h, j], 0)
                for r, j in T.Parallel(TB, BV):
                    t = _pos(reverse, bos, eos, it * TB + r)
                    v_s[r, j] = T.if_then_else(it * TB + r < L and i_v * BV + j < V, v[t, i_h, i_v * BV + j], 0)
                    do_s[r, j] = T.if_then_else(it * TB + r < L and i_v * BV + j < V, do[t, i_h, i_v * BV + j], 0)
                _stage_gates(gate, g_s, g, g_gamma, reverse, bos, eos, it, L, i_h, TB, K, KP)
                for r in T.serial(TB):
                    if gate == "gk":
                        for i, j in T.Parallel(KP, BV):
                            b_h[i, j] = b_h[i, j] * T.exp2(g_s[r, i]) + k_s[r, i] * v_s[r, j]
                            b_x[i, j] = b_h[i, j] * do_s[r, j]
                    else:
                        dr = T.if_then_else(it * TB + r < L, _step_decay(gate, decay, g_s, r), 1.0)
                        for i, j in T.Parallel(KP, BV):
                            b_h[i, j] = b_h[i, j] * dr + k_s[r, i] * v_s[r, j]
                            b_x[i, j] = b_h[i, j] * do_s[r, j]
                    T.reduce_sum(b_x, b_rk, dim=1)
                    for i in T.Parallel(KP):
                        ak_s[r, i] = b_rk[i] * scale
                for r, j in T.Parallel(TB, KP):
                    if it * TB + r < L and j < K:
                        dq[i_v, _pos(reverse, bos, eos, it * TB + r), i_h, j] = ak_s[r, j]

            # backward in the processing order with b_h = dh:  dh_t = decay dh_{t+1} + scale q_t do_t^T
            T.clear(b_h)
            if use_dht == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        if state_v_first:
                            b_h[i, j] = dht[i_nh, i_v * BV + j, i]
                        else:
                            b_h[i, j] = dht[i_nh, i, i_v * BV + j]
            for jt in T.Pipelined(nb, num_stages=num_stages):
                it = nb - 1 - jt
                for r, j in T.Parallel(TB, KP):
                    t = _pos(reverse, bos, eos, it * TB + r)
                    a_s[r, j] = T.if_then_else(it * TB + r < L and j < K, q[t, i_h, j] * scale, 0)
                    k_s[r, j] = T.if_then_else(it * TB + r < L and j < K, k[t, i_h, j], 0)
                for r, j in T.Parallel(TB, BV):
                    t = _pos(reverse, bos, eos, it * TB + r)
                    v_s[r, j] = T.if_then_else(it * TB + r < L and i_v * BV + j < V, v[t, i_h, i_v * BV + j], 0)
                    do_s[r, j] = T.if_then_else(it * TB + r < L and i_v * BV + j < V, do[t, i_h, i_v * BV + j], 0)
                _stage_gates(gate, g_s, g, g_gamma, reverse, bos, eos, it, L, i_h, TB, K, KP)
                for rr in T.serial(TB):
                    r = TB - 1 - rr
                    for i, j in T.Parallel(KP, BV):
                        b_h[i, j] += a_s[r, i] * do_s[r, j]
                        b_x[i, j] = b_h[i, j] * v_s[r, j]
                    T.reduce_sum(b_x, b_rk, dim=1)
                    for i, j in T.Parallel(KP, BV):
                        b_x[i, j] = b_h[i, j] * k_s[r, i]
                    T.reduce_sum(b_x, b_rv, dim=0)
                    for i in T.Parallel(KP):
                        ak_s[r, i] = b_rk[i]
                    for j in T.Parallel(BV):
                        av_s[r, j] = b_rv[j]
                    # steps past the sequence end must not decay dh
                    if gate == "gk":
                        for i, j in T.Parallel(KP, BV):
                            b_h[i, j] *= T.exp2(g_s[r, i])
                    else:
                        for i, j in T.Parallel(KP, BV):
                            b_h[i, j] *= T.if_then_else(it * TB + r < L, _step_decay(gate, decay, g_s, r), 1.0)
                for r, j in T.Parallel(TB, KP):
                    if it * TB + r < L and j < K:
                        dk[i_v, _pos(reverse, bos, eos, it * TB + r), i_h, j] = ak_s[r, j]
                for r, j in T.Parallel(TB, BV):
                    if it * TB + r < L and i_v * BV + j < V:
                        dv[_pos(reverse, bos, eos, it * TB + r), i_h, i_v * BV + j] = av_s[r, j]

            if use_h0 == 1:
                for i, j in T.Parallel(KP, BV):
                    if i < K and i_v * BV + j < V:
                        if state_v_first:
                            dh0[i_nh, i_v * BV + j, i] = b_h[i, j]
                        else:
                            dh0[i_nh, i, i_v * BV + j] = b_h[i, j]

    return fused_recurrent_bwd


def _state_tail(K, V, state_v_first):
    return (V, K) if state_v_first else (K, V)


def fused_recurrent_fwd(
    q, k, v, *, gate: str, g_gamma, scale: float, initial_state, output_final_state: bool, reverse: bool,
    state_v_first: bool, meta: SeqMeta, g=None, **config,
):
    Ttot, H, K = q.shape
    V = v.shape[-1]
    tail = _state_tail(K, V, state_v_first)
    o = torch.empty_like(v)
    h0, use_h0 = state_or_dummy(initial_state, q, tail)
    ht = q.new_empty(meta.N * H if output_final_state else 1, *tail, dtype=torch.float32)
    config = tile_config("fused_recurrent_fwd", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    kernel = get_kernel(
        fused_recurrent_fwd_kernel,
        target_for(q.device),
        K=K,
        V=V,
        gate=gate,
        reverse=reverse,
        state_v_first=state_v_first,
        dtype=TORCH_TO_TL[q.dtype],
        **config,
    )
    kernel(q, k, v, g_gamma, gate_or_dummy(g, q), h0, meta.cu, o, ht, scale, use_h0, int(output_final_state))
    return o, (ht.view(meta.N, H, *tail) if output_final_state else None)


def fused_recurrent_bwd(
    q, k, v, do, dht, *, gate: str, g_gamma, scale: float, initial_state, reverse: bool, state_v_first: bool,
    meta: SeqMeta, g=None, **config,
):
    Ttot, H, K = q.shape
    V = v.shape[-1]
    config = tile_config("fused_recurrent_bwd", q, K=K, V=V, gate=gate, N=meta.N, overrides=config)
    NV = cdiv(V, config["BV"])
    tail = _state_tail(K, V, state_v_first)
    h0, use_h0 = state_or_dummy(initial_state, q, tail)
    dht_, use_dht = state_or_dummy(dht, q, tail)
    dqk_dtype = q.dtype if NV == 1 and gate not in ("g", "gk") else torch.float32
    dq = q.new_empty(NV, Ttot, H, K, dtype=dqk_dtype)
    dk = q.new_empty(NV, Ttot, H, K, dtype=dqk_dtype)
    dv = torch.empty_like(v)
    dh0 = torch.empty_like(h0)
    kernel = get_kernel(
        fused_recurrent_bwd_kernel,
        target_for(q.device),
        K=K,
        V=V,
        gate=gate,
        reverse=reverse,
        state_v_first=state_v_first,
        dtype=TORCH_TO_TL[q.dtype],
        **config,
    )
    kernel(q, k, v, do, g_gamma, gate_or_dummy(g, q), h0, dht_, meta.cu, dq, dk, dv, dh0, scale, use_h0, use_dht)
    dq = dq.sum(0) if NV > 1 else dq[0]
    dk = dk.sum(0) if NV > 1 else dk[0]
    dh0 = dh0.view(meta.N, H, *tail).to(initial_state.dtype) if use_h0 else None
    if gate in ("g", "gk"):
        # fp32 for the gate's gradient; the caller casts
        return dq, dk, dv, dh0
    return dq.to(q.dtype), dk.to(k.dtype), dv, dh0
