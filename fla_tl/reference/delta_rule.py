"""Pure-PyTorch (gated) delta rule: the token-by-token recurrence (ground truth) and the chunked WY form (the `torch`
backend).

Per value head, with the state `h` `[K, V]` and a scalar log gate `g_t` (0 for the plain delta rule):
  h <- exp(g_t) h;   u_t = beta_t (v_t - h^T k_t);   h <- h + k_t u_t^T;   o_t = scale * h^T q_t.
The recurrence also takes a per-key gate `g_t` `[K]` (h <- Diag(exp(g_t)) h: KDA, `reference.kda`); the chunked form
takes the scalar one.
Grouped value heads (GVA): `v`, `g`, `beta` and the state have HV heads, `q`, `k` have H, and value head j reads key
head j // (HV / H).

Chunked form, per chunk of C tokens with in-chunk cumulative log gates b and the state S entering it
(Gamma_ij = exp(b_i - b_j), i >= j, formed masked so it never overflows for non-positive gates):
  (I + A) U = diag(beta) (V - diag(exp(b)) K S),  A_ij = beta_i Gamma_ij k_i . k_j (i > j, else 0)
  O = scale * (diag(exp(b)) Q S + (Q K^T * Gamma) U),   S' = exp(b_C) S + (K * exp(b_C - b))^T U.
The unit lower-triangular solve is `torch.linalg.solve_triangular` (the WY representation, T = (I + A)^-1 diag(beta));
everything runs in fp32 (fp64 for fp64 inputs) and is differentiable by autograd.
"""

import torch
import torch.nn.functional as F

from .simple_gla import _sequences, segmented_recurrence


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (fla's `l2norm`)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _recurrent_steps(q, k, v, beta, g, h, scale):
    """`[HV, L, D]` inputs (q, k already expanded to the value heads), beta `[HV, L]`, g `[HV, L]` (a scalar gate)
    or `[HV, L, K]` (a per-key gate: KDA's), state `[HV, K, V]`."""
    outs = []
    for t in range(q.shape[1]):
        h = h * (g[:, t, :, None] if g.dim() == 3 else g[:, t, None, None]).exp()
        u = beta[:, t, None] * (v[:, t] - torch.einsum("hk,hkv->hv", k[:, t], h))
        h = h + k[:, t, :, None] * u[:, None, :]
        outs.append(scale * torch.einsum("hk,hkv->hv", q[:, t], h))
    return torch.stack(outs, 1), h


def _recurrent_sequence(q, k, v, beta, g, h, scale):
    return segmented_recurrence(_recurrent_steps, (q, k, v, beta, g), v, h, scale)


def _chunk_sequence(q, k, v, beta, g, h, scale, chunk_size: int = 64):
    """the WY chunked form of one sequence: `[HV, L, D]` inputs, state `[HV, K, V]`."""
    HV, L, K = q.shape
    V = v.shape[-1]
    if L == 0:
        return v.new_zeros(HV, 0, V), h
    C = chunk_size
    pad = (-L) % C
    # padded tokens: zero key, value, beta and gate; they change neither outputs nor the state
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    NC = (L + pad) // C
    q, k, v = (x.view(HV, NC, C, -1) for x in (q, k, v))
    beta, b = beta.view(HV, NC, C), g.view(HV, NC, C).cumsum(-1)
    idx = torch.arange(C, device=q.device)
    lower = idx[:, None] >= idx[None, :]
    gamma = torch.where(lower, b[..., :, None] - b[..., None, :], float("-inf")).exp()  # [HV, NC, C, C]
    strict = (idx[:, None] > idx[None, :]).to(q.dtype)
    A = beta[..., :, None] * gamma * (k @ k.transpose(-1, -2)) * strict
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    # U = T (V - diag(e^b) K S) with T = (I + A)^-1 diag(beta): W = T diag(e^b) K, U0 = T V
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * b.exp()[..., None] * k], -1)
    sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u0, w = sol[..., :V], sol[..., V:]
    attn = (q @ k.transpose(-1, -2)) * gamma  # [HV, NC, C, C], lower triangle incl. diagonal
    q_decay = q * b.exp()[..., None]
    k_end = k * (b[..., -1:] - b).exp()[..., None]
    outs = []
    for c in range(NC):
        u = u0[:, c] - w[:, c] @ h
        outs.append(scale * (q_decay[:, c] @ h + attn[:, c] @ u))
        h = b[:, c, -1].exp()[:, None, None] * h + k_end[:, c].transpose(-1, -2) @ u
    return torch.cat(outs, 1)[:, :L], h


def _run(seq_fn, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
         use_qk_l2norm):
    dtype = torch.float64 if any(x is not None and x.dtype == torch.float64 for x in (q, k, v, beta, g)) \
        else torch.float32
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if scale is None:
        scale = K ** -0.5
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    group = HV // H
    outs, states = [], []
    for n, (bi, bos, eos) in enumerate(_sequences(B, T, cu_seqlens)):
        # [HV, L, D], the key heads repeated over their value heads
        qs, ks = (x[bi, bos:eos].repeat_interleave(group, 1).transpose(0, 1) for x in (q, k))
        vs = v[bi, bos:eos].to(dtype).transpose(0, 1)
        bs = beta[bi, bos:eos].to(dtype).transpose(0, 1)
        gs = g[bi, bos:eos].to(dtype).transpose(0, 1) if g is not None else bs.new_zeros(bs.shape)  # [HV, L(, K)]
        if initial_state is None:
            h0 = vs.new_zeros(HV, K, V)
        else:
            h0 = initial_state[n].to(dtype)
            h0 = h0.transpose(-1, -2) if state_v_first else h0
        o, ht = seq_fn(qs, ks, vs, bs, gs, h0, float(scale))
        outs.append(o.transpose(0, 1))
        states.append(ht.transpose(-1, -2) if state_v_first else ht)
    o = torch.stack(outs) if cu_seqlens is None else (torch.cat(outs)[None] if outs else v.new_zeros(1, 0, HV, V))
    return o, (torch.stack(states) if output_final_state else None)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    The (gated) delta rule token by token, in fp32 (fp64 for fp64 inputs): the ground truth.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, HV, V]`, HV a multiple of H.
        beta (torch.Tensor): `[B, T, HV]`, already activated.
        g (Optional[torch.Tensor]): log gates `[B, T, HV]` (None: the plain delta rule), or per-key log gates
            `[B, T, HV, K]` (KDA: :func:`fla_tl.reference.kda.recurrent_kda`).
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`).
        output_final_state (bool), state_v_first (bool), cu_seqlens (`[N + 1]`, `B == 1`).
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k first (eps 1e-6, as fla).

    Returns:
        o `[B, T, HV, V]` and the final state (or None) in the compute dtype.

    Examples::
        >>> q, k = torch.randn(2, 50, 2, 16), torch.randn(2, 50, 2, 16)
        >>> v, beta = torch.randn(2, 50, 4, 8), torch.rand(2, 50, 4)
        >>> g = torch.randn(2, 50, 4).sigmoid().log()
        >>> o, ht = recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True, use_qk_l2norm_in_kernel=True)
    """
    return _run(_recurrent_sequence, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first,
                cu_seqlens, use_qk_l2norm_in_kernel)


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """the (gated) delta rule in the chunked WY form (the `torch` backend); same arguments and returns as
    :func:`recurrent_gated_delta_rule`, plus `chunk_size`."""

    def seq_fn(q, k, v, beta, g, h, scale):
        return _chunk_sequence(q, k, v, beta, g, h, scale, chunk_size=chunk_size)

    return _run(seq_fn, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                use_qk_l2norm_in_kernel)
