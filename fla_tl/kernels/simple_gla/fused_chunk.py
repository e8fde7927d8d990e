"""fused_chunk_simple_gla with a per-head constant decay: one kernel per direction carrying the state across chunks in
registers."""

from ..common.fused_chunk import fused_chunk_bwd, fused_chunk_fwd
from ..common.gates import head_decay
from ..common.utils import seq_meta

BT = 64


def fused_chunk_simple_gla_fwd(q, k, v, *, g_gamma, scale, initial_state, output_final_state, cu_seqlens, **config):
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    o, ht = fused_chunk_fwd(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        gate="gamma",
        g_gamma=head_decay(g_gamma, H, q.device),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        meta=meta,
        **config,
    )
    return o.view(B, T, H, -1), ht


def fused_chunk_simple_gla_bwd(q, k, v, do, dht, *, g_gamma, scale, initial_state, cu_seqlens, **config):
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    dq, dk, dv, dh0 = fused_chunk_bwd(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        do.flatten(0, 1),
        dht,
        gate="gamma",
        g_gamma=head_decay(g_gamma, H, q.device),
        scale=scale,
        initial_state=initial_state,
        meta=meta,
        **config,
    )
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dh0
