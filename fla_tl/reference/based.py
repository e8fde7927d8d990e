"""Pure-PyTorch Based and ReBased: causal linear attention with a polynomial feature map, in the attention form.

Based (2nd-order Taylor of exp): `a_ij = 1 + s_ij + s_ij^2 / 2`, ReBased: `a_ij = s_ij^2`, with `s_ij = scale * q_i . k_j`
for j <= i; `o_i = sum_j a_ij v_j`, divided by `z_i + eps` (`z_i = sum_j a_ij`) when normalised (eps 1e-6 for Based,
`eps` for ReBased, as fla). Queries are processed in blocks (each block checkpointed) so memory stays O(block * T).
Layout `[B, T, H, D]`; computed in fp32 (fp64 for fp64 inputs), returned in q's dtype.
"""

import torch
from torch.utils.checkpoint import checkpoint

from .simple_gla import checkpointing

QUERY_BLOCK = 512


def _block(q, k, v, start, feature):
    # q: [B, H, Lq, K] for queries start..; k, v: [B, H, T, *]
    s = q @ k.transpose(-1, -2)
    a = feature(s)
    Lq, T = q.shape[-2], k.shape[-2]
    i = torch.arange(start, start + Lq, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    a = a.masked_fill(j > i, 0)
    return a @ v, a.sum(-1)


def attention_form(q, k, v, scale, feature):
    """the unnormalised causal attention with the score map `feature`: (o `[B, H, T, V]`, z `[B, H, T]`) in fp32 (fp64
    for fp64 inputs), queries in blocks."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    q = q * scale
    T = q.shape[-2]
    outs, zs = [], []
    for start in range(0, T, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, T)
        args = (q[..., start:end, :], k[..., :end, :], v[..., :end, :], start, feature)
        o, z = checkpoint(_block, *args, use_reentrant=False) if checkpointing() else _block(*args)
        outs.append(o)
        zs.append(z)
    o = torch.cat(outs, -2) if outs else v.new_zeros(v.shape)
    z = torch.cat(zs, -1) if zs else q.new_zeros(q.shape[:-1])
    return o, z  # [B, H, T, V], [B, H, T]


def based_feature(s):
    return 1 + s + 0.5 * s * s


def rebased_feature(s):
    return s * s


def parallel_based_torch(q, k, v, scale: float | None = None, use_norm: bool = True) -> torch.Tensor:
    """Based in the attention form; `[B, T, H, V]` in q's dtype (fla's `parallel_based` / `fused_chunk_based`)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, z = attention_form(q, k, v, scale, based_feature)
    if use_norm:
        o = o / (z[..., None] + 1e-6)
    return o.transpose(1, 2).to(q.dtype)


def parallel_rebased_torch(q, k, v, eps: float = 1e-5, use_scale: bool = True, use_normalize: bool = True,
                           return_both: bool = False):
    """ReBased in the attention form (fla's `parallel_rebased`): `[B, T, H, V]` in q's dtype, or with `return_both`
    the unnormalised `o` `[B, H, T, V]` and `z` `[B, H, T]` (fla's layout for that case)."""
    scale = q.shape[-1] ** -0.5 if use_scale else 1.0
    o, z = attention_form(q, k, v, scale, rebased_feature)
    if return_both:
        return o, z
    if use_normalize:
        o = o / (z[..., None] + eps)
    return o.transpose(1, 2).to(q.dtype)


def _taylor_features(x: torch.Tensor, constant: bool, linear: bool) -> torch.Tensor:
    """[..., K] -> [..., F]: optional 1, optional x, and vec(x x^T) / sqrt(2) (so that phi(a) . phi(b) gives
    1 + a.b + (a.b)^2 / 2, or with `constant=linear=False` and an extra sqrt(2), (a.b)^2)."""
    parts = []
    if constant:
        parts.append(torch.ones_like(x[..., :1]))
    if linear:
        parts.append(x)
    quad = (x[..., :, None] * x[..., None, :]).flatten(-2)
    parts.append(quad / (2 ** 0.5) if constant or linear else quad)
    return torch.cat(parts, -1)


def _recurrent_feature_attention(q, k, v, features):
    """sum_{j <= i} phi(q_i) . phi(k_j) v_j and the normaliser, by the token-by-token linear-attention recurrence."""
    from .simple_gla import recurrent_simple_gla

    fq, fk = features(q), features(k)
    ones = torch.ones_like(v[..., :1])
    o, _ = recurrent_simple_gla(fq, fk, torch.cat([v, ones], -1), scale=1.0)
    return o[..., :-1], o[..., -1]


def recurrent_based(q, k, v, scale: float | None = None, use_norm: bool = True) -> torch.Tensor:
    """Based by the linear-attention recurrence on its 2nd-order Taylor feature map (the ground truth; small K)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, z = _recurrent_feature_attention(q * scale, k, v, lambda x: _taylor_features(x, True, True))
    return (o / (z[..., None] + 1e-6) if use_norm else o).to(q.dtype)


def recurrent_rebased(q, k, v, eps: float = 1e-5, use_scale: bool = True, use_normalize: bool = True) -> torch.Tensor:
    """ReBased by the linear-attention recurrence on the squared feature map (the ground truth; small K)."""
    scale = q.shape[-1] ** -0.5 if use_scale else 1.0
    o, z = _recurrent_feature_attention(q * scale, k, v, lambda x: _taylor_features(x, False, False))
    return (o / (z[..., None] + eps) if use_normalize else o).to(q.dtype)
