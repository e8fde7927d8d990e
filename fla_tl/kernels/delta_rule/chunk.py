"""chunk_(gated_)delta_rule on the shared stages, in chunks of 64 tokens, per value head (key heads repeated over
grouped value heads).

Forward: the gate's chunk-local cumulative sum (`common.cumsum`), the WY inverse Ai (`common.wy.wy_repr`), then either
one fused pass with the states in registers on the WY pair w, u (`common.fused_chunk_delta`, for K <= 128 when its
grid of sequences x heads x V tiles gives a quarter block per multiprocessor; `wy_repr` stores the pair) or the
chunk-parallel pair: the state pass with the corrected values v_new = u - w S, forming w, u per chunk from Ai
(`common.chunk_delta_h.chunk_delta_fwd_h`), and the output of linear attention on (q, k, v_new) with the states
entering each chunk (`common.chunk_o.chunk_fwd_o`).
Backward: the states again (the same state pass, from the saved inverse), the state gradients with the corrected
values' gradients (`chunk_delta_bwd_dhu`, forming w and the chunk's causal part of dv_new itself), dq and dk of the
linear-attention part on v_new with dw = -dv_new S^T and the gate's rows and state terms (`chunk_delta_bwd_dqkw`),
then the WY backward (`common.wy.wy_bwd`: dw and dv_new through w, u and the inverse to k, v, beta and the gate); dg
is the chunk-local scan of `common.cumsum.chunk_gate_grad_scan` with the WY share added to its rows.

`chunk_gated_delta_rule_fwd` / `_bwd` are the tilelang backend's forward and backward on the op's `[B, T, ...]`
tensors (the L2 norm of q and k, their repetition over grouped value heads, the state layouts); only the WY inverse is
kept between them.
"""

import torch

from ...autotune.configs import BT
from ..common.chunk_delta_h import chunk_delta_bwd_dhu, chunk_delta_bwd_dqkw, chunk_delta_fwd_h
from ..common.chunk_o import chunk_fwd_o
from ..common.cumsum import chunk_gate_cumsum, chunk_gate_grad_scan
from ..common.fused_chunk_delta import fused_blocks, fused_chunk_delta_fwd
from ..common.fused_recurrent_delta import group_sum, prepare_qk, qk_grads
from ..common.gates import head_decay
from ..common.utils import seq_meta, sm_count
from ..common.wy import wy_bwd, wy_repr

# the fused forward (states in registers, never written) runs once its grid gives this many blocks per multiprocessor
FUSED_MIN_BLOCKS_PER_SM = 0.25


def _gates(g, H: int, meta):
    """(gate option, per-head zero decay, chunk-local cumulative log2 gates or None)."""
    decay = head_decay(None, H, meta.cu.device)
    if g is None:
        return "none", decay, None
    return "g", decay, chunk_gate_cumsum(g, decay, meta, BT)


def chunk_delta_rule_fwd(q, k, v, beta, g, *, scale, initial_state, output_final_state, meta):
    """packed `[Ttot, HV, *]` inputs (q, k per value head), beta fp32 and g fp32 (or None) `[Ttot, HV]`, states
    `[N, HV, K, V]` fp32; returns (o, final state or None, the WY inverse to keep for the backward)."""
    HV = v.shape[1]
    gate, decay, gc = _gates(g, HV, meta)
    # the fused pass holds q, k, w tiles of every stage in shared memory: K <= 128 (fp32 tiles: K <= 64)
    fused = (q.shape[-1] <= (128 if q.element_size() == 2 else 64)
             and fused_blocks(meta.N, HV, v.shape[-1]) >= FUSED_MIN_BLOCKS_PER_SM * sm_count(q.device))
    # the chunk-parallel state pass forms the WY pair itself from the inverse
    w, u, ai = wy_repr(k, v, beta, meta=meta, gc=gc, pair=fused, BT=BT)
    if fused:
        o, ht = fused_chunk_delta_fwd(q, k, w, u, gate=gate, gc=gc, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, meta=meta, BT=BT)
        return o, ht, ai
    h, v_new, ht = chunk_delta_fwd_h(k, v, beta, ai, gate=gate, gc=gc, initial_state=initial_state,
                                     output_final_state=output_final_state, meta=meta, BT=BT)
    o = chunk_fwd_o(q, k, v_new, h, gate=gate, g_gamma=decay, scale=scale, meta=meta, BT=BT, gc=gc)
    return o, ht, ai


