"""chunk_gsa: gated slot attention as two GLA passes over M slots on chunk_gla's TileLang stages, a softmax between.

With `g` `[B, T, H, M]` the slot log gates and G their chunk-local cumulative log2 sums (`gc`, shared by both passes):
- slots to values (pass 2) is GLA itself, per-key gate on the M slots: o = GLA(q=p, k=s, v=v, g), scale 1.
- keys to slots (pass 1) gates the *value* side of its state hk `[K, M]`: ok_t = scale hk_t^T q_t. Transposed,
  hk^T `[M, K]` is the state of GLA'(k=s, v=k, g), and ok_t = scale hk^T_t q_t is what GLA's backward writes as dq
  when q is the output gradient: ok = dq of GLA'(k=s, v=k, do=q) -- the dq/dk kernel of chunk_gla on the states
  of `common.chunk_h` (its dk side sees a zero state gradient and is discarded).
- its backward: L = sum_t dok_t . ok_t = sum_t q_t . O''_t with O'' = GLA''(q=dok, k=s, v=k, g) (scale, initial
  state hk0^T), the same bilinear form. So dq = O'' and (ds, dk, dg, dhk0^T) are GLA'''s backward with do = q:
  one forward-and-backward of chunk_gla's stages, its output kept.
The softmax and its backward (dok = p (dp - <p, dp>)) are PyTorch glue in fp32; p enters pass 2 in the input dtype,
as in fla. `gsa_fwd` / `gsa_bwd` compose a whole op around the two passes: ABC's slot gates (`normaliser.py`),
grouped query heads by repeating the key heads' tensors, and `reverse` (fused_recurrent_gsa) by flipping the time axis
(and the sequence order of a varlen batch).
"""

import torch

from ...autotune.configs import BT
from ...autotune.resolve import tile_config
from ..common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from ..common.cumsum import per_key_gate_grad_chunk
from ..common.gates import head_decay
from ..common.utils import SeqMeta, seq_meta
from ..gla.chunk import (
    _kernel,
    chunk_gla_bwd_dqk_kernel,
    chunk_gla_bwd_dqkv,
    chunk_gla_fwd_o,
    key_gate_cumsum,
)


def _t(x):
    """a state `[N, H, A, B]` as `[N, H, B, A]` (contiguous), None stays None."""
    return x.transpose(-1, -2).contiguous() if x is not None else None


def _pass_kw(meta: SeqMeta, gc, v, H):
    return dict(gate="gk", g_gamma=head_decay(None, H, v.device), gc=gc, meta=meta, BT=BT)


def gsa_fwd_slots(q, k, s, gc, *, scale: float, meta: SeqMeta, initial_state, output_final_state: bool):
    """pass 1: ok `[Ttot, H, M]` in q's dtype and the final state hk `[N, H, K, M]` fp32 (or None), from q, k
    `[Ttot, H, K]`, s `[Ttot, H, M]`."""
    Ttot, H, K = q.shape
    M = s.shape[-1]
    kw = _pass_kw(meta, gc, k, H)
    h, ht = chunk_fwd_h(s, k, initial_state=_t(initial_state), output_final_state=output_final_state, **kw)
    ok = torch.empty_like(s)
    if meta.NT > 0:
        zeros = torch.zeros_like(s)
        dk_ = torch.empty_like(s)
        r = torch.empty(Ttot, H, M, dtype=torch.float32, device=q.device)
        config = tile_config("chunk_gla_bwd_dqk", s, K=M, V=K, gate="gk", N=meta.N)
        _kernel(chunk_gla_bwd_dqk_kernel, s, K=M, V=K, BT=BT, **config)(
            zeros, s, k, q, h, torch.zeros_like(h), gc, meta.cu, meta.chunk_indices, ok, dk_, r, scale)
    return ok, _t(ht)


def gsa_bwd_slots(q, k, s, dok, dht, gc, *, scale: float, meta: SeqMeta, initial_state):
    """pass 1 backward: dq, dk (input dtype), ds, dg (fp32), dhk0 (fp32 or None)."""
    H = q.shape[1]
    kw = _pass_kw(meta, gc, k, H)
    h0 = _t(initial_state)
    h, h_last = chunk_fwd_h(s, k, initial_state=h0, output_final_state=True, **kw)
    dq, A = chunk_gla_fwd_o(dok, s, k, h, gc, scale=scale, meta=meta, store_A=True)
    dh, dh0 = chunk_bwd_dh(dok, q, _t(dht), scale=scale, need_dh0=initial_state is not None, **kw)
    _, ds, dk, r = chunk_gla_bwd_dqkv(dok, s, k, q, h, dh, gc, A, scale=scale, meta=meta)
    dg = per_key_gate_grad_chunk(r, h, dh, h_last, meta=meta, dg_dtype=torch.float32)
    return dq, dk, ds, dg, _t(dh0)


