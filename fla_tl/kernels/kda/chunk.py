"""chunk_kda on the shared stages, in chunks of 64 tokens, per value head (key heads repeated over grouped value
heads), with G the chunk-local cumulative log2 gate per key channel (`gla.chunk.key_gate_cumsum`).

Per chunk, with S the state entering it:
  A_ij = beta_i sum_k k_i[k] k_j[k] 2^(G_i[k] - G_j[k]) (i > j),  Ai = (I + A)^-1       (`common.wy.wy_repr`, gate "gk")
  w = Ai diag(beta) (K 2^G),  u = Ai diag(beta) V,  v_new = u - w S,
  S <- diag(2^G_last) S + (K 2^(G_last - G))^T v_new                          (`common.chunk_delta_h`, gate "gk")
  o = scale (Q 2^G) S + A_qk v_new,  A_qk[i, j] = scale sum_k q_i k_j 2^(G_i - G_j) (j <= i)
                                                                                (`gla.chunk.chunk_gla_fwd_o`)
The gate activation (`use_gate_in_kernel`) runs in the cumulative sum's stage. The per-key scores of A and A_qk
are `common.key_gate`'s (one matmul while the chunk's decay span allows, 16-token sub-chunks beyond it). The state
pass forms w and u from the kept inverse, so neither is written.

Backward, from the kept G, Ai and A_qk: the states and v_new again (the same state pass); the state gradients and
dv_new (`chunk_delta_bwd_dhu`, gate "gk": A_qk^T dO + (K 2^(G_last - G)) dS, and dS <- diag(2^G_last) dS +
scale (Q 2^G)^T dO - (K 2^G)^T (Ai diag(beta))^T dv_new); dq, dk of the output's part, dw = -dv_new S^T and the gate's
rows q dq - k dk (`chunk_delta_bwd_dqkw`); the WY backward to k, v, beta and its own gate rows
(`wy.wy_bwd` -> `wy_key_gate`); dg per key from the rows and the chunk states (`cumsum.per_key_gate_grad_chunk`),
then through the activation (`delta_rule.fused_recurrent.activation_grads`, in the backend).
"""

import torch

from ...autotune.configs import BT
from ..common.chunk_delta_h import chunk_delta_bwd_dhu, chunk_delta_bwd_dqkw, chunk_delta_fwd_h
from ..common.cumsum import per_key_gate_grad_chunk
from ..common.fused_recurrent_delta import group_sum, qk_grads
from ..common.wy import wy_bwd, wy_repr
from ..delta_rule.chunk import packed_value_heads, state_in
from ..gla.chunk import chunk_gla_fwd_o, key_gate_cumsum


def chunk_kda_fwd_packed(q, k, v, beta, g, *, scale: float, initial_state, output_final_state: bool, meta,
                         keep: bool, act=None):
    """packed `[Ttot, HV, *]` inputs (q, k per value head), beta fp32 `[Ttot, HV]`, g fp32 `[Ttot, HV, K]` the log
    gates (with `act`, KDA's `GateActivation`: the raw input, activated by the cumulative sum's stage), states
    `[N, HV, K, V]` fp32; returns (o, final state or None, residuals or None): with `keep` the cumulative gates, the
    WY inverse and the intra-chunk scores A_qk for the backward."""
    gc = key_gate_cumsum(g[None], None, meta, act=act)
    _, _, ai = wy_repr(k, v, beta, meta=meta, gc=gc, pair=False, BT=BT)
    h, v_new, ht = chunk_delta_fwd_h(k, v, beta, ai, gate="gk", gc=gc, initial_state=initial_state,
                                     output_final_state=output_final_state, meta=meta, BT=BT)
    o, A = chunk_gla_fwd_o(q, k, v_new, h, gc, scale=scale, meta=meta, store_A=keep)
    return o, ht, ((gc, ai, A) if keep else None)