def chunk_delta_rule_bwd(q, k, v, beta, g, ai, do, dht, *, scale, initial_state, meta):
    """(dq, dk, dv in q's dtype, dbeta fp32, dg fp32 or None, dh0 fp32 or None), all per value head."""
    gate, _, gc = _gates(g, v.shape[1], meta)
    # the states and the corrected values again (both passes form w, u from the kept inverse)
    h, v_new, _ = chunk_delta_fwd_h(k, v, beta, ai, gate=gate, gc=gc, initial_state=initial_state,
                                    output_final_state=False, meta=meta, BT=BT)
    dh, dv_new, dh0 = chunk_delta_bwd_dhu(q, k, beta, ai, do, dht, gate=gate, gc=gc, scale=scale,
                                         need_dh0=initial_state is not None, meta=meta, BT=BT)
    # dq, dk of the linear-attention part on (q, k, v_new), dw = -dv_new S^T, and the gate's rows and state terms
    dq, dk, dw, r, c = chunk_delta_bwd_dqkw(q, k, v_new, do, dv_new, h, dh, gate=gate, gc=gc, scale=scale, meta=meta,
                                           BT=BT)
    # the WY backward adds its share into dk
    dv, dbeta, db = wy_bwd(k, v, beta, ai, dv_new, dw, dk, meta=meta, gc=gc, BT=BT)
    dg = None
    if gate == "g":
        dg = (chunk_gate_grad_scan(r.add_(db), c, meta=meta, dg_dtype=torch.float32, BT=BT) if meta.NT > 0
              else torch.zeros_like(db))
    return dq, dk, dv, dbeta, dg, dh0


def chunk_gated_delta_rule_fwd(
    q, k, v, beta, g, *, scale: float, initial_state, output_final_state: bool, state_v_first: bool, cu_seqlens,
    use_qk_l2norm_in_kernel: bool, requires_grad: bool,
):
    """the forward on `[B, T, H, K]` q, k, `[B, T, HV, V]` v, `[B, T, HV]` beta and g (None: no gate): (o `[B, T, HV,
    V]` in q's dtype, final state fp32 `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`) or None, and with
    `requires_grad` the backward's residual, the WY inverse Ai `[B * T, HV, BT]` in q's dtype, else None)."""
    B, T = q.shape[:2]
    HV, V = v.shape[2:]
    meta, q_, k_, v_, beta_, g_ = packed_value_heads(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel)
    o, ht, ai = chunk_delta_rule_fwd(q_, k_, v_, beta_, g_, scale=scale, initial_state=state_in(initial_state,
                                     state_v_first), output_final_state=output_final_state, meta=meta)
    if ht is not None and state_v_first:
        ht = ht.transpose(-1, -2).contiguous()
    return o.view(B, T, HV, V), ht, (ai if requires_grad else None)


def chunk_gated_delta_rule_bwd(
    q, k, v, beta, g, ai, do, dht, *, scale: float, initial_state, state_v_first: bool, cu_seqlens,
    use_qk_l2norm_in_kernel: bool,
):
    """(dq, dk `[B, T, H, K]` in q's dtype, dv `[B, T, HV, V]`, dbeta `[B, T, HV]` fp32, dg fp32 or None, dh0 fp32 or
    None) from the forward's inputs, its residual ai and the output gradients do, dht (None: zero)."""
    B, T, H, _ = q.shape
    HV = v.shape[2]
    meta, q_, k_, v_, beta_, g_ = packed_value_heads(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel)
    do = torch.zeros_like(v_) if do is None else do.reshape(v_.shape).to(v_.dtype).contiguous()
    dht = state_in(dht, state_v_first)
    dq, dk, dv, dbeta, dg, dh0 = chunk_delta_rule_bwd(q_, k_, v_, beta_, g_, ai, do, dht, scale=scale,
                                                      initial_state=state_in(initial_state, state_v_first),
                                                      meta=meta)
    if dh0 is not None and state_v_first:
        dh0 = dh0.transpose(-1, -2)
    dq, dk = qk_grads(q, k, group_sum(dq, H).view(B, T, H, -1), group_sum(dk, H).view(B, T, H, -1),
                      use_qk_l2norm_in_kernel)
    return (dq, dk, dv.view(B, T, HV, -1), dbeta.view(B, T, HV), dg.view(B, T, HV) if dg is not None else None,
            dh0)


def state_in(state, state_v_first: bool):
    """a state (or its gradient) in the kernels' `[N, HV, K, V]` layout, fp32."""
    if state is None:
        return None
    return (state.transpose(-1, -2) if state_v_first else state).float().contiguous()


def packed_value_heads(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel: bool):
    """(meta, q, k `[Ttot, HV, K]` repeated over their value heads, v `[Ttot, HV, V]` in q's dtype, beta fp32
    `[Ttot, HV]`, g fp32 `[Ttot, HV]` (a per-key gate: `[Ttot, HV, K]`) or None)."""
    q, k = prepare_qk(q, k, v, cu_seqlens, use_qk_l2norm_in_kernel)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    meta = seq_meta(B, T, cu_seqlens, BT, q.device)
    q_, k_ = (x.reshape(B * T, H, K) for x in (q, k))
    if HV != H:
        q_, k_ = (x.repeat_interleave(HV // H, dim=1) for x in (q_, k_))
    q_, k_ = q_.contiguous(), k_.contiguous()
    v_ = v.reshape(B * T, HV, V).to(q.dtype).contiguous()
    beta_ = beta.reshape(B * T, HV).float().contiguous()
    g_ = g.reshape(B * T, *g.shape[2:]).float().contiguous() if g is not None else None
    return meta, q_, k_, v_, beta_, g_
