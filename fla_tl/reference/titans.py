"""Pure-PyTorch Titans with a linear memory (fla's `chunk_titans_linear`): the token-by-token recurrence (ground truth)
and the chunked form (the `torch` backend).

Per head, with the memory M `[D, D]`, the momentum S `[D, D]` (S_0 = 0) and per-token scalars theta, alpha, eta:
  S_t = eta_t S_{t-1} - 2 theta_t k_t^T vn_t,   M_t = (1 - alpha_t) M_{t-1} + S_t,   o_t = q_t M_t + LN(q_t M_t) w + b,
where vn_t is fla's "gradient" of the layer-normed reconstruction loss, taken at the memory M_c that entered the
token's chunk of `chunk_size` tokens (the chunk size is part of the semantics), with x = k_t M_c, x^ = LN(x), s = std:
  g = (w x^ + b - (v_t - k_t)) w,   vn_t = D g - sum(g) / (s D) - x^ sum(g x^) / (s D).
LN(x) = (x - mean(x)) / sqrt(var(x) + eps) over the last dim, w and b `[H, D]`. (fla's vn is not the exact LN
gradient: the `D g` term is not divided by s D; it is reproduced as written.)

Chunked form, per chunk of L tokens with lb = cumsum log(1 - alpha), le = cumsum log(eta) (in-chunk, inclusive),
A_tk = exp(lb_t - lb_k) (k <= t), N_kj = theta_j exp(le_k - le_j) (j <= k), G = A N, f = A exp(le), beta = exp(lb):
  O = diag(beta) Q M + diag(f) Q S - 2 (Q K^T * G) Vn,
  M' = beta_L M + f_L S - 2 (K * G_L)^T Vn,   S' = exp(le_L) S - 2 (K * N_L)^T Vn   (rows L of G and N).
A last partial chunk uses its own last row L: the final state is the memory after the last real token. (fla's
`chunk_titans_linear_ref` pads T to a multiple of `chunk_size` and its final state then includes the pad tokens'
updates; its outputs are the same as here.)
"""

import torch


def titans_vnew(km, k, v, w, b, eps):
    """fla's per-token update values from x = k M `[..., D]`; w, b broadcast against x."""
    D = km.shape[-1]
    mean = km.mean(-1, keepdim=True)
    std = ((km - mean) ** 2).mean(-1, keepdim=True).add(eps).sqrt()
    xh = (km - mean) / std
    g = (w * xh + b - (v - k)) * w
    return D * g - g.sum(-1, keepdim=True) / (std * D) - xh * (g * xh).sum(-1, keepdim=True) / (std * D)


def titans_ln_residual(o, w, b, eps):
    """o + LN(o) w + b over the last dim."""
    mean = o.mean(-1, keepdim=True)
    std = ((o - mean) ** 2).mean(-1, keepdim=True).add(eps).sqrt()
    return o + (o - mean) / std * w + b


