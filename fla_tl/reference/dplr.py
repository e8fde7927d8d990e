"""Pure-PyTorch generalized delta rule: diagonal plus low rank (DPLR), identity plus low rank (IPLR, no decay) and
RWKV-7's form of it, token by token.

Per sequence and head, with the state S `[K, V]` (fla's `naive.py`: the low-rank term reads the state before the
decay, b on the left):
  S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t),
IPLR drops the decay (gk = 0). RWKV-7 is DPLR with q = r, gk = w; its `fused_mul` form takes kk and the in-context
rate a instead, as a = -kk, b = kk * a (`rwkv7_low_rank`).

The chunked form (`chunk_dplr_torch`): in a chunk with cumulative log decays G (per key), exclusive ones G^- = G - gk,
the state S entering it and the rows u_j = S_{j-1}^T a_j (the low-rank term's pseudo-values),
  U = (I - A_ab)^-1 ((A e^(G^-)) S + A_ak V),   A_ab[i, j] = sum_k a_i b_j e^(G^-_i - G_j),  A_ak likewise with k
  (j < i), then  O = scale ((Q e^G) S + A_qk V + A_qb U)  (A_qk, A_qb with e^(G_i - G_j), j <= i) and
  S <- e^(G_last) S + (K e^(G_last - G))^T V + (B e^(G_last - G))^T U.
"""

import torch
import torch.nn.functional as F


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


def _chunk_sequence(q, k, v, a, b, g, h, scale, C: int):
    """the chunked form of one sequence: `[H, L, D]` inputs, g `[H, L, K]` (zeros without a decay), state `[H, K, V]`;
    the [C, C, K] decay factors are formed one chunk at a time (masked exponents, each <= 0)."""
    H, L, K = q.shape
    V = v.shape[-1]
    if L == 0:
        return v.new_zeros(H, 0, V), h
    pad = (-L) % C
    # padded tokens: zero inputs and decays; they change neither outputs nor the state
    q, k, v, a, b, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, a, b, g))
    idx = torch.arange(C, device=q.device)
    lower, strict = (idx[:, None] >= idx[None, :])[..., None], (idx[:, None] > idx[None, :])[..., None]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    outs = []
    for c0 in range(0, L + pad, C):
        qc, kc, vc, ac, bc, gc = (x[:, c0:c0 + C] for x in (q, k, v, a, b, g))
        G = gc.cumsum(1)  # [H, C, K]
        Gx = G - gc
        causal = torch.where(lower, G[:, :, None, :] - G[:, None, :, :], float("-inf")).exp()  # [H, C, C, K]
        shifted = torch.where(strict, Gx[:, :, None, :] - G[:, None, :, :], float("-inf")).exp()
        A_ab, A_ak = (torch.einsum("hik,hjk,hijk->hij", ac, x, shifted) for x in (bc, kc))
        A_qk, A_qb = (torch.einsum("hik,hjk,hijk->hij", qc, x, causal) for x in (kc, bc))
        u = torch.linalg.solve_triangular(eye - A_ab, (ac * Gx.exp()) @ h + A_ak @ vc, upper=False,
                                          unitriangular=True)
        outs.append(scale * ((qc * G.exp()) @ h + A_qk @ vc + A_qb @ u))
        decay = (G[:, -1:] - G).exp()
        h = G[:, -1, :, None].exp() * h + (kc * decay).transpose(-1, -2) @ vc + (bc * decay).transpose(-1, -2) @ u
    return torch.cat(outs, 1)[:, :L], h


def chunk_dplr_torch(q, k, v, a, b, gk=None, scale=None, initial_state=None, output_final_state=False, reverse=False,
                     cu_seqlens=None, chunk_size: int = 64):
    """the chunked form of :func:`recurrent_dplr` (the module docstring), same arguments and returns plus
    `chunk_size`; `reverse` flips each sequence in time around it. Differentiable by autograd."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else None
    N = len(bounds) - 1 if bounds is not None else B
    g = gk if gk is not None else torch.zeros_like(q, dtype=dtype)
    xs = [x.to(dtype) for x in (q, k, v, a, b, g)]
    outs, finals = [], []
    for n in range(N):
        seq = [x[0, bounds[n]:bounds[n + 1]] if bounds is not None else x[n] for x in xs]
        seq = [x.flip(0) if reverse else x for x in seq]
        h = (initial_state[n].to(dtype) if initial_state is not None
             else torch.zeros(H, K, V, dtype=dtype, device=q.device))
        o, h = _chunk_sequence(*(x.transpose(0, 1) for x in seq), h, scale, chunk_size)
        o = o.transpose(0, 1)
        outs.append(o.flip(0) if reverse else o)
        finals.append(h)
    o = torch.cat(outs)[None] if bounds is not None else torch.stack(outs)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)
