"""chunk_retention: the chunk-parallel state pass and output pass of simple GLA with a per-head constant decay."""

from ..common.chunk_h import chunk_bwd_dh, chunk_fwd_h
from ..common.chunk_o import chunk_bwd_dqkv, chunk_fwd_o
from ..common.gates import retention_g_gamma
from ..common.utils import seq_meta

BT = 64


def chunk_retention_fwd(q, k, v, *, scale, initial_state, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    g_gamma = retention_g_gamma(H, q.device)
    q_, k_, v_ = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    h, ht = chunk_fwd_h(
        k_,
        v_,
        gate="gamma",
        g_gamma=g_gamma,
        initial_state=initial_state,
        output_final_state=output_final_state,
        meta=meta,
        BT=BT,
    )
    o = chunk_fwd_o(q_, k_, v_, h, gate="gamma", g_gamma=g_gamma, scale=scale, meta=meta, BT=BT)
    return o.view(B, T, H, -1), ht


def chunk_retention_bwd(q, k, v, do, dht, *, scale, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    g_gamma = retention_g_gamma(H, q.device)
    q_, k_, v_, do_ = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), do.flatten(0, 1)
    # recompute the chunk states instead of keeping them from the forward
    h, _ = chunk_fwd_h(
        k_,
        v_,
        gate="gamma",
        g_gamma=g_gamma,
        initial_state=initial_state,
        output_final_state=False,
        meta=meta,
        BT=BT,
    )
    dh, dh0 = chunk_bwd_dh(
        q_,
        do_,
        dht,
        gate="gamma",
        g_gamma=g_gamma,
        scale=scale,
        need_dh0=initial_state is not None,
        meta=meta,
        BT=BT,
    )
    dq, dk, dv = chunk_bwd_dqkv(q_, k_, v_, do_, h, dh, gate="gamma", g_gamma=g_gamma, scale=scale, meta=meta, BT=BT)
    if dh0 is not None:
        dh0 = dh0.to(initial_state.dtype)
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dh0