def gsa_fwd_values(p, s, v, gc, *, meta: SeqMeta, initial_state, output_final_state: bool):
    """pass 2 (GLA, scale 1): o `[Ttot, H, V]` and the final state hv `[N, H, M, V]` fp32 (or None)."""
    kw = _pass_kw(meta, gc, v, p.shape[1])
    h, ht = chunk_fwd_h(s, v, initial_state=initial_state, output_final_state=output_final_state, **kw)
    o, _ = chunk_gla_fwd_o(p, s, v, h, gc, scale=1.0, meta=meta, store_A=False)
    return o, ht


def gsa_bwd_values(p, s, v, do, dht, gc, *, meta: SeqMeta, initial_state):
    """pass 2 backward: dp, ds, dv (input dtype), dg (fp32), dhv0 (fp32 or None)."""
    kw = _pass_kw(meta, gc, v, p.shape[1])
    h, h_last = chunk_fwd_h(s, v, initial_state=initial_state, output_final_state=True, **kw)
    _, A = chunk_gla_fwd_o(p, s, v, h, gc, scale=1.0, meta=meta, store_A=True)
    dh, dh0 = chunk_bwd_dh(p, do, dht, scale=1.0, need_dh0=initial_state is not None, **kw)
    dp, ds, dv, r = chunk_gla_bwd_dqkv(p, s, v, do, h, dh, gc, A, scale=1.0, meta=meta)
    dg = per_key_gate_grad_chunk(r, h, dh, h_last, meta=meta, dg_dtype=torch.float32)
    return dp, ds, dv, dg, dh0


def _prepare(q, g, cu_seqlens):
    B, T = q.shape[:2]
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    gc = key_gate_cumsum(g.float().contiguous(), None, meta)
    return meta, gc


def _flat(*xs):
    return tuple(x.flatten(0, 1) for x in xs)


def _softmax(ok):
    return ok.float().softmax(-1)


def chunk_gsa_fwd(q, k, v, s, g, *, scale, initial_state, output_final_state, cu_seqlens):
    """(o `[B, T, H, V]`, ok `[B, T, H, M]` for the backward, hk, hv); q, k, v, s in one dtype, g any float dtype,
    one query head per key head (the caller repeats grouped heads)."""
    B, T, H, _ = q.shape
    meta, gc = _prepare(q, g, cu_seqlens)
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    q_, k_, v_, s_ = _flat(q, k, v, s)
    ok, hkt = gsa_fwd_slots(q_, k_, s_, gc, scale=scale, meta=meta, initial_state=hk0,
                            output_final_state=output_final_state)
    p = _softmax(ok).to(q.dtype)
    o, hvt = gsa_fwd_values(p, s_, v_, gc, meta=meta, initial_state=hv0, output_final_state=output_final_state)
    return o.view(B, T, H, -1), ok.view(B, T, H, -1), hkt, hvt


def chunk_gsa_bwd(q, k, v, s, g, ok, do, dhkt, dhvt, *, scale, initial_state, cu_seqlens):
    """(dq, dk, dv, ds, dg, dhk0, dhv0); the states and the intra-chunk scores are recomputed."""
    B, T, H, _ = q.shape
    meta, gc = _prepare(q, g, cu_seqlens)
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    q_, k_, v_, s_, ok_, do_ = _flat(q, k, v, s, ok, do)
    p = _softmax(ok_)
    dp, ds_v, dv, dg_v, dhv0 = gsa_bwd_values(p.to(q.dtype), s_, v_, do_, dhvt, gc, meta=meta, initial_state=hv0)
    dp = dp.float()
    dok = (p * (dp - (p * dp).sum(-1, keepdim=True))).to(q.dtype)
    dq, dk, ds_k, dg_k, dhk0 = gsa_bwd_slots(q_, k_, s_, dok, dhkt, gc, scale=scale, meta=meta, initial_state=hk0)
    ds = ds_k.float() + ds_v.float()
    dg = dg_k + dg_v
    shape = (B, T, H, -1)
    return (dq.view(shape), dk.view(shape), dv.view(shape), ds.view(shape), dg.view(shape), dhk0, dhv0)


def _grouped(NG: int, *xs, dim: int):
    """grouped query heads: each key head's tensors repeated for its NG query heads (None stays None)."""
    return tuple(x.repeat_interleave(NG, dim=dim) if x is not None and NG > 1 else x for x in xs)


def _ungrouped(NG: int, *xs, dim: int):
    """the gradients of `_grouped`: the sum over each group of NG heads."""
    return tuple(x.unflatten(dim, (-1, NG)).sum(dim + 1) if x is not None and NG > 1 else x for x in xs)


def _first_of_groups(NG: int, x):
    """the gradient of a final state's `[:, ::NG]` (each group's first head): zero for the other heads."""
    if x is None or NG == 1:
        return x
    y = x.new_zeros(x.shape[0], x.shape[1] * NG, *x.shape[2:])
    y[:, ::NG] = x
    return y


def _flip(dim: int, *xs):
    return tuple(x.flip(dim) if x is not None else None for x in xs)


def _reversed_cu(cu, T: int):
    """the offsets of the time-flipped batch: the sequences in reverse order."""
    return (T - cu).flip(0)


def _cu_int64(cu):
    return cu.to(torch.int64).contiguous() if cu is not None else None


