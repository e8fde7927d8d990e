"""fused_recurrent_gla: the token-by-token kernels with GLA's per-key log gate (gate "gk" of
`common.fused_recurrent`); the gate's gradient per key by `common.cumsum.per_key_gate_grad`."""

import torch

from ..common.cumsum import per_key_gate_grad
from ..common.fused_recurrent import fused_recurrent_bwd, fused_recurrent_fwd
from ..common.gates import head_decay, state_term
from ..common.utils import seq_meta


def _gate(g, H, K):
    return ("gamma", None) if g is None else ("gk", g.reshape(-1, H, K).to(torch.float32).contiguous())


def fused_recurrent_gla_fwd(
    q, k, v, *, g_gamma, scale, initial_state, output_final_state, reverse, state_v_first, cu_seqlens, g=None
):
    B, T, H, K = q.shape
    gate, g_ = _gate(g, H, K)
    o, ht = fused_recurrent_fwd(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), gate=gate, g_gamma=head_decay(g_gamma, H, q.device), g=g_,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, reverse=reverse,
        state_v_first=state_v_first, meta=seq_meta(B, T, cu_seqlens, 64, q.device),
    )
    return o.view(B, T, H, -1), ht


def fused_recurrent_gla_bwd(
    q, k, v, do, dht, *, g_gamma, scale, initial_state, reverse, state_v_first, cu_seqlens, g=None, ht=None
):
    """(dq, dk, dv, dh0 or None, dg or None); `ht` is the forward's final state, needed for dg when `dht` is given."""
    B, T, H, K = q.shape
    gate, g_ = _gate(g, H, K)
    meta = seq_meta(B, T, cu_seqlens, 64, q.device)
    q_, k_ = q.flatten(0, 1), k.flatten(0, 1)
    dq, dk, dv, dh0 = fused_recurrent_bwd(
        q_, k_, v.flatten(0, 1), do.flatten(0, 1), dht, gate=gate, g_gamma=head_decay(g_gamma, H, q.device), g=g_,
        scale=scale, initial_state=initial_state, reverse=reverse, state_v_first=state_v_first, meta=meta,
    )
    dg = None
    if g is not None:
        # sum over V of ht * dht, per key: the states are [N, H, K, V], or [N, H, V, K] with state_v_first
        term = state_term(ht, dht, dims=-2 if state_v_first else -1)
        dg = per_key_gate_grad(q_, k_, dq, dk, meta=meta, reverse=reverse, dg_dtype=g.dtype, state_term=term)
        dg = dg.view_as(g)
        dq, dk = dq.to(q.dtype), dk.to(k.dtype)
    return dq.view_as(q), dk.view_as(k), dv.view_as(v), dh0, dg
