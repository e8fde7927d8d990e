"""fused_chunk_simple_gla: one kernel per direction carrying the state across chunks in registers; a per-head
constant decay and/or a per-token log gate. With a per-token gate the backward runs the chunk-parallel passes instead
(dg's chunk-local form needs the chunk states and their gradients, which the fused kernels never write)."""

from ..common.fused_chunk import fused_chunk_bwd, fused_chunk_fwd
from ..common.gates import chunk_gate
from ...autotune.configs import BT
from ..common.utils import seq_meta


def fused_chunk_simple_gla_fwd(
    q, k, v, *, g_gamma, scale, initial_state, output_final_state, cu_seqlens, g=None, **config
):
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    gate, g_gamma, gc = chunk_gate(g, g_gamma, H, meta, BT)
    o, ht = fused_chunk_fwd(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        gate=gate,
        g_gamma=g_gamma,
        gc=gc,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        meta=meta,
        **config,
    )
    return o.view(B, T, H, -1), ht


def fused_chunk_simple_gla_bwd(
    q, k, v, do, dht, *, g_gamma, scale, initial_state, cu_seqlens, g=None, ht=None, **config
):
    """(dq, dk, dv, dh0 or None, dg or None); `ht` is accepted for a uniform launcher contract."""
    if g is not None:
        from .chunk import chunk_simple_gla_bwd

        return chunk_simple_gla_bwd(q, k, v, do, dht, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                    cu_seqlens=cu_seqlens, g=g, impl="parallel")
    B, T, H, K = q.shape
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    gate, g_gamma, gc = chunk_gate(None, g_gamma, H, meta, BT)
    dq, dk, dv, dh0 = fused_chunk_bwd(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        do.flatten(0, 1),
        dht,
        gate=gate,
        g_gamma=g_gamma,
        gc=gc,
        scale=scale,
        initial_state=initial_state,
        meta=meta,
        **config,
    )
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dh0, None
