"""Pure-PyTorch generalized delta rule: diagonal plus low rank (DPLR), identity plus low rank (IPLR, no decay) and
RWKV-7's form of it, token by token.

Per sequence and head, with the state S `[K, V]` (fla's `naive.py`: the low-rank term reads the state before the
decay, b on the left):
  S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t),
IPLR drops the decay (gk = 0). RWKV-7 is DPLR with q = r, gk = w; its `fused_mul` form takes kk and the in-context
rate a instead, as a = -kk, b = kk * a (`rwkv7_low_rank`).
"""

import torch


def rwkv7_low_rank(kk: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7's low-rank pair from its normalised key kk and in-context rate a (both `[B, T, H, K]`): (-kk, kk * a),
    the DPLR update's a and b."""
    return -kk, kk * a


def recurrent_dplr(q, k, v, a, b, gk=None, scale=None, initial_state=None, output_final_state=False, reverse=False,
                   cu_seqlens=None):
    """o `[B, T, H, V]` in q's dtype and the final state `[N, H, K, V]` (fp32, fp64 for fp64 inputs; None without
    `output_final_state`) of the DPLR recurrence above; q, k, a, b, gk `[B, T, H, K]` (gk None: no decay, IPLR),
    v `[B, T, H, V]`, `initial_state` `[N, H, K, V]`, packed sequences by `cu_seqlens` (B = 1); `reverse` runs each
    sequence from its last token to its first. Differentiable in every tensor."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    bounds = (cu_seqlens.tolist() if cu_seqlens is not None else None)
    N = len(bounds) - 1 if bounds is not None else B
    xs = [x.to(dtype) if x is not None else None for x in (q, k, v, a, b, gk)]
    outs, finals = [], []
    for n in range(N):
        if bounds is not None:
            q_, k_, v_, a_, b_, g_ = (x[0, bounds[n]:bounds[n + 1]] if x is not None else None for x in xs)
        else:
            q_, k_, v_, a_, b_, g_ = (x[n] if x is not None else None for x in xs)
        S = (initial_state[n].to(dtype) if initial_state is not None
             else torch.zeros(H, K, V, dtype=dtype, device=q.device))
        o = [None] * q_.shape[0]
        steps = range(q_.shape[0] - 1, -1, -1) if reverse else range(q_.shape[0])
        for t in steps:
            low_rank = b_[t, :, :, None] * torch.einsum("hk,hkv->hv", a_[t], S)[:, None, :]
            decayed = S * g_[t].exp()[:, :, None] if g_ is not None else S
            S = decayed + low_rank + k_[t, :, :, None] * v_[t, :, None, :]
            o[t] = torch.einsum("hk,hkv->hv", q_[t] * scale, S)
        outs.append(torch.stack(o) if o else v_.new_zeros(0, H, V, dtype=dtype))
        finals.append(S)
    o = torch.cat(outs)[None] if bounds is not None else torch.stack(outs)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)