def gsa_fwd(q, k, v, s, g, hk0, hv0, *, scale: float, output_final_state: bool, reverse: bool = False,
            cu_seqlens=None, keep: bool = False):
    """GSA on the TileLang stages: (o `[B, T, HQ, V]` in q's dtype, hk `[N, H, K, M]`, hv `[N, H, M, V]` fp32 or
    None, None, the residuals of :func:`gsa_bwd`: with `keep`, ok `[B, T, HQ, M]` (the slot scores, in processing
    order) and, for ABC (`g` None), the normaliser's sn `[B, T, H, M]` (k's dtype), its gates and z (fp32)).

    `g` None: ABC's gates from the running normaliser of `s` (`normaliser.py`); grouped query heads (HQ a multiple of
    H) by repeating k, v, s, g and the initial states per group; `reverse` flips time (and the sequence order of a
    varlen batch) around the two passes."""
    abc = []
    if g is None:
        from .normaliser import slot_normaliser_fwd

        s, g, z = slot_normaliser_fwd(s, cu_seqlens, k.dtype)
        abc = [s, g, z]
    NG = q.shape[2] // k.shape[2]
    k, v, s, g = _grouped(NG, k, v, s, g, dim=2)
    hk0, hv0 = _grouped(NG, hk0, hv0, dim=1)
    cu = _cu_int64(cu_seqlens)
    if reverse:
        q, k, v, s, g = _flip(1, q, k, v, s, g)
        if cu is not None:
            cu = _reversed_cu(cu, q.shape[1])
            hk0, hv0 = _flip(0, hk0, hv0)
    q, k, v, s, g = (x.contiguous() for x in (q, k, v, s, g))
    initial_state = None if hk0 is None else (hk0.contiguous(), hv0.contiguous())
    o, ok, hkt, hvt = chunk_gsa_fwd(q, k, v, s, g, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu)
    if reverse:
        o = o.flip(1)
        if cu is not None and output_final_state:
            hkt, hvt = hkt.flip(0), hvt.flip(0)
    if not output_final_state:
        hkt = hvt = None
    elif NG > 1:
        hkt, hvt = hkt[:, ::NG].contiguous(), hvt[:, ::NG].contiguous()
    return o, hkt, hvt, ([ok, *abc] if keep else [])


def gsa_bwd(q, k, v, s, g, hk0, hv0, do, dhkt, dhvt, *, scale: float, reverse: bool = False, cu_seqlens=None,
            residuals=()):
    """(dq, dk, dv, ds, dg (None for ABC), dhk0, dhv0 (None without initial states)) from the output gradients
    (`do` None: zero; `dhkt`, `dhvt` None: none) and :func:`gsa_fwd`'s residuals, in the inputs' dtypes (dg in g's);
    the same transforms as the forward, undone in reverse order."""
    ok, *abc = residuals
    s_in = s
    if g is None:
        s, g, z = abc
    NG = q.shape[2] // k.shape[2]
    k, v, s, g = _grouped(NG, k, v, s, g, dim=2)
    hk0, hv0 = _grouped(NG, hk0, hv0, dim=1)
    cu = _cu_int64(cu_seqlens)
    if do is None:
        do = q.new_zeros(*q.shape[:3], v.shape[-1])
    dhkt, dhvt = _first_of_groups(NG, dhkt), _first_of_groups(NG, dhvt)
    if reverse:
        q, k, v, s, g, do = _flip(1, q, k, v, s, g, do)
        if cu is not None:
            cu = _reversed_cu(cu, q.shape[1])
            hk0, hv0, dhkt, dhvt = _flip(0, hk0, hv0, dhkt, dhvt)
    q, k, v, s, g = (x.contiguous() for x in (q, k, v, s, g))
    initial_state = None if hk0 is None else (hk0.contiguous(), hv0.contiguous())
    dhkt = dhkt.contiguous() if dhkt is not None else None
    dhvt = dhvt.contiguous() if dhvt is not None else None
    dq, dk, dv, ds, dg, dhk0, dhv0 = chunk_gsa_bwd(q, k, v, s, g, ok, do.contiguous(), dhkt, dhvt, scale=scale,
                                                   initial_state=initial_state, cu_seqlens=cu)
    dq, dk, dv, ds, dg = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds.to(s.dtype), dg.to(g.dtype)
    if hk0 is not None:
        dhk0, dhv0 = dhk0.to(hk0.dtype), dhv0.to(hv0.dtype)
    if reverse:
        dq, dk, dv, ds, dg = _flip(1, dq, dk, dv, ds, dg)
        if cu is not None:
            dhk0, dhv0 = _flip(0, dhk0, dhv0)
    dk, dv, ds, dg = _ungrouped(NG, dk, dv, ds, dg, dim=2)
    dhk0, dhv0 = _ungrouped(NG, dhk0, dhv0, dim=1)
    if abc:
        from .normaliser import slot_normaliser_bwd

        ds, dg = slot_normaliser_bwd(s_in, z, ds, dg, cu_seqlens), None
    return dq, dk, dv, ds, dg, dhk0, dhv0