def _prepare(q, k, v, w, b, theta, alpha, eta, initial_state):
    """`[B, H, T, D]` tensors and `[B, H, T]` scalars in the compute dtype, w, b `[H, 1, D]`, the memory `[B, H, D, D]`."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, D = q.shape
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    theta, alpha, eta = (x.to(dtype).reshape(B, T, H).transpose(1, 2) for x in (theta, alpha, eta))
    w, b = (x.to(dtype).reshape(H, 1, D) for x in (w, b))
    M = q.new_zeros(B, H, D, D) if initial_state is None else initial_state.to(dtype)
    return q, k, v, w, b, theta, alpha, eta, M


def recurrent_titans_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Titans (linear memory) token by token, in fp32 (fp64 for fp64 inputs): the ground truth.

    Args:
        q, k, v (torch.Tensor): `[B, T, H, D]`. w, b (torch.Tensor): `[H, D]` (any shape of H * D elements).
        theta, alpha, eta (torch.Tensor): `[B, T, H, 1]` (or `[B, T, H]`).
        eps (float): Default: `1e-6`. chunk_size (int): the tokens that share one gradient memory. Default: `16`.
        initial_state (Optional[torch.Tensor]): the memory `[B, H, D, D]`. output_final_state (bool).

    Returns:
        o `[B, T, H, D]` and the final memory `[B, H, D, D]` (or None), in the compute dtype.

    Examples::
        >>> q, k, v = (torch.randn(2, 40, 2, 8) for _ in range(3))
        >>> w, b = torch.randn(2, 8), torch.randn(2, 8)
        >>> theta, alpha, eta = (torch.rand(2, 40, 2, 1) for _ in range(3))
        >>> o, ht = recurrent_titans_linear(q, k, v, w, b, theta, alpha, eta, output_final_state=True)
    """
    q, k, v, w, b, theta, alpha, eta, M = _prepare(q, k, v, w, b, theta, alpha, eta, initial_state)
    S = torch.zeros_like(M)
    M_chunk = M
    outs = []
    for t in range(q.shape[2]):
        if t % chunk_size == 0:
            M_chunk = M
        kt = k[:, :, t]
        vn = titans_vnew(torch.einsum("bhk,bhkv->bhv", kt, M_chunk), kt, v[:, :, t], w[:, 0], b[:, 0], eps)
        S = eta[:, :, t, None, None] * S - 2 * theta[:, :, t, None, None] * kt[..., :, None] * vn[..., None, :]
        M = (1 - alpha[:, :, t, None, None]) * M + S
        outs.append(titans_ln_residual(torch.einsum("bhk,bhkv->bhv", q[:, :, t], M), w[:, 0], b[:, 0], eps))
    o = torch.stack(outs, 1) if outs else q.new_zeros(q.shape).transpose(1, 2)
    return o, (M if output_final_state else None)


def titans_chunk_scalars(theta, alpha, eta):
    """the in-chunk mixing coefficients of one chunk, from `[..., L]` scalars: beta, f `[..., L]`, G, N `[..., L, L]`
    (G_tj, N_kj: lower triangles incl. the diagonal) and exp(le) `[..., L]`."""
    L = theta.shape[-1]
    lb = torch.log1p(-alpha).cumsum(-1)
    le = torch.log(eta.clamp_min(torch.finfo(eta.dtype).tiny)).cumsum(-1)
    idx = torch.arange(L, device=theta.device)
    lower = idx[:, None] >= idx[None, :]
    A = torch.where(lower, lb[..., :, None] - lb[..., None, :], float("-inf")).exp()
    N = theta[..., None, :] * torch.where(lower, le[..., :, None] - le[..., None, :], float("-inf")).exp()
    m = le.exp()
    return lb.exp(), (A @ m[..., None])[..., 0], A @ N, N, m


def chunk_titans_linear_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Titans (linear memory) in the chunked form (the `torch` backend), differentiable by autograd; same arguments
    and returns as :func:`recurrent_titans_linear`."""
    q, k, v, w, b, theta, alpha, eta, M = _prepare(q, k, v, w, b, theta, alpha, eta, initial_state)
    S = torch.zeros_like(M)
    T = q.shape[2]
    outs = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        qc, kc, vc = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        beta, f, G, N, m = titans_chunk_scalars(theta[:, :, s:e], alpha[:, :, s:e], eta[:, :, s:e])
        vn = titans_vnew(kc @ M, kc, vc, w, b, eps)
        attn = (qc @ kc.transpose(-1, -2)) * G
        o = beta[..., None] * (qc @ M) + f[..., None] * (qc @ S) - 2 * attn @ vn
        outs.append(titans_ln_residual(o, w, b, eps))
        M, S = (beta[..., -1, None, None] * M + f[..., -1, None, None] * S
                - 2 * (kc * G[..., -1, :, None]).transpose(-1, -2) @ vn,
                m[..., -1, None, None] * S - 2 * (kc * N[..., -1, :, None]).transpose(-1, -2) @ vn)
    o = torch.cat(outs, 2).transpose(1, 2) if outs else q.new_zeros(q.shape).transpose(1, 2)
    return o, (M if output_final_state else None)
