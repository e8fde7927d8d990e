"""fused_recurrent_simple_gla with a per-head constant decay: token-by-token kernels for inference and low memory."""

from ..common.fused_recurrent import fused_recurrent_bwd, fused_recurrent_fwd
from ..common.gates import head_decay
from ..common.utils import seq_meta


def fused_recurrent_simple_gla_fwd(
    q, k, v, *, g_gamma, scale, initial_state, output_final_state, reverse, state_v_first, cu_seqlens
):
    B, T, H, K = q.shape
    o, ht = fused_recurrent_fwd(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        gate="gamma",
        g_gamma=head_decay(g_gamma, H, q.device),
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        meta=seq_meta(B, T, cu_seqlens, 64, q.device),
    )
    return o.view(B, T, H, -1), ht


def fused_recurrent_simple_gla_bwd(q, k, v, do, dht, *, g_gamma, scale, initial_state, reverse, state_v_first, cu_seqlens):
    B, T, H, K = q.shape
    dq, dk, dv, dh0 = fused_recurrent_bwd(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        do.flatten(0, 1),
        dht,
        gate="gamma",
        g_gamma=head_decay(g_gamma, H, q.device),
        scale=scale,
        initial_state=initial_state,
        reverse=reverse,
        state_v_first=state_v_first,
        meta=seq_meta(B, T, cu_seqlens, 64, q.device),
    )
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dh0
