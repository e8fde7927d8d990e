"""Per-token gate stages: the chunk-local cumulative gate the chunk kernels read, and the gate's gradient.

- `chunk_gate_cumsum`: gc[t] = log2(e) * sum_{s <= t in t's chunk} (g[s] + g_gamma), fp32 `[Ttot, H]`.
- `gate_grad`: the gradient of a per-token log gate. With G_t the cumulative log gate in processing order (the
  state at t carries exp(G_t - G_s) of token s), every term of the output and the final state is scaled by
  exp(G_t - G_s), so dL/dG_t = q_t . dq_t - k_t . dk_t (with the full gradients dq, dk), plus <ht, dht> at the last
  step. Hence dg_t = sum over the steps from t to the end of the sequence (in processing order) of
  (q . dq - k . dk) + <ht, dht>: a row dot product per token, then a reverse cumulative sum per sequence (a forward
  one for `reverse` recurrences) started at <ht, dht>.

The sums run in fp32; chunks of 64 tokens are staged through shared memory and scanned by one thread per head.

Two forms. `gate_grad` scans r over the rest of the whole sequence: used by fused_recurrent, whose dq, dk come in
fp32 from fp32 arithmetic. `gate_grad_chunk` scans r only inside each chunk and adds <S_c, dh[c]>, S_c the state
leaving chunk c (which equals the sum of r over all later chunks plus <ht, dht>): used by the chunk kernels, whose dq,
dk carry bf16 intermediates; summing their r along a whole sequence lets the error grow with T, while the
chunk-local form's error stays that of one chunk's sum.
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from .gates import activated_gate
from .utils import LOG2E, TORCH_TO_TL, SeqMeta, get_kernel, pad_dim, placeholder, target_for


def chunk_gate_cumsum_kernel(g_dtype: str, act: str = "", group: int = 1, BT: int = 64, BH: int = 64):
    """`act` "softplus" / "sigmoid": the log gates are KDA's activation (`gates.activated_gate`) of the raw input,
    with column c reading dt_bias[c] and A_log[c // group] (per-key gates flattened `[Ttot, HV * K]`: group = K)."""
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")
    NAL, NDB = T.dynamic("NAL"), T.dynamic("NDB")
    activated = act != ""

    @T.prim_func
    def chunk_gate_cumsum(
        g: T.Tensor([Ttot, H], g_dtype),
        g_gamma: T.Tensor([H], "float32"),
        A_log: T.Tensor([NAL], "float32"),
        dt_bias: T.Tensor([NDB], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        gc: T.Tensor([Ttot, H], "float32"),
        lower_bound: T.float32,
    ):
        with T.Kernel(NT, T.ceildiv(H, BH), threads=BH) as (i_c, i_hb):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            g_s = T.alloc_shared([BT, BH], g_dtype)
            acc = T.alloc_fragment([BH], "float32")
            lam = T.alloc_fragment([BH], "float32")

            # one bulk copy of the chunk's tile (rows past the sequence end are staged too, never stored); each
            # thread then scans its column and stores every row straight from its registers
            T.copy(g[t0, i_hb * BH], g_s)
            for h in T.Parallel(BH):
                acc[h] = 0
                lam[h] = g_gamma[T.min(i_hb * BH + h, H - 1)]
            if activated:
                bias = T.alloc_fragment([BH], "float32")
                rate = T.alloc_fragment([BH], "float32")
                for h in T.Parallel(BH):
                    bias[h] = dt_bias[T.min(i_hb * BH + h, H - 1)]
                    rate[h] = T.exp(A_log[T.min(i_hb * BH + h, H - 1) // group])
            for i in T.serial(BT):
                for h in T.Parallel(BH):
                    if activated:
                        acc[h] += (activated_gate(act, T.Cast("float32", g_s[i, h]) + bias[h], rate[h], lower_bound)
                                   + lam[h]) * LOG2E
                    else:
                        acc[h] += (T.Cast("float32", g_s[i, h]) + lam[h]) * LOG2E
                    if i < nvalid and i_hb * BH + h < H:
                        gc[t0 + i, i_hb * BH + h] = acc[h]

    return chunk_gate_cumsum


# the bulk copy as plain (or cp.async) loads: a TMA copy needs 16-byte row strides, which `H` does not promise
chunk_gate_cumsum_kernel.pass_configs = {"tl.disable_tma_lower": True, "tl.disable_warp_specialized": True}


def gate_dot_kernel(K: int, dtype: str, grad_dtype: str | None = None, BT: int = 64, threads: int = 128):
    KP = pad_dim(K)
    grad_dtype = grad_dtype or dtype
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def gate_dot(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        dq: T.Tensor([Ttot, H, K], grad_dtype),
        dk: T.Tensor([Ttot, H, K], grad_dtype),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        r: T.Tensor([Ttot, H], "float32"),
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            b_x = T.alloc_fragment([BT, KP], "float32")
            b_r = T.alloc_fragment([BT], "float32")

            # r_t = q_t . dq_t - k_t . dk_t in fp32
            for i, j in T.Parallel(BT, KP):
                b_x[i, j] = T.if_then_else(
                    i < nvalid and j < K,
                    T.Cast("float32", q[t0 + i, i_h, j]) * T.Cast("float32", dq[t0 + i, i_h, j])
                    - T.Cast("float32", k[t0 + i, i_h, j]) * T.Cast("float32", dk[t0 + i, i_h, j]),
                    0,
                )
            T.reduce_sum(b_x, b_r, dim=1)
            for i in T.Parallel(BT):
                if i < nvalid:
                    r[t0 + i, i_h] = b_r[i]

    return gate_dot


def sequence_cumsum_kernel(reverse: bool, out_dtype: str, BT: int = 64, BH: int = 32):
    Ttot, H, N, NO = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NO")

    @T.prim_func
    def sequence_cumsum(
        x: T.Tensor([Ttot, H], "float32"),
        offset: T.Tensor([NO, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        y: T.Tensor([Ttot, H], out_dtype),
        use_offset: T.int32,
    ):
        with T.Kernel(T.ceildiv(H, BH), N, threads=BH) as (i_hb, i_n):
            bos = cu[i_n]
            eos = cu[i_n + 1]
            nc = T.ceildiv(eos - bos, BT)
            x_s = T.alloc_shared([BT, BH], "float32")
            acc = T.alloc_fragment([BH], "float32")

            T.clear(acc)
            if use_offset == 1:
                for h in T.Parallel(BH):
                    if i_hb * BH + h < H:
                        acc[h] = offset[i_n, i_hb * BH + h]
            for cc in T.serial(nc):
                t0 = bos + (nc - 1 - cc if reverse else cc) * BT
                nvalid = T.min(eos - t0, BT)
                for i, h in T.Parallel(BT, BH):
                    x_s[i, h] = T.if_then_else(i < nvalid and i_hb * BH + h < H, x[t0 + i, i_hb * BH + h], 0)
                for ii in T.serial(BT):
                    i = BT - 1 - ii if reverse else ii
                    for h in T.Parallel(BH):
                        acc[h] += x_s[i, h]
                        x_s[i, h] = acc[h]
                for i, h in T.Parallel(BT, BH):
                    if i < nvalid and i_hb * BH + h < H:
                        y[t0 + i, i_hb * BH + h] = x_s[i, h]

    return sequence_cumsum


def chunk_state_dot_kernel(K: int, V: int, h_dtype: str, per_key: bool = False, BT: int = 64, threads: int = 128):
    """c[i_c, h] = <S, dh[i_c, h]> with S the state leaving chunk i_c: h[i_c + 1] inside a sequence, the final state
    ht after its last chunk; `per_key`: the sums over V alone, c[i_c, h, k]."""
    KP = pad_dim(K)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")
    cshape = [NT, H, K] if per_key else [NT, H]

    @T.prim_func
    def chunk_state_dot(
        h: T.Tensor([NT, H, K, V], h_dtype),
        dh: T.Tensor([NT, H, K, V], h_dtype),
        ht: T.Tensor([N, H, K, V], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        c: T.Tensor(cshape, "float32"),
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            last = (chunk_indices[i_c, 1] + 1) * BT >= cu[i_n + 1] - cu[i_n]
            b_x = T.alloc_fragment([KP, BT], "float32")
            b_r = T.alloc_fragment([KP], "float32")
            b_s = T.alloc_fragment([1], "float32")
            T.clear(b_x)
            for jv in T.serial(T.ceildiv(V, BT)):
                for i, j in T.Parallel(KP, BT):
                    if i < K and jv * BT + j < V:
                        if last:
                            b_x[i, j] += ht[i_n, i_h, i, jv * BT + j] * T.Cast("float32", dh[i_c, i_h, i, jv * BT + j])
                        else:
                            b_x[i, j] += T.Cast("float32", h[i_c + 1, i_h, i, jv * BT + j]) * T.Cast(
                                "float32", dh[i_c, i_h, i, jv * BT + j])
            T.reduce_sum(b_x, b_r, dim=1)
            if per_key:
                for i in T.Parallel(KP):
                    if i < K:
                        c[i_c, i_h, i] = b_r[i]
            else:
                T.reduce_sum(b_r, b_s, dim=0)
                c[i_c, i_h] = b_s[0]

    return chunk_state_dot


def chunk_reverse_cumsum_kernel(out_dtype: str, BT: int = 64, BH: int = 32):
    """y[t] = sum_{t' >= t in t's chunk} x[t'] + c[chunk of t] (chunk-local reverse inclusive scan plus an offset)."""
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def chunk_reverse_cumsum(
        x: T.Tensor([Ttot, H], "float32"),
        c: T.Tensor([NT, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        y: T.Tensor([Ttot, H], out_dtype),
    ):
        with T.Kernel(NT, T.ceildiv(H, BH), threads=BH) as (i_c, i_hb):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            x_s = T.alloc_shared([BT, BH], "float32")
            acc = T.alloc_fragment([BH], "float32")

            for i, h in T.Parallel(BT, BH):
                x_s[i, h] = T.if_then_else(i < nvalid and i_hb * BH + h < H, x[t0 + i, i_hb * BH + h], 0)
            for h in T.Parallel(BH):
                acc[h] = T.if_then_else(i_hb * BH + h < H, c[i_c, T.min(i_hb * BH + h, H - 1)], 0)
            for ii in T.serial(BT):
                for h in T.Parallel(BH):
                    acc[h] += x_s[BT - 1 - ii, h]
                    x_s[BT - 1 - ii, h] = acc[h]
            for i, h in T.Parallel(BT, BH):
                if i < nvalid and i_hb * BH + h < H:
                    y[t0 + i, i_hb * BH + h] = x_s[i, h]

    return chunk_reverse_cumsum


def chunk_gate_cumsum(g: torch.Tensor, g_gamma: torch.Tensor, meta: SeqMeta, BT: int = 64, act=None, group: int = 1,
                      **config) -> torch.Tensor:
    """the chunk-local inclusive cumulative log2 gates `[Ttot, H]` fp32 of `g` `[Ttot, H]` plus `g_gamma` `[H]`; with
    `act` (a `fused_recurrent_delta.GateActivation`: A_log `[H / group]`, dt_bias `[H]`) of KDA's activation of `g`.
    `config` overrides the tile config (kernel "gate_cumsum")."""
    gc = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    if meta.NT == 0:
        return gc
    H = g.shape[1]
    config = tile_config("gate_cumsum", g, K=0, V=0, gate="none", N=meta.N, overrides=config)
    kernel = get_kernel(chunk_gate_cumsum_kernel, target_for(g.device), g_dtype=TORCH_TO_TL[g.dtype],
                        **({"act": act.kind, "group": group} if act is not None else {}), BT=BT, **config)
    A_log = act.A_log if act is not None and act.A_log is not None else placeholder((H // group,), torch.float32,
                                                                                      g.device)
    dt_bias = act.dt_bias if act is not None and act.dt_bias is not None else placeholder((H,), torch.float32, g.device)
    kernel(g, g_gamma, A_log.float().contiguous(), dt_bias.float().reshape(-1).contiguous(), meta.cu,
           meta.chunk_indices, gc, float(act.lower_bound or 0.0) if act is not None else 0.0)
    return gc


def _sequence_scan(r, *, meta: SeqMeta, reverse: bool, out_dtype: torch.dtype, offset=None, BT: int = 64, **config):
    """the per-sequence sum of r `[Ttot, C]` fp32 from each step to the end of the recurrence's processing order (a
    reverse scan for a forward recurrence, a forward scan for a `reverse` one), started at `offset` `[N, C]` (None:
    zero), in `out_dtype`; `config` overrides the tile config (kernel "gate_grad_scan")."""
    Ttot, C = r.shape
    out = torch.empty(Ttot, C, dtype=out_dtype, device=r.device)
    config = tile_config("gate_grad_scan", r, K=0, V=0, gate="none", N=meta.N, overrides=config)
    scan = get_kernel(sequence_cumsum_kernel, target_for(r.device), reverse=not reverse,
                      out_dtype=TORCH_TO_TL[out_dtype], BT=BT, **config)
    start = offset.reshape(-1, C).float().contiguous() if offset is not None else r.new_empty(1, C)
    scan(r, start, meta.cu, out, int(offset is not None))
    return out


def gate_grad(q, k, dq, dk, *, meta: SeqMeta, reverse: bool, dg_dtype: torch.dtype, state_term=None, BT: int = 64):
    """dg `[Ttot, H]` in `dg_dtype` of a per-token log gate from q, k and their full gradients (all `[Ttot, H, K]`,
    one dtype), per the identity in the module docstring; `state_term` `[N, H]` fp32 is <ht, dht> (None: zero)."""
    Ttot, H, K = q.shape
    if meta.NT == 0:
        return torch.empty(Ttot, H, dtype=dg_dtype, device=q.device)
    r = gate_rows(q, k, dq, dk, meta=meta, BT=BT)
    return _sequence_scan(r, meta=meta, reverse=reverse, out_dtype=dg_dtype, offset=state_term, BT=BT)


def per_key_gate_grad(q, k, dq, dk, *, meta: SeqMeta, reverse: bool, dg_dtype: torch.dtype, state_term=None,
                      BT: int = 64):
    """dg `[Ttot, H, K]` in `dg_dtype` of a per-key log gate (GLA's): the identity of `gate_grad` per key channel,
    r = q * dq - k * dk without the sum over K, from fp32 dq, dk; `state_term` `[N, H, K]` fp32 is sum_v ht dht."""
    Ttot, H, K = q.shape
    if meta.NT == 0:
        return torch.empty(Ttot, H, K, dtype=dg_dtype, device=q.device)
    r = (q.float() * dq - k.float() * dk).view(Ttot, H * K)
    return _sequence_scan(r, meta=meta, reverse=reverse, out_dtype=dg_dtype, offset=state_term, BT=BT).view(Ttot, H, K)


def chunk_state_terms(h, dh, ht, ref, *, meta: SeqMeta, per_key: bool, BT: int = 64, **config) -> torch.Tensor:
    """<S_c, dh[c]> per chunk `[NT, H]` fp32 (`per_key`: the sums over V alone, `[NT, H, K]`) with S_c the state leaving
    chunk c (`h` `[NT, H, K, V]` the states entering each chunk, `ht` `[N, H, K, V]` the final states, `dh` the
    gradients of the states leaving each chunk); `ref` `[Ttot, H, *]` a tensor of the op's tokens (it keys the tile
    config); `config` overrides the tile config (kernel "chunk_state_dot")."""
    _, H, K, V = h.shape
    c = torch.empty(meta.NT, H, *((K,) if per_key else ()), dtype=torch.float32, device=h.device)
    config = tile_config("chunk_state_dot", ref, K=K, V=V, gate="none", N=meta.N, overrides=config)
    state_dot = get_kernel(chunk_state_dot_kernel, target_for(h.device), K=K, V=V, h_dtype=TORCH_TO_TL[h.dtype],
                           per_key=per_key, BT=BT, **config)
    state_dot(h, dh, ht.float().contiguous(), meta.cu, meta.chunk_indices, c)
    return c


def per_key_gate_grad_chunk(r, h, dh, ht, *, meta: SeqMeta, dg_dtype: torch.dtype, BT: int = 64):
    """dg `[Ttot, H, K]` of a per-key log gate in the chunk-local form of `gate_grad_chunk`, per key channel: within
    chunk c the reverse sum of r = q * dq - k * dk `[Ttot, H, K]` fp32 over the rest of the chunk, plus
    sum_v S_c[k, v] dh[c][k, v] with S_c the state leaving chunk c (`h` the states entering each chunk, `ht`
    `[N, H, K, V]` fp32 the final states, `dh` the gradients of the states leaving each chunk)."""
    Ttot, H, K = r.shape
    if meta.NT == 0:
        return torch.empty(Ttot, H, K, dtype=dg_dtype, device=r.device)
    c = chunk_state_terms(h, dh, ht, r, meta=meta, per_key=True, BT=BT)
    dg = chunk_gate_grad_scan(r.view(Ttot, H * K), c.view(meta.NT, H * K), meta=meta, dg_dtype=dg_dtype, BT=BT)
    return dg.view(Ttot, H, K)


def gate_rows(q, k, dq, dk, *, meta: SeqMeta, BT: int = 64, **config) -> torch.Tensor:
    """r = q . dq - k . dk per row `[Ttot, H]` fp32 (the rows of `gate_grad_chunk`); `config` overrides the tile
    config (kernel "gate_dot")."""
    Ttot, H, K = q.shape
    r = torch.empty(Ttot, H, dtype=torch.float32, device=q.device)
    if meta.NT > 0:
        config = tile_config("gate_dot", q, K=K, V=K, gate="none", N=meta.N, overrides=config)
        dot = get_kernel(gate_dot_kernel, target_for(q.device), K=K, dtype=TORCH_TO_TL[q.dtype],
                         grad_dtype=TORCH_TO_TL[dq.dtype], BT=BT, **config)
        dot(q, k, dq, dk, meta.cu, meta.chunk_indices, r)
    return r


def gate_grad_chunk(q, k, dq, dk, h, dh, ht, *, meta: SeqMeta, dg_dtype: torch.dtype, BT: int = 64):
    """dg `[Ttot, H]` of a per-token log gate in the chunk-local form: within chunk c, the reverse sum of
    r = q . dq - k . dk over the rest of the chunk, plus <S_c, dh[c]> with S_c the state leaving chunk c (`h` `[NT, H,
    K, V]` the states entering each chunk, `ht` `[N, H, K, V]` fp32 the final states, `dh` the gradients of the states
    leaving each chunk). The sum over the later chunks is folded into that one state product, so rounding errors of
    r do not add up along the sequence."""
    Ttot, H, K = q.shape
    if meta.NT == 0:
        return torch.empty(Ttot, H, dtype=dg_dtype, device=q.device)
    r = gate_rows(q, k, dq, dk, meta=meta, BT=BT)
    c = chunk_state_terms(h, dh, ht, q, meta=meta, per_key=False, BT=BT)
    return chunk_gate_grad_scan(r, c, meta=meta, dg_dtype=dg_dtype, BT=BT)


def chunk_gate_grad_scan(r, c, *, meta: SeqMeta, dg_dtype: torch.dtype, BT: int = 64, **config) -> torch.Tensor:
    """dg `[Ttot, H]` from its rows r `[Ttot, H]` fp32 and the chunks' state terms c `[NT, H]` fp32 (see
    `gate_grad_chunk`): within each chunk the reverse sum of r plus the chunk's c; `config` overrides the tile config
    (kernel "gate_grad_chunk_scan")."""
    dg = torch.empty(r.shape, dtype=dg_dtype, device=r.device)
    if meta.NT > 0:
        config = tile_config("gate_grad_chunk_scan", r, K=0, V=0, gate="none", N=meta.N, overrides=config)
        scan = get_kernel(chunk_reverse_cumsum_kernel, target_for(r.device), out_dtype=TORCH_TO_TL[dg_dtype], BT=BT,
                          **config)
        scan(r, c, meta.cu, meta.chunk_indices, dg)
    return dg
