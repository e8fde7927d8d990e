"""RWKV6 on GLA's kernels: the one-token query shift and the bonus term, and the autograd function over both modes.

RWKV6's query at t reads the state before token t, h_{t-1}, the state a GLA query at t - 1 reads. So the gated part
of the output is GLA's output with the queries moved one token back, r'_{t-1} = r_t (within each sequence, in the
recurrence's processing order), read one token later: o_t = o'_{t-1}. The first token of a sequence reads the
initial state, scale r_t^T h0, and the last token's shifted query is zero. The decay `w` enters GLA unshifted, so
GLA's gate gradient is RWKV6's `dw`. The bonus is elementwise: o_t += a_t v_t with a_t = scale sum_k r_t u k_t; its
gradients, with s_t = do_t . v_t: dv_t += a_t do_t, dr_t += scale s_t u k_t, dk_t += scale s_t u r_t,
du = scale sum_t s_t r_t k_t.
"""

import torch


def sequence_marks(B: int, T: int, cu_seqlens, device):
    """(first tokens, last tokens, the sequence of each) of every non-empty sequence, as flat token indices."""
    if cu_seqlens is None:
        seq = torch.arange(B, device=device)
        return seq * T, seq * T + T - 1, seq
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.nonzero(cu[1:] > cu[:-1]).flatten()
    return cu[:-1][seq], cu[1:][seq] - 1, seq


def shift(x: torch.Tensor, step: int, zero_rows: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t + step] along dim 0 (a copy), with the rows `zero_rows` (where t + step leaves the sequence) zero."""
    y = torch.roll(x, -step, 0)
    return y.index_fill_(0, zero_rows, 0)


def bonus_scores(r, k, u, scale):
    """a = scale * sum_k r u k, `[Ttot, H]` fp32."""
    return scale * torch.einsum("thk,thk->th", r.float() * u.float(), k.float())


class RWKV6Function(torch.autograd.Function):
    """RWKV6 through GLA launchers `fwd` / `bwd` (chunk or fused_recurrent, see `chunk.py` / `fused_recurrent.py`)."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, scale, initial_state, output_final_state, reverse, cu_seqlens, launchers):
        gla_fwd, gla_bwd, extra = launchers
        B, T, H, K = r.shape
        V = v.shape[-1]
        first, last, seq = sequence_marks(B, T, cu_seqlens, r.device)
        if reverse:
            first, last = last, first
        step = -1 if reverse else 1
        r, k, v, w = (x.contiguous() for x in (r, k, v, w))
        h0 = initial_state.contiguous() if initial_state is not None else None
        r_ = r.view(B * T, H, K)
        rq = shift(r_, step, last).view(B, T, H, K)
        og, ht = gla_fwd(rq, k, v, g_gamma=None, scale=scale, initial_state=h0, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, g=w, **extra(reverse))
        o = shift(og.view(B * T, H, V), -step, first).float()
        if h0 is not None:
            o[first] += scale * torch.einsum("nhk,nhkv->nhv", r_[first].float(), h0[seq].float())
        a = bonus_scores(r_, k.view(B * T, H, K), u, scale)
        o = (o + a[..., None] * v.view(B * T, H, V)).to(v.dtype).view(B, T, H, V)
        ctx.save_for_backward(r, k, v, w, u, h0, cu_seqlens, ht)
        ctx.scale, ctx.reverse, ctx.launchers = scale, reverse, launchers
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, k, v, w, u, h0, cu_seqlens, ht = ctx.saved_tensors
        gla_fwd, gla_bwd, extra = ctx.launchers
        scale, reverse = ctx.scale, ctx.reverse
        B, T, H, K = r.shape
        V = v.shape[-1]
        first, last, seq = sequence_marks(B, T, cu_seqlens, r.device)
        if reverse:
            first, last = last, first
        step = -1 if reverse else 1
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        r_, k_, v_, do_ = r.view(-1, H, K), k.view(-1, H, K), v.view(-1, H, V), do.view(-1, H, V)
        rq = shift(r_, step, last).view(B, T, H, K)
        dog = shift(do_, step, last).view(B, T, H, V)
        dq, dk, dv, dh0, dw = gla_bwd(rq, k, v, dog, dht, g_gamma=None, scale=scale, initial_state=h0,
                                      cu_seqlens=cu_seqlens, g=w, ht=ht, **extra(reverse))
        dr = shift(dq.view(-1, H, K), -step, first).float()
        do32 = do_.float()
        if h0 is not None:
            dr[first] += scale * torch.einsum("nhkv,nhv->nhk", h0[seq].float(), do32[first])
            dh0 = dh0.float().index_add(0, seq, scale * torch.einsum("nhk,nhv->nhkv", r_[first].float(),
                                                                      do32[first]))
        # the bonus
        s = torch.einsum("thv,thv->th", do32, v_.float())[..., None] * scale
        uf = u.float()
        dr = dr + s * uf * k_.float()
        dk = dk.view(-1, H, K).float() + s * uf * r_.float()
        a = bonus_scores(r_, k_, u, scale)
        dv = dv.view(-1, H, V).float() + a[..., None] * do32
        du = torch.einsum("thk,thk->hk", s * r_.float(), k_.float())
        return (dr.to(r.dtype).view_as(r), dk.to(k.dtype).view_as(k), dv.to(v.dtype).view_as(v), dw.to(w.dtype),
                du.to(u.dtype), None, dh0.to(h0.dtype) if h0 is not None else None, None, None, None, None)
