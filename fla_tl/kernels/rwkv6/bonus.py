"""RWKV6 on GLA's kernels: the one-token query shift and the bonus term, and the forward and backward of both modes
(`rwkv6_fwd` / `rwkv6_bwd`, on the launchers of `chunk.py` or `fused_recurrent.py`).

RWKV6's query at t reads the state before token t, h_{t-1}, the state a GLA query at t - 1 reads. So the gated part
of the output is GLA's output with the queries moved one token back, r'_{t-1} = r_t (within each sequence, in the
recurrence's processing order), read one token later: o_t = o'_{t-1}. The first token of a sequence reads the
initial state, scale r_t^T h0, and the last token's shifted query is zero. The decay `w` enters GLA unshifted, so
GLA's gate gradient is RWKV6's `dw`. The bonus is elementwise: o_t += a_t v_t with a_t = scale sum_k r_t u k_t; its
gradients, with s_t = do_t . v_t: dv_t += a_t do_t, dr_t += scale s_t u k_t, dk_t += scale s_t u r_t,
du = scale sum_t s_t r_t k_t.
"""

import tilelang.language as T
import torch

from ...autotune.configs import BT, KERNELS
from ...autotune.resolve import tile_config
from ..common.utils import TORCH_TO_TL, SeqMeta, get_kernel, pad_dim, seq_meta, target_for


@T.macro
def _stage_rows(x, x_s, t0, nvalid, i_h, D, BT, DP):
    """rows t0 .. t0 + BT of x `[Ttot, H, D]` (head i_h) into shared x_s `[BT, DP]`, zero past nvalid and D: a loop
    that touches no fragment, so its threads walk the rows contiguously (coalesced)."""
    for i, j in T.Parallel(BT, DP):
        x_s[i, j] = T.if_then_else(i < nvalid and j < D, x[t0 + i, i_h, T.min(j, D - 1)], 0)


@T.macro
def _row_scores(x_s, u_s, y_s, b_x, b_a, a_s, scale, BT, DP):
    """a_s[i] = scale * sum_j x_s[i, j] u_s[j] y_s[i, j] (u_s None: without u), through the fragment b_x."""
    for i, j in T.Parallel(BT, DP):
        b_x[i, j] = T.Cast("float32", x_s[i, j]) * T.Cast("float32", y_s[i, j]) * (1.0 if u_s is None else u_s[j])
    T.reduce_sum(b_x, b_a, dim=1)
    for i in T.Parallel(BT):
        a_s[i] = b_a[i] * scale


