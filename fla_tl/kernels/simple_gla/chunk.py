"""chunk_simple_gla with a per-head constant decay `g_gamma` (retention, lightning attention, linear attention with
no decay) and/or a per-token log gate `g`, in chunks of 64 tokens.

Two schedules share the chunk algebra. The fused kernels carry the state between chunks in registers and never write
it to memory; their grid is (sequences x heads x V tiles), each block walking its sequence. The chunk-parallel passes
split the state into [64, 64] blocks for the sequential state pass (more blocks), write the state entering every
chunk, then run the output / gradient passes one block per chunk. The fused schedule runs when its grid gives at
least a quarter block per multiprocessor and K >= 128; the chunk-parallel one for few long sequences (a small fused
grid leaves multiprocessors idle) and for small key dims (little sequential work per chunk). The measurements behind
the rule are in benchmarks/README.md.
"""


import torch

from ..common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from ..common.chunk_o import chunk_bwd_dqkv, chunk_fwd_o
from ...autotune.resolve import tile_config
from ..common.fused_chunk import fused_chunk_bwd, fused_chunk_fwd
from ..common.cumsum import gate_grad_chunk
from ..common.gates import chunk_gate
from ..common.ranges import chunk_dh_range_ends, chunk_h_range_starts, state_pass_ranges
from ..common.utils import cdiv, pad_dim, seq_meta, sm_count
from ...autotune.configs import BT

# the fused kernels run once their grid gives at least this many blocks per multiprocessor
FUSED_MIN_BLOCKS_PER_SM = 0.25


def _schedule(q, v, N: int, kind: str, impl: str) -> str:
    """'fused' when the fused kernel's grid (sequences x heads x V tiles) fills the GPU enough, else 'parallel'."""
    if impl != "auto":
        return impl
    K, V, H = q.shape[-1], v.shape[-1], q.shape[-2]
    # small key dims give the chunk-parallel passes little sequential work per chunk: they win there
    if pad_dim(K) < 128:
        return "parallel"
    ref = q.flatten(0, 1)
    BV = tile_config(f"fused_chunk_{kind}", ref, K=K, V=V, gate="gamma", N=N)["BV"]
    blocks = N * H * cdiv(V, BV)
    return "fused" if blocks >= FUSED_MIN_BLOCKS_PER_SM * sm_count(q.device) else "parallel"


def chunk_simple_gla_fwd(
    q, k, v, *, g_gamma, scale, initial_state, output_final_state, cu_seqlens, g=None, impl="auto"
):
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    gate, g_gamma, gc = chunk_gate(g, g_gamma, H, meta, BT)
    q_, k_, v_ = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    kw = dict(gate=gate, g_gamma=g_gamma, gc=gc, meta=meta)
    ranges = state_pass_ranges(q, v, meta, cu_seqlens, BT)
    # few long sequences: the state passes run over chunk ranges from the combined range starts
    skw, h0 = kw, initial_state
    if ranges is not None:
        h0, _ = chunk_h_range_starts(k_, v_, initial_state, ranges, BT=BT, **kw)
        skw = {**kw, "meta": ranges.meta}
    N = skw["meta"].N
    if _schedule(q, v, N, "fwd", impl) == "fused":
        o, ht = fused_chunk_fwd(q_, k_, v_, scale=scale, initial_state=h0, output_final_state=output_final_state,
                                **skw)
    else:
        h, ht = chunk_fwd_h(k_, v_, initial_state=h0, output_final_state=output_final_state, BT=BT, **skw)
        o = chunk_fwd_o(q_, k_, v_, h, scale=scale, BT=BT, **kw)
    if ht is not None and ranges is not None:
        ht = ht[ranges.last]
    return o.view(B, T, H, -1), ht


def chunk_simple_gla_bwd(
    q, k, v, do, dht, *, g_gamma, scale, initial_state, cu_seqlens, g=None, ht=None, impl="auto"
):
    """(dq, dk, dv, dh0 or None, dg or None); `ht` is accepted for a uniform launcher contract (the chunk form
    recomputes the states it needs for dg)."""
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    gate, g_gamma, gc = chunk_gate(g, g_gamma, H, meta, BT)
    q_, k_, v_, do_ = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), do.flatten(0, 1)
    kw = dict(gate=gate, g_gamma=g_gamma, gc=gc, meta=meta)
    ranges = state_pass_ranges(q, v, meta, cu_seqlens, BT)
    # over chunk ranges: the forward's range starts again, each range's state gradient from a zero terminal gradient,
    # the reverse combine, then the passes over the ranges from their starts and terminal gradients
    skw, h0, dhe = kw, initial_state, dht
    if ranges is not None:
        h0, decays = chunk_h_range_starts(k_, v_, initial_state, ranges, BT=BT, **kw)
        dhe = chunk_dh_range_ends(q_, do_, dht, decays, ranges, scale=scale, BT=BT, **kw)
        skw = {**kw, "meta": ranges.meta}
    N = skw["meta"].N

    def first_ranges(dh0):
        return dh0[ranges.first[:-1].long()] if dh0 is not None and ranges is not None else dh0

    # a per-token gate's gradient needs the chunk states and their gradients: the chunk-parallel schedule has them
    if g is None and _schedule(q, v, N, "bwd_dkv", impl) == "fused":
        dq, dk, dv, dh0 = fused_chunk_bwd(q_, k_, v_, do_, dhe, scale=scale, initial_state=h0, **skw)
        dh0 = first_ranges(dh0) if initial_state is not None else None
        return dq.view_as(q), dk.view_as(k), dv.view_as(v), _like(dh0, initial_state), None
    # recompute the chunk states instead of keeping them from the forward
    h, h_last = chunk_fwd_h(k_, v_, initial_state=h0, output_final_state=g is not None, BT=BT, **skw)
    dh, dh0 = chunk_bwd_dh(q_, do_, dhe, scale=scale, need_dh0=initial_state is not None, BT=BT, **skw)
    dq, dk, dv = chunk_bwd_dqkv(q_, k_, v_, do_, h, dh, scale=scale, BT=BT, **kw)
    dh0 = _like(first_ranges(dh0), initial_state)
    dg = None
    if g is not None:
        if ranges is not None:
            h_last = h_last[ranges.last]
        # dq, dk come in fp32 here: r = q . dq - k . dk is formed before they are rounded
        dg = gate_grad_chunk(q_, k_, dq, dk, h, dh, h_last, meta=meta, dg_dtype=g.dtype, BT=BT).view_as(g)
        dq, dk = dq.to(q.dtype), dk.to(k.dtype)
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dh0, dg


def _like(dh0, initial_state):
    """the initial state's gradient in its dtype (None without one)."""
    return dh0.to(initial_state.dtype) if dh0 is not None and initial_state is not None else None
