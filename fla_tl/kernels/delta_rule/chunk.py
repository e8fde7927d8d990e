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
"""


import torch

from ..common.chunk_delta_h import chunk_delta_bwd_dhu, chunk_delta_bwd_dqkw, chunk_delta_fwd_h
from ..common.chunk_o import chunk_fwd_o
from ..common.cumsum import chunk_gate_cumsum, chunk_gate_grad_scan
from ..common.fused_chunk_delta import fused_blocks, fused_chunk_delta_fwd
from ..common.gates import head_decay
from ..common.utils import seq_meta, sm_count
from ..common.wy import wy_bwd, wy_repr
from .fused_recurrent import _group_sum, prepare_qk

BT = 64
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
    fused = q.shape[-1] <= (128 if q.element_size() == 2 else 64) and fused_blocks(meta.N, HV, v.shape[-1]) >= FUSED_MIN_BLOCKS_PER_SM * sm_count(
        q.device)
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


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens):
        B, T, H, K = q.shape
        HV, V = v.shape[2:]
        meta = seq_meta(B, T, cu_seqlens, BT, q.device)
        q_, k_ = (x.reshape(B * T, H, K) for x in (q, k))
        if HV != H:
            q_, k_ = (x.repeat_interleave(HV // H, dim=1) for x in (q_, k_))
        q_, k_ = q_.contiguous(), k_.contiguous()
        v_ = v.reshape(B * T, HV, V).to(q.dtype).contiguous()
        beta_ = beta.reshape(B * T, HV).float().contiguous()
        g_ = g.reshape(B * T, HV).float().contiguous() if g is not None else None
        h0 = initial_state
        if h0 is not None:
            h0 = (h0.transpose(-1, -2) if state_v_first else h0).float().contiguous()
        o, ht, ai = chunk_delta_rule_fwd(q_, k_, v_, beta_, g_, scale=scale, initial_state=h0,
                                         output_final_state=output_final_state, meta=meta)
        if ht is not None and state_v_first:
            ht = ht.transpose(-1, -2).contiguous()
        ctx.save_for_backward(q_, k_, v_, beta_, g_, ai, h0)
        ctx.meta, ctx.scale, ctx.state_v_first, ctx.shape = meta, scale, state_v_first, (B, T, H, HV)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, beta.dtype, g.dtype if g is not None else None,
                      initial_state.dtype if initial_state is not None else None)
        ctx.set_materialize_grads(False)
        return o.view(B, T, HV, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, ai, h0 = ctx.saved_tensors
        B, T, H, HV = ctx.shape
        do = torch.zeros_like(v) if do is None else do.reshape(v.shape).to(v.dtype).contiguous()
        if dht is not None:
            dht = (dht.transpose(-1, -2) if ctx.state_v_first else dht).float().contiguous()
        dq, dk, dv, dbeta, dg, dh0 = chunk_delta_rule_bwd(q, k, v, beta, g, ai, do, dht, scale=ctx.scale,
                                                          initial_state=h0, meta=ctx.meta)
        if dh0 is not None and ctx.state_v_first:
            dh0 = dh0.transpose(-1, -2)
        q_dtype, k_dtype, v_dtype, beta_dtype, g_dtype, h0_dtype = ctx.dtypes
        return (
            _group_sum(dq, H).view(B, T, H, -1).to(q_dtype),
            _group_sum(dk, H).view(B, T, H, -1).to(k_dtype),
            dv.view(B, T, HV, -1).to(v_dtype),
            dbeta.view(B, T, HV).to(beta_dtype),
            dg.view(B, T, HV).to(g_dtype) if dg is not None else None,
            None,
            dh0.to(h0_dtype) if dh0 is not None else None,
            None,
            None,
            None,
        )


def chunk_gated_delta_rule_tl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    The (gated) delta rule in the chunked WY form on the TileLang kernels, differentiable in q, k, v, beta, g and
    initial_state.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`, bf16 / fp16 / fp32, K <= 256.
        v (torch.Tensor): `[B, T, HV, V]`, HV a multiple of H (value head j reads key head j // (HV / H)), V <= 256.
        beta (torch.Tensor): `[B, T, HV]`, already activated.
        g (Optional[torch.Tensor]): log gates `[B, T, HV]` (fp32 recommended). Default: None (the plain delta rule).
        scale (float): the output scale (fla's default is `K ** -0.5`).
        initial_state (Optional[torch.Tensor]): `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`). Default: None.
        output_final_state (bool): return the final state. Default: False.
        state_v_first (bool): states as `[N, HV, V, K]`. Default: False.
        cu_seqlens (Optional[torch.Tensor]): `[N + 1]` sequence offsets, with B == 1. Default: None.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k first (eps 1e-6, in PyTorch). Default: False.

    Returns:
        o `[B, T, HV, V]` in q's dtype and the final state fp32 `[N, HV, K, V]` (`[N, HV, V, K]`) or None.

    Examples::
        >>> q, k = torch.randn(2, 64, 2, 128, device="cuda"), torch.randn(2, 64, 2, 128, device="cuda")
        >>> v, beta = torch.randn(2, 64, 4, 128, device="cuda"), torch.rand(2, 64, 4, device="cuda")
        >>> g = F.logsigmoid(torch.randn(2, 64, 4, device="cuda"))
        >>> o, ht = chunk_gated_delta_rule_tl(q, k, v, beta, g, scale=128 ** -0.5, output_final_state=True,
        ...                                   use_qk_l2norm_in_kernel=True)
        >>> cu = torch.tensor([0, 50, 128], device="cuda")
        >>> o, ht = chunk_gated_delta_rule_tl(q.view(1, 128, 2, 128), k.view(1, 128, 2, 128), v.view(1, 128, 4, 128),
        ...                                   beta.view(1, 128, 4), g.view(1, 128, 4), scale=128 ** -0.5,
        ...                                   cu_seqlens=cu, output_final_state=True, use_qk_l2norm_in_kernel=True)
    """
    q, k = prepare_qk(q, k, v, cu_seqlens, use_qk_l2norm_in_kernel)
    return ChunkDeltaRuleFunction.apply(q, k, v, beta, g, float(scale), initial_state, output_final_state,
                                        state_v_first, cu_seqlens)