def rwkv6_fwd_bonus_kernel(K: int, V: int, dtype: str, reverse: bool, BT: int = 64, threads: int = 128):
    """o[t] = og[t - step] (0 at a sequence's first token in processing order) + a_t v[t], a_t = scale sum_k r u k;
    step = 1, or -1 for `reverse`. Tiles are staged in shared memory by coalesced loops."""
    KP, VP = pad_dim(K), pad_dim(V)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def rwkv6_fwd_bonus(
        og: T.Tensor([Ttot, H, V], dtype),
        r: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        u: T.Tensor([H, K], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        o: T.Tensor([Ttot, H, V], dtype),
        scale: T.float32,
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            bos = cu[i_n]
            eos = cu[i_n + 1]
            t0 = bos + chunk_indices[i_c, 1] * BT
            nvalid = T.min(eos - t0, BT)
            r_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            u_s = T.alloc_shared([KP], "float32")
            b_x = T.alloc_fragment([BT, KP], "float32")
            b_a = T.alloc_fragment([BT], "float32")
            a_s = T.alloc_shared([BT], "float32")

            _stage_rows(r, r_s, t0, nvalid, i_h, K, BT, KP)
            _stage_rows(k, k_s, t0, nvalid, i_h, K, BT, KP)
            for j in T.Parallel(KP):
                u_s[j] = T.if_then_else(j < K, u[i_h, T.min(j, K - 1)], 0)
            _row_scores(r_s, u_s, k_s, b_x, b_a, a_s, scale, BT, KP)
            for i, j in T.Parallel(BT, VP):
                if i < nvalid and j < V:
                    if reverse:
                        o[t0 + i, i_h, j] = T.if_then_else(
                            t0 + i < eos - 1, T.Cast("float32", og[T.min(t0 + i + 1, Ttot - 1), i_h, j]), 0
                        ) + a_s[i] * T.Cast("float32", v[t0 + i, i_h, j])
                    else:
                        o[t0 + i, i_h, j] = T.if_then_else(
                            t0 + i > bos, T.Cast("float32", og[T.max(t0 + i - 1, 0), i_h, j]), 0
                        ) + a_s[i] * T.Cast("float32", v[t0 + i, i_h, j])

    return rwkv6_fwd_bonus


def rwkv6_bwd_bonus_kernel(K: int, V: int, dtype: str, reverse: bool, BT: int = 64, threads: int = 256):
    """dr[t] = dq[t - step] (0 at a sequence's first token) + s_t u k_t, dk += s_t u r_t, dv += a_t do_t (in place),
    du_part[c] = sum over chunk c of s_t r_t k_t, with s_t = scale do_t . v_t and a_t = scale sum_k r_t u k_t.
    Tiles are staged in shared memory by coalesced loops; the fragments only hold the products to reduce."""
    KP, VP = pad_dim(K), pad_dim(V)
    Ttot, H, N, NT = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT")

    @T.prim_func
    def rwkv6_bwd_bonus(
        r: T.Tensor([Ttot, H, K], dtype),
        k: T.Tensor([Ttot, H, K], dtype),
        v: T.Tensor([Ttot, H, V], dtype),
        do: T.Tensor([Ttot, H, V], dtype),
        dq: T.Tensor([Ttot, H, K], dtype),
        u: T.Tensor([H, K], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        dr: T.Tensor([Ttot, H, K], dtype),
        dk: T.Tensor([Ttot, H, K], dtype),
        dv: T.Tensor([Ttot, H, V], dtype),
        du: T.Tensor([NT, H, K], "float32"),
        scale: T.float32,
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            bos = cu[i_n]
            eos = cu[i_n + 1]
            t0 = bos + chunk_indices[i_c, 1] * BT
            nvalid = T.min(eos - t0, BT)
            r_s = T.alloc_shared([BT, KP], dtype)
            k_s = T.alloc_shared([BT, KP], dtype)
            v_s = T.alloc_shared([BT, VP], dtype)
            do_s = T.alloc_shared([BT, VP], dtype)
            u_s = T.alloc_shared([KP], "float32")
            b_x = T.alloc_fragment([BT, KP], "float32")
            b_y = T.alloc_fragment([BT, VP], "float32")
            b_z = T.alloc_fragment([BT, KP], "float32")
            b_a = T.alloc_fragment([BT], "float32")
            b_s = T.alloc_fragment([BT], "float32")
            b_du = T.alloc_fragment([KP], "float32")
            a_s = T.alloc_shared([BT], "float32")
            s_s = T.alloc_shared([BT], "float32")

            _stage_rows(r, r_s, t0, nvalid, i_h, K, BT, KP)
            _stage_rows(k, k_s, t0, nvalid, i_h, K, BT, KP)
            _stage_rows(v, v_s, t0, nvalid, i_h, V, BT, VP)
            _stage_rows(do, do_s, t0, nvalid, i_h, V, BT, VP)
            for j in T.Parallel(KP):
                u_s[j] = T.if_then_else(j < K, u[i_h, T.min(j, K - 1)], 0)
            # one loop per reduced fragment: their layouts come from different reductions
            _row_scores(r_s, u_s, k_s, b_x, b_a, a_s, scale, BT, KP)
            _row_scores(do_s, None, v_s, b_y, b_s, s_s, scale, BT, VP)
            for i, j in T.Parallel(BT, KP):
                if i < nvalid and j < K:
                    if reverse:
                        dr[t0 + i, i_h, j] = T.if_then_else(
                            t0 + i < eos - 1, T.Cast("float32", dq[T.min(t0 + i + 1, Ttot - 1), i_h, j]), 0
                        ) + s_s[i] * u_s[j] * T.Cast("float32", k_s[i, j])
                    else:
                        dr[t0 + i, i_h, j] = T.if_then_else(
                            t0 + i > bos, T.Cast("float32", dq[T.max(t0 + i - 1, 0), i_h, j]), 0
                        ) + s_s[i] * u_s[j] * T.Cast("float32", k_s[i, j])
                    dk[t0 + i, i_h, j] = T.Cast("float32", dk[t0 + i, i_h, j]) + s_s[i] * u_s[j] * T.Cast(
                        "float32", r_s[i, j])
            for i, j in T.Parallel(BT, VP):
                if i < nvalid and j < V:
                    dv[t0 + i, i_h, j] = T.Cast("float32", dv[t0 + i, i_h, j]) + a_s[i] * T.Cast("float32", do_s[i, j])
            # rows along the threads' contiguous axis (a transposed walk of r_s / k_s hit one bank 32 times)
            for i, j in T.Parallel(BT, KP):
                b_z[i, j] = s_s[i] * T.Cast("float32", r_s[i, j]) * T.Cast("float32", k_s[i, j])
            T.reduce_sum(b_z, b_du, dim=0)
            for j in T.Parallel(KP):
                if j < K:
                    du[i_c, i_h, j] = b_du[j]

    return rwkv6_bwd_bonus


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda


def bonus_fwd(og, r, k, v, u, *, scale: float, reverse: bool, first, meta: SeqMeta, **config):
    """o `[Ttot, H, V]` in v's dtype from GLA's output on the shifted queries (the first tokens' h0 read excluded);
    `config` overrides the kernel's tile config."""
    K, V = r.shape[-1], v.shape[-1]
    if _use_kernels(r):
        o = torch.empty_like(v)
        if meta.NT > 0:
            config = tile_config("rwkv6_fwd_bonus", r, K=K, V=V, gate="none", N=meta.N, overrides=config)
            kernel = get_kernel(rwkv6_fwd_bonus_kernel, target_for(r.device), K=K, V=V, dtype=TORCH_TO_TL[r.dtype],
                                reverse=reverse, BT=BT, **config)
            kernel(og, r, k, v, u.float().contiguous(), meta.cu, meta.chunk_indices, o, scale)
        return o
    o = shift(og, 1 if reverse else -1, first).float()
    a = bonus_scores(r, k, u, scale)
    return (o + a[..., None] * v).to(v.dtype)


def bonus_bwd(r, k, v, do, dq, dk, dv, u, *, scale: float, reverse: bool, first, meta: SeqMeta, **config):
    """(dr, dk, dv) in the inputs' dtypes and du `[H, K]` fp32 from GLA's gradients of the shifted problem (dq: of
    the shifted queries; the first tokens' h0 read excluded); dk, dv are added to in place where they are already
    contiguous in the inputs' dtype. `config` overrides the kernel's tile config."""
    H, K = r.shape[1:]
    V = v.shape[-1]
    # fp32 tiles of K = V = 256 overflow a block's shared memory: those take the PyTorch form
    if _use_kernels(r) and KERNELS["rwkv6_bwd_bonus"].launches(K, V, TORCH_TO_TL[r.dtype]):
        dr = torch.empty_like(r)
        du = torch.zeros(max(meta.NT, 1), H, K, dtype=torch.float32, device=r.device)
        dk, dv = dk.to(r.dtype).contiguous(), dv.to(r.dtype).contiguous()
        if meta.NT > 0:
            config = tile_config("rwkv6_bwd_bonus", r, K=K, V=V, gate="none", N=meta.N, overrides=config)
            kernel = get_kernel(rwkv6_bwd_bonus_kernel, target_for(r.device), K=K, V=V, dtype=TORCH_TO_TL[r.dtype],
                                reverse=reverse, BT=BT, **config)
            kernel(r, k, v, do, dq.to(r.dtype).contiguous(), u.float().contiguous(), meta.cu, meta.chunk_indices,
                   dr, dk, dv, du, scale)
        return dr, dk, dv, du.sum(0)
    step = -1 if reverse else 1
    dr = shift(dq, -step, first).float()
    s = torch.einsum("thv,thv->th", do.float(), v.float())[..., None] * scale
    uf = u.float()
    dr = dr + s * uf * k.float()
    dk = dk.float() + s * uf * r.float()
    dv = dv.float() + bonus_scores(r, k, u, scale)[..., None] * do.float()
    du = torch.einsum("thk,thk->hk", s * r.float(), k.float())
    return dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), du


def sequence_marks(B: int, T: int, cu_seqlens, device):
    """(first tokens, last tokens, the sequence of each) of every non-empty sequence, as flat token indices."""
    if cu_seqlens is None:
        seq = torch.arange(B, device=device)
        return seq * T, seq * T + T - 1, seq
    from ...utils import host_bounds

    # the count of non-empty sequences from the host bounds (read back once per tensor, or fla's cu_seqlens_cpu),
    # so no nonzero() waits for the GPU: a stable sort puts the non-empty sequences first, in order
    cu_host = host_bounds(cu_seqlens)
    count = sum(b > a for a, b in zip(cu_host[:-1], cu_host[1:]))
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.argsort((cu[1:] <= cu[:-1]).to(torch.int8), stable=True)[:count]
    return cu[:-1][seq], cu[1:][seq] - 1, seq


def shift(x: torch.Tensor, step: int, zero_rows: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t + step] along dim 0 (a copy; step = +-1), with the rows `zero_rows` (where t + step leaves the
    sequence) zero. Two slice copies: torch.roll is several times slower on CUDA."""
    y = torch.empty_like(x)
    if step > 0:
        y[:-step] = x[step:]
        y[-step:] = 0
    else:
        y[-step:] = x[:step]
        y[:-step] = 0
    return y.index_fill_(0, zero_rows, 0)


def bonus_scores(r, k, u, scale):
    """a = scale * sum_k r u k, `[Ttot, H]` fp32."""
    return scale * torch.einsum("thk,thk->th", r.float() * u.float(), k.float())


def shifted_fwd(gla_fwd, extra):
    """an RWKV6 forward launcher from a GLA one: GLA on the queries shifted one token (a copy), its output read one
    token later plus the bonus (`bonus_fwd`). Returns (o `[B * T, H, V]` without the first tokens' h0 read, ht, the
    tensors its backward reuses: none). `first` / `last`: each sequence's first and last token in processing order
    (`sequence_marks`, swapped for `reverse`)."""

    def fwd(r, k, v, w, u, *, scale, initial_state, output_final_state, reverse, cu_seqlens, first, last, keep):
        B, T, H, K = r.shape
        V = v.shape[-1]
        r_ = r.view(B * T, H, K)
        rq = shift(r_, -1 if reverse else 1, last).view(B, T, H, K)
        og, ht = gla_fwd(rq, k, v, g_gamma=None, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens, g=w, **extra(reverse))
        meta = seq_meta(B, T, cu_seqlens, BT, r.device)
        o = bonus_fwd(og.view(B * T, H, V), r_, k.view(B * T, H, K), v.view(B * T, H, V), u, scale=scale,
                      reverse=reverse, first=first, meta=meta)
        return o, ht, {}

    return fwd


def _marks(r, cu_seqlens, reverse):
    B, T = r.shape[:2]
    first, last, seq = sequence_marks(B, T, cu_seqlens, r.device)
    return (last, first, seq) if reverse else (first, last, seq)


def rwkv6_fwd(launchers, r, k, v, w, u, *, scale: float, initial_state, output_final_state: bool, reverse: bool,
              cu_seqlens, keep: bool):
    """RWKV6's forward through `launchers` = (an RWKV6 forward launcher, see `shifted_fwd`; a GLA backward; its
    keywords by direction): (o `[B, T, H, V]` in v's dtype, the final state fp32 or None, `kept`: the forward's
    intermediates the backward takes as keywords when `keep`, e.g. chunk's cumulative gates and scores). Adds the
    first tokens' read of the initial state, scale r^T h0."""
    rwkv6_fwd_launch = launchers[0]
    B, T, H, K = r.shape
    V = v.shape[-1]
    first, last, seq = _marks(r, cu_seqlens, reverse)
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    h0 = initial_state.contiguous() if initial_state is not None else None
    r_ = r.view(B * T, H, K)
    o, ht, kept = rwkv6_fwd_launch(r, k, v, w, u, scale=scale, initial_state=h0,
                                   output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens,
                                   first=first, last=last, keep=keep)
    if h0 is not None:
        o[first] = (o[first].float() + scale * torch.einsum("nhk,nhkv->nhv", r_[first].float(),
                                                              h0[seq].float())).to(o.dtype)
    return o.view(B, T, H, V), ht, kept


def rwkv6_bwd(launchers, r, k, v, w, u, do, dht, *, scale: float, initial_state, reverse: bool, cu_seqlens, ht,
              kept: dict):
    """RWKV6's backward through `launchers` (see :func:`rwkv6_fwd`): (dr, dk, dv, dw, du, dh0 or None), from the
    output gradients `do` (None: zero) and `dht` (None: no final state gradient), the forward's final state `ht` and
    its `kept` intermediates."""
    _, gla_bwd, extra = launchers
    B, T, H, K = r.shape
    V = v.shape[-1]
    first, last, seq = _marks(r, cu_seqlens, reverse)
    step = -1 if reverse else 1
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    h0 = initial_state.contiguous() if initial_state is not None else None
    do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
    dht = dht.float().contiguous() if dht is not None else None
    r_, k_, v_, do_ = r.view(-1, H, K), k.view(-1, H, K), v.view(-1, H, V), do.view(-1, H, V)
    rq = shift(r_, step, last).view(B, T, H, K)
    dog = shift(do_, step, last).view(B, T, H, V)
    dq, dk, dv, dh0, dw = gla_bwd(rq, k, v, dog, dht, g_gamma=None, scale=scale, initial_state=h0,
                                  cu_seqlens=cu_seqlens, g=w, ht=ht, **extra(reverse), **kept)
    meta = seq_meta(B, T, cu_seqlens, BT, r.device)
    dr, dk, dv, du = bonus_bwd(r_, k_, v_, do_, dq.view(-1, H, K), dk.view(-1, H, K), dv.view(-1, H, V), u,
                               scale=scale, reverse=reverse, first=first, meta=meta)
    if h0 is not None:
        do32 = do_[first].float()
        dr[first] = (dr[first].float() + scale * torch.einsum("nhkv,nhv->nhk", h0[seq].float(), do32)).to(dr.dtype)
        dh0 = dh0.float().index_add(0, seq, scale * torch.einsum("nhk,nhv->nhkv", r_[first].float(), do32))
    return (dr.to(r.dtype).view_as(r), dk.to(k.dtype).view_as(k), dv.to(v.dtype).view_as(v), dw.to(w.dtype),
            du.to(u.dtype), dh0.to(h0.dtype) if h0 is not None else None)
