"""Gated DeltaNet and DeltaNet token by token: the tilelang backend's forward and backward on the ops' `[B, T, ...]`
tensors, around the shared kernels of `common.fused_recurrent_delta` (the L2 norm of q and k, their grouping over
value heads, the state layouts); the forward keeps w for the backward when gradients are needed."""

import torch

from ..common.cumsum import _sequence_scan
from ..common.fused_recurrent_delta import (
    GateActivation,
    fused_recurrent_delta_rule_bwd,
    fused_recurrent_delta_rule_fwd,
    group_sum,
    packed,
    qk_grads,
)
from ..common.gates import state_term


def fused_recurrent_gated_delta_rule_fwd(
    q, k, v, beta, g, *, scale: float, initial_state, output_final_state: bool, state_v_first: bool, cu_seqlens,
    use_qk_l2norm_in_kernel: bool, requires_grad: bool, act: GateActivation | None = None,
):
    """the forward on `[B, T, H, K]` q, k, `[B, T, HV, V]` v, `[B, T, HV]` beta and g (None: no gate; `[B, T, HV, K]`
    a per-key gate, the raw gate input with `act`): (o `[B, T, HV, V]` in q's dtype, final state fp32 `[N, HV, K, V]`
    (`[N, HV, V, K]` with `state_v_first`) or None, and with `requires_grad` the backward's residual w
    `[B * T, HV, V]` fp32, else None)."""
    B, T = q.shape[:2]
    HV, V = v.shape[2:]
    meta, q_, k_, v_, beta_, g_ = packed(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel)
    h0 = initial_state.contiguous() if initial_state is not None else None
    o, ht, w = fused_recurrent_delta_rule_fwd(
        q_, k_, v_, beta_, g_, scale=scale, initial_state=h0, output_final_state=output_final_state,
        state_v_first=state_v_first, meta=meta, store_w=requires_grad, act=act,
    )
    return o.view(B, T, HV, V), ht, w


def activation_grads(g, dg, act: GateActivation):
    """(dg of the raw gate input, dA_log `[HV]` or None, ddt_bias `[HV * K]` or None) from dg of the activated
    per-key log gate (`common.fused_recurrent_delta.log_gate`), all fp32: with x = g + dt_bias, a = exp(A_log),
      softplus: d/dx = -a sigmoid(x),                  d/dA_log = -a softplus(x),
      sigmoid:  d/dx = lower_bound a s (1 - s),        d/dA_log = lower_bound a x s (1 - s),   s = sigmoid(a x)."""
    HV, K = g.shape[-2:]
    x = g.float() + (act.dt_bias.float().view(HV, K) if act.dt_bias is not None else 0.0)
    a = act.A_log.float().exp()[:, None] if act.A_log is not None else torch.ones(HV, 1, device=g.device)
    if act.kind == "softplus":
        dx = -a * torch.sigmoid(x)
        da = -a * torch.nn.functional.softplus(x)
    else:
        s = torch.sigmoid(a * x)
        dx = act.lower_bound * a * s * (1 - s)
        da = dx * x
    dgx = dg * dx
    sums = tuple(range(dg.dim() - 2))
    dA_log = (dg * da).sum(sums).sum(-1) if act.A_log is not None else None
    ddt_bias = dgx.sum(sums).reshape(act.dt_bias.shape) if act.dt_bias is not None else None
    return dgx, dA_log, ddt_bias


def fused_recurrent_gated_delta_rule_bwd(
    q, k, v, beta, g, w, ht, do, dht, *, scale: float, initial_state, state_v_first: bool, cu_seqlens,
    use_qk_l2norm_in_kernel: bool, act: GateActivation | None = None,
):
    """(dq, dk `[B, T, H, K]` in q's dtype, dv `[B, T, HV, V]`, dbeta `[B, T, HV]` fp32, dg fp32 in g's shape (per
    token `[B, T, HV]` or per key `[B, T, HV, K]`) or None, dh0 fp32 or None) from the forward's inputs, its residual
    w and final state ht (needed for dg when dht is given; None without a final state), and the output gradients do,
    dht (None: zero)."""
    B, T, H, _ = q.shape
    HV = v.shape[2]
    meta, q_, k_, v_, beta_, g_ = packed(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel)
    h0 = initial_state.contiguous() if initial_state is not None else None
    do = torch.zeros_like(v_) if do is None else do.reshape(v_.shape).to(v_.dtype).contiguous()
    dht = dht.float().contiguous() if dht is not None else None
    dq, dk, du, dh0, dkg = fused_recurrent_delta_rule_bwd(
        q_, k_, beta_, g_, w, do, dht, scale=scale, initial_state=h0, state_v_first=state_v_first, meta=meta, act=act,
    )
    dv = du * beta_[..., None]
    dbeta = (du * w).sum(-1)
    dg = None
    if g_ is not None and q_.shape[0] == 0:
        dg = torch.zeros_like(g_)
    elif g_ is not None and g_.dim() == 3:
        # per key: dg_t = sum_{s >= t} (q_s * dq_s - k_s * (dk^write_s - dk^read_s)) + sum_v dht * ht, per sequence
        # and value head (`common.fused_recurrent_delta`)
        G, K = HV // H, q_.shape[-1]
        r = dq.view(-1, H, G, K) * q_.float()[:, :, None] - dkg.view(-1, H, G, K) * k_.float()[:, :, None]
        dg = _sequence_scan(r.view(-1, HV * K), meta=meta, reverse=False, out_dtype=torch.float32,
                            offset=state_term(ht, dht, dims=(-2,) if state_v_first else (-1,)))
    elif g_ is not None:
        # dg_t = sum_{s >= t} (q_s . dq_s - v_s . dv_s) + <dht, ht>, per sequence and value head
        G = HV // H
        r = (dq.view(-1, H, G, q_.shape[-1]) * q_.float()[:, :, None]).sum(-1).view(-1, HV)
        r = r - (v_.float() * dv).sum(-1)
        dg = _sequence_scan(r.contiguous(), meta=meta, reverse=False, out_dtype=torch.float32,
                            offset=state_term(ht, dht))
    dq, dk = qk_grads(q, k, group_sum(dq, H).view(B, T, H, -1), group_sum(dk, H).view(B, T, H, -1),
                      use_qk_l2norm_in_kernel)
    dg = dg.view(g.shape) if dg is not None else None
    if act is not None:
        # through the gate activation to the raw input, A_log and dt_bias
        dg, dA_log, ddt_bias = activation_grads(g, dg, act)
        return dq, dk, dv.view(B, T, HV, -1), dbeta.view(B, T, HV), dg, dh0, dA_log, ddt_bias
    return dq, dk, dv.view(B, T, HV, -1), dbeta.view(B, T, HV), dg, dh0
