"""Normalised linear attention: y_t = o_t / d_t, d_t = scale * q_t . z_t + 1e-10, z_t = z_0 + sum_{s <= t} k_s
(`s >= t` in reverse), per sequence and head, in fp32.

Chunks of BT tokens, one block per (chunk, head):
- forward: the key sum entering each chunk, Z_c = z_0 + the keys of the sequence's earlier chunks (`chunk_scan`: one
  block per (sequence, head, key tile) walks the sequence's chunks; it also gives the final key sum), then
  d_i = scale * (q_i . Z_c + sum_{j <= i} q_i . k_j) from the chunk's causal q k^T row sums; y = o / d.
- backward, with c_i = -scale * (dy_i . y_i) / d_i (the gradient of q_i . z_i): do = dy / d; dq_i = c_i z_i =
  c_i (Z_c + the chunk's keys up to i); dk_j = sum_{i >= j} c_i q_i = R_c + the chunk's c_i q_i from j on (running
  sums down and up the chunk), with R_c the sum of c_i q_i over the later chunks of the sequence plus the final key
  sum's gradient (`chunk_scan` from the last chunk); dz_0 = that gradient plus the sum of c_i q_i over the sequence
  (the scan's total).
Two launches forward, three backward, and no PyTorch ops between them (many small PyTorch prefix ops would make the
op bound by host time).
Precision: the chunk's q k^T runs on tensor cores (exact products for bf16 / fp16, TF32 for fp32 inputs, whose
denominators then carry about 1e-3 relative error per product; signed q can make d much smaller than its terms).
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from ..common.utils import TORCH_TO_TL, get_kernel, pad_dim, seq_meta, target_for

EPS = 1e-10


def chunk_scan_kernel(K: int, dtype: str, weighted: bool, reverse: bool, with_init: bool, BT: int = 64, BK: int = 64,
                      threads: int = 128):
    """Per sequence n and head h, the running sum of the rows `(w[i, h] if weighted else 1) * x[i, h, :]` over the
    sequence's chunks (from the last one when reverse), fp32, starting from `init[n, h]` (zero without with_init):
    `s[c]` = the sum entering chunk c (its own rows excluded), `total[n]` = the sum after the last chunk."""
    KP = pad_dim(K)
    BK = min(BK, KP)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")
    NW, NI = T.dynamic("NW"), T.dynamic("NI")

    @T.prim_func
    def chunk_scan(
        x: T.Tensor([Ttot, H, K], dtype),
        w: T.Tensor([NW, H], "float32"),
        init: T.Tensor([NI, H, K], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_offsets: T.Tensor([N + 1], "int32"),
        s: T.Tensor([NT, H, K], "float32"),
        total: T.Tensor([N, H, K], "float32"),
    ):
        with T.Kernel(N, H, KP // BK, threads=threads) as (i_n, i_h, i_k):
            k0 = i_k * BK
            nc = chunk_offsets[i_n + 1] - chunk_offsets[i_n]
            b_x = T.alloc_fragment([BT, BK], "float32")
            b_s = T.alloc_fragment([BK], "float32")
            b_acc = T.alloc_fragment([BK], "float32")

            for j in T.Parallel(BK):
                if with_init:
                    b_acc[j] = T.if_then_else(k0 + j < K, init[i_n, i_h, k0 + j], 0)
                else:
                    b_acc[j] = 0
            for c in T.Pipelined(nc, num_stages=2):
                jc = nc - 1 - c if reverse else c
                t0 = cu[i_n] + jc * BT
                nvalid = T.min(cu[i_n + 1] - t0, BT)
                for i, j in T.Parallel(BT, BK):
                    if weighted:
                        b_x[i, j] = T.if_then_else(
                            i < nvalid and k0 + j < K, T.Cast("float32", x[t0 + i, i_h, k0 + j]) * w[t0 + i, i_h], 0
                        )
                    else:
                        b_x[i, j] = T.if_then_else(
                            i < nvalid and k0 + j < K, T.Cast("float32", x[t0 + i, i_h, k0 + j]), 0
                        )
                T.reduce_sum(b_x, b_s, dim=0)
                for j in T.Parallel(BK):
                    if k0 + j < K:
                        s[chunk_offsets[i_n] + jc, i_h, k0 + j] = b_acc[j]
                    b_acc[j] += b_s[j]
            for j in T.Parallel(BK):
                if k0 + j < K:
                    total[i_n, i_h, k0 + j] = b_acc[j]

    return chunk_scan


def normalize_fwd_kernel(K: int, V: int, dtype: str, BT: int = 64, threads: int = 128):
    KP, VP = pad_dim(K), pad_dim(V)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def normalize_fwd(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        o: T.Tensor([Ttot, H, V], dtype),
        zc: T.Tensor([NT, H, K], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        y: T.Tensor([Ttot, H, V], dtype),
        den: T.Tensor([Ttot, H], "float32"),
        scale: T.float32,
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            z_s = T.alloc_shared([KP], "float32")
            d_s = T.alloc_shared([BT], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")
            b_qz = T.alloc_fragment([BT, KP], "float32")
            b_intra = T.alloc_fragment([BT], "float32")
            b_inter = T.alloc_fragment([BT], "float32")
            b_y = T.alloc_fragment([BT, VP], "float32")

            for i, j in T.Parallel(BT, KP):
                q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
            for j in T.Parallel(KP):
                z_s[j] = T.if_then_else(j < K, zc[i_c, i_h, j], 0)
            T.gemm(q_s, k_s, b_a, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(BT, BT):
                b_a[i, j] = T.if_then_else(i >= j, b_a[i, j], 0)
            T.reduce_sum(b_a, b_intra, dim=1)
            for i in T.Parallel(BT):
                d_s[i] = b_intra[i]
            for i, j in T.Parallel(BT, KP):
                b_qz[i, j] = T.Cast("float32", q_s[i, j]) * z_s[j]
            T.reduce_sum(b_qz, b_inter, dim=1)
            # the two row sums come in the layouts of their own fragments: meet in shared memory
            for i in T.Parallel(BT):
                d_s[i] = scale * (d_s[i] + b_inter[i]) + EPS
            for i, j in T.Parallel(BT, VP):
                b_y[i, j] = T.if_then_else(i < nvalid and j < V, T.Cast("float32", o[t0 + i, i_h, j]), 0) / d_s[i]
            for i, j in T.Parallel(BT, VP):
                if i < nvalid and j < V:
                    y[t0 + i, i_h, j] = b_y[i, j]
            for i in T.Parallel(BT):
                if i < nvalid:
                    den[t0 + i, i_h] = d_s[i]

    return normalize_fwd


def normalize_bwd_c_kernel(V: int, dtype: str, BT: int = 64, threads: int = 128):
    """c = -scale * (dy . y) / d (fp32 `[Ttot, H]`) and do = dy / d."""
    VP = pad_dim(V)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def normalize_bwd_c(
        dy: T.Tensor([Ttot, H, V], dtype),
        y: T.Tensor([Ttot, H, V], dtype),
        den: T.Tensor([Ttot, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        do: T.Tensor([Ttot, H, V], dtype),
        c: T.Tensor([Ttot, H], "float32"),
        scale: T.float32,
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            d_s = T.alloc_shared([BT], "float32")
            b_dy = T.alloc_fragment([BT, VP], "float32")
            b_p = T.alloc_fragment([BT, VP], "float32")
            b_r = T.alloc_fragment([BT], "float32")
            for i in T.Parallel(BT):
                d_s[i] = T.if_then_else(i < nvalid, den[t0 + i, i_h], 1.0)
            for i, j in T.Parallel(BT, VP):
                b_dy[i, j] = T.if_then_else(i < nvalid and j < V, T.Cast("float32", dy[t0 + i, i_h, j]), 0)
                b_p[i, j] = b_dy[i, j] * T.if_then_else(i < nvalid and j < V, T.Cast("float32", y[t0 + i, i_h, j]), 0)
            T.reduce_sum(b_p, b_r, dim=1)
            for i, j in T.Parallel(BT, VP):
                if i < nvalid and j < V:
                    do[t0 + i, i_h, j] = b_dy[i, j] / d_s[i]
            for i in T.Parallel(BT):
                if i < nvalid:
                    c[t0 + i, i_h] = -scale * b_r[i] / d_s[i]

    return normalize_bwd_c


def normalize_bwd_dqk_kernel(K: int, dtype: str, BT: int = 64, threads: int = 128):
    """dq_i = c_i (Z_c + sum_{j <= i} k_j) and dk_j = R_c + sum_{i >= j} c_i q_i, in the input dtype: running fp32 sums
    down and up the chunk's rows, staged in shared memory (several times faster than a [BT, BT] fp32 mask product)."""
    KP = pad_dim(K)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def normalize_bwd_dqk(
        q: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        c: T.Tensor([Ttot, H], "float32"),
        zc: T.Tensor([NT, H, K], "float32"),
        rc: T.Tensor([NT, H, K], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dq: T.Tensor([Ttot, H, K], dtype),
        dk: T.Tensor([Ttot, H, K], dtype),
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            q_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            c_s = T.alloc_shared([BT], "float32")
            b_z = T.alloc_fragment([KP], "float32")  # the key sum at row i
            b_r = T.alloc_fragment([KP], "float32")  # R_c plus c q over rows >= j

            for i in T.Parallel(BT):
                c_s[i] = T.if_then_else(i < nvalid, c[t0 + i, i_h], 0)
            for i, j in T.Parallel(BT, KP):
                q_s[i, j] = T.if_then_else(i < nvalid and j < K, q[t0 + i, i_h, j], 0)
                k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
            for j in T.Parallel(KP):
                b_z[j] = T.if_then_else(j < K, zc[i_c, i_h, j], 0)
                b_r[j] = T.if_then_else(j < K, rc[i_c, i_h, j], 0)
            for i in T.serial(BT):
                for j in T.Parallel(KP):
                    b_z[j] += T.Cast("float32", k_s[i, j])
                    if i < nvalid and j < K:
                        dq[t0 + i, i_h, j] = c_s[i] * b_z[j]
            for i in T.serial(BT):
                for j in T.Parallel(KP):
                    b_r[j] += c_s[BT - 1 - i] * T.Cast("float32", q_s[BT - 1 - i, j])
                    if BT - 1 - i < nvalid and j < K:
                        dk[t0 + BT - 1 - i, i_h, j] = b_r[j]

    return normalize_bwd_dqk


def _acc(x):
    """the kernels' accumulation dtype: fp32 (fp64 only where PyTorch emulations of the kernels run in tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_scan(x, w, init, meta, BT, reverse: bool, rows: int | None = None, **config):
    """(the sum entering each chunk `[NT, H, K]`, the sum over each sequence `[N, H, K]`), fp32, of the rows of x
    (weighted by w `[Ttot, H]` when given), per sequence from init `[N, H, K]` (or zero), from the last chunk when
    reverse; `rows` >= NT allocates that many chunk rows (a shape known without the sequence lengths). `config`
    overrides the tile config (kernel "linear_attn_key_scan")."""
    Ttot, H, K = x.shape
    s = torch.empty(rows if rows is not None else meta.NT, H, K, dtype=_acc(x), device=x.device)
    total = torch.empty(meta.N, H, K, dtype=_acc(x), device=x.device)
    config = tile_config("linear_attn_key_scan", x, K=K, V=K, gate="none", N=meta.N, overrides=config)
    kernel = get_kernel(chunk_scan_kernel, target_for(x.device), K=K, dtype=TORCH_TO_TL[x.dtype],
                        weighted=w is not None, reverse=reverse, with_init=init is not None, BT=BT, **config)
    kernel(x, w if w is not None else _dummy(x, H), init if init is not None else _dummy(x, H, K), meta.cu,
           meta.chunk_offsets, s, total)
    return s, total


def _normalize_fwd(q_, k_, o_, zc, meta, scale: float, BT: int, **config):
    """(y `[Ttot, H, V]` in o's dtype, the denominators `[Ttot, H]` fp32) of the packed q, k, o and the key sums
    entering each chunk; `config` overrides the tile config (kernel "linear_attn_normalize_fwd")."""
    K, V = q_.shape[-1], o_.shape[-1]
    y, den = torch.empty_like(o_), torch.empty(o_.shape[:2], dtype=_acc(q_), device=o_.device)
    config = tile_config("linear_attn_normalize_fwd", q_, K=K, V=V, gate="none", N=meta.N, overrides=config)
    kernel = get_kernel(normalize_fwd_kernel, target_for(q_.device), K=K, V=V, dtype=TORCH_TO_TL[q_.dtype], BT=BT,
                        **config)
    # the kernels index the first NT rows (the buffer's shape is known from the input shapes alone)
    kernel(q_, k_, o_, zc[:meta.NT], meta.cu, meta.chunk_indices, y, den, scale)
    return y, den


def _normalize_bwd_c(dy_, y_, den, meta, scale: float, BT: int, **config):
    """(do `[Ttot, H, V]` in y's dtype, the row weights c `[Ttot, H]` fp32); `config` overrides the tile config
    (kernel "linear_attn_normalize_bwd_c")."""
    V = y_.shape[-1]
    do, c = torch.empty_like(y_), torch.empty(y_.shape[:2], dtype=_acc(y_), device=y_.device)
    config = tile_config("linear_attn_normalize_bwd_c", y_, K=V, V=V, gate="none", N=meta.N, overrides=config)
    get_kernel(normalize_bwd_c_kernel, target_for(y_.device), V=V, dtype=TORCH_TO_TL[y_.dtype], BT=BT, **config)(
        dy_, y_, den, meta.cu, meta.chunk_indices, do, c, scale)
    return do, c


def _normalize_bwd_dqk(q_, k_, c, zc, rc, meta, BT: int, **config):
    """(dq, dk `[Ttot, H, K]` in q's dtype) of the normalisation; `config` overrides the tile config (kernel
    "linear_attn_normalize_bwd_dqk")."""
    K = q_.shape[-1]
    dq, dk = torch.empty_like(q_), torch.empty_like(k_)
    config = tile_config("linear_attn_normalize_bwd_dqk", q_, K=K, V=K, gate="none", N=meta.N, overrides=config)
    get_kernel(normalize_bwd_dqk_kernel, target_for(q_.device), K=K, dtype=TORCH_TO_TL[q_.dtype], BT=BT, **config)(
        q_, k_, c, zc[:meta.NT], rc, meta.cu, meta.chunk_indices, dq, dk)
    return dq, dk


def _dummy(x, *shape):
    """a one-row fp32 stand-in for an operand a kernel built without it never reads."""
    return x.new_empty(1, *shape, dtype=_acc(x))


def chunk_rows(B: int, T: int, N: int, BT: int = 64) -> int:
    """an upper bound of the chunks of B x T tokens split into N sequences (each adds at most one partial chunk)."""
    return B * T // BT + N


def _packed(x, reverse: bool):
    """`[B, T, H, D]` -> `[B * T, H, D]` in processing order: a reversed packed batch has each sequence reversed
    and the sequences in reverse order."""
    if reverse:
        x = x.flip(1)
    return x.flatten(0, 1).contiguous()


def _meta(q, reverse: bool, cu_seqlens, BT: int):
    B, T = q.shape[:2]
    if reverse and cu_seqlens is not None:
        cu_seqlens = B * T - cu_seqlens.flip(0)
    return seq_meta(B, T, cu_seqlens, BT, q.device)


def key_sum_normalize_fwd(o, q, k, scale: float, z_init=None, reverse: bool = False, cu_seqlens=None, BT: int = 64):
    """`fla_tl.reference.linear_attn.normalize_with_key_sum` on the TileLang stages: (y in o's dtype, the final key
    sum `[N, 1, H, K]` fp32) and the residuals of :func:`key_sum_normalize_bwd` (the denominators `[B * T, H]` and
    the key sums entering each chunk, in processing order)."""
    B, T, H, K = q.shape
    meta = _meta(q, reverse, cu_seqlens, BT)
    o_, q_, k_ = (_packed(x, reverse) for x in (o, q, k))
    z0 = None
    if z_init is not None:
        z0 = (z_init.flip(0) if reverse and cu_seqlens is not None else z_init)[:, 0].to(_acc(q)).contiguous()
    zc, z = _chunk_scan(k_, None, z0, meta, BT, reverse=False, rows=chunk_rows(B, T, meta.N, BT))
    if meta.NT:
        y, den = _normalize_fwd(q_, k_, o_, zc, meta, scale, BT)
    else:
        y, den = torch.empty_like(o_), torch.empty(o_.shape[:2], dtype=_acc(q), device=o.device)
    y = y.view(B, T, H, -1)
    if reverse:
        y = y.flip(1)
        z = z.flip(0) if cu_seqlens is not None else z
    return y, z[:, None], den, zc


def key_sum_normalize_bwd(q, k, y, den, zc, dy, dz, *, scale: float, has_z0: bool, reverse: bool = False,
                          cu_seqlens=None, BT: int = 64):
    """the gradients (do, dq, dk, dz_init or None) of :func:`key_sum_normalize_fwd` from the gradients of y and of
    the final key sum (either may be None)."""
    B, T, H, K = q.shape
    meta = _meta(q, reverse, cu_seqlens, BT)
    q_, k_, y_ = (_packed(x, reverse) for x in (q, k, y))
    dy_ = _packed(dy, reverse) if dy is not None else torch.zeros_like(y_)
    if dz is None:
        dzf = q.new_zeros(meta.N, H, K, dtype=_acc(q))
    else:
        dzf = (dz.flip(0) if reverse and cu_seqlens is not None else dz)[:, 0].to(_acc(q)).contiguous()
    dz0 = dzf
    if meta.NT:
        do, c = _normalize_bwd_c(dy_, y_, den, meta, scale, BT)
        # R_c: the final key sum's gradient (every key feeds it) plus c_i q_i over the later chunks of the sequence;
        # the scan's total is dz_0
        rc, dz0 = _chunk_scan(q_, c, dzf, meta, BT, reverse=True)
        dq, dk = _normalize_bwd_dqk(q_, k_, c, zc, rc, meta, BT)
    else:
        do, dq, dk = torch.empty_like(y_), torch.empty_like(q_), torch.empty_like(k_)
    grads = [x.view(B, T, H, -1) for x in (do, dq, dk)]
    if reverse:
        grads = [x.flip(1) for x in grads]
    if not has_z0:
        return (*grads, None)
    dz0 = dz0.flip(0) if reverse and cu_seqlens is not None else dz0
    return (*grads, dz0[:, None])