def chunk_kda_bwd_packed(q, k, v, beta, kept, do, dht, *, scale: float, initial_state, meta):
    """(dq, dk, dv in q's dtype, dbeta fp32, dg fp32 `[Ttot, HV, K]` of the log gates, dh0 fp32 or None), all per value
    head, from the forward's packed inputs, its residuals `kept` (gc, Ai, A_qk) and the output gradients."""
    gc, ai, aqk = kept
    h, v_new, h_last = chunk_delta_fwd_h(k, v, beta, ai, gate="gk", gc=gc, initial_state=initial_state,
                                         output_final_state=True, meta=meta, BT=BT)
    dh, dv_new, dh0 = chunk_delta_bwd_dhu(q, k, beta, ai, do, dht, gate="gk", gc=gc, scale=scale,
                                         need_dh0=initial_state is not None, meta=meta, aqk=aqk, BT=BT)
    dq, dk, dw, r, _ = chunk_delta_bwd_dqkw(q, k, v_new, do, dv_new, h, dh, gate="gk", gc=gc, scale=scale, meta=meta,
                                           BT=BT)
    dv, dbeta, r_wy = wy_bwd(k, v, beta, ai, dv_new, dw, dk, meta=meta, gc=gc, BT=BT)
    dg = per_key_gate_grad_chunk(r.add_(r_wy), h, dh, h_last, meta=meta, dg_dtype=torch.float32, BT=BT)
    return dq, dk, dv, dbeta, dg, dh0


def chunk_kda_fwd(q, k, v, beta, g, *, scale: float, initial_state, output_final_state: bool, state_v_first: bool,
                  cu_seqlens, use_qk_l2norm_in_kernel: bool, requires_grad: bool = False, act=None):
    """the forward on `[B, T, H, K]` q, k, `[B, T, HV, V]` v, `[B, T, HV]` beta and the log gates `[B, T, HV, K]`
    (with `act`: the raw gate input, activated in the cumulative sum's stage):
    (o `[B, T, HV, V]` in q's dtype, final state fp32 `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`) or
    None, the backward's residuals or None)."""
    B, T = q.shape[:2]
    HV, V = v.shape[2:]
    meta, q_, k_, v_, beta_, g_ = packed_value_heads(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel)
    o, ht, kept = chunk_kda_fwd_packed(q_, k_, v_, beta_, g_, scale=scale,
                                       initial_state=state_in(initial_state, state_v_first),
                                       output_final_state=output_final_state, meta=meta, keep=requires_grad,
                                       act=act)
    if ht is not None and state_v_first:
        ht = ht.transpose(-1, -2).contiguous()
    return o.view(B, T, HV, V), ht, kept


def chunk_kda_bwd(q, k, v, beta, g, kept, do, dht, *, scale: float, initial_state, state_v_first: bool, cu_seqlens,
                  use_qk_l2norm_in_kernel: bool):
    """(dq, dk `[B, T, H, K]` in q's dtype, dv `[B, T, HV, V]`, dbeta `[B, T, HV]` fp32, dg `[B, T, HV, K]` fp32, dh0
    fp32 or None) from the forward's inputs, its residuals and the output gradients do, dht (None: zero)."""
    B, T, H, _ = q.shape
    HV = v.shape[2]
    meta, q_, k_, v_, beta_, _ = packed_value_heads(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel)
    do = torch.zeros_like(v_) if do is None else do.reshape(v_.shape).to(v_.dtype).contiguous()
    dq, dk, dv, dbeta, dg, dh0 = chunk_kda_bwd_packed(
        q_, k_, v_, beta_, kept, do, state_in(dht, state_v_first), scale=scale,
        initial_state=state_in(initial_state, state_v_first), meta=meta)
    if dh0 is not None and state_v_first:
        dh0 = dh0.transpose(-1, -2)
    dq, dk = qk_grads(q, k, group_sum(dq, H).view(B, T, H, -1), group_sum(dk, H).view(B, T, H, -1),
                      use_qk_l2norm_in_kernel)
    return dq, dk, dv.view(B, T, HV, -1), dbeta.view(B, T, HV), dg.view(B, T, HV, -1), dh0
