"""Pure-PyTorch KDA (Kimi Delta Attention): the token-by-token recurrence (the ground truth) and the gate and beta
activations the kernels fuse.

KDA is the gated delta rule with a per-key (diagonal) decay. Per value head, with the state `S` `[K, V]` and the log
gate `g_t` `[K]`:
  S <- Diag(exp(g_t)) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = scale * S^T q_t,
i.e. S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T. Grouped value heads (GVA): `v`, `g`,
`beta` and the state have HV heads, `q` and `k` have H, and value head j reads key head j // (HV / H).

The gate computed in the kernel (`use_gate_in_kernel`) from the raw `g` `[B, T, HV, K]`, `A_log` `[HV]` and
`dt_bias` `[HV * K]`:
  g = -exp(A_log) * softplus(g + dt_bias)                 (no `lower_bound`),
  g = lower_bound * sigmoid(exp(A_log) * (g + dt_bias))   (`lower_bound`; without `A_log` the factor is 1),
so a bounded gate lies in (lower_bound, 0).

Chunked form (the `torch` backend), per chunk of C tokens with in-chunk cumulative log gates b `[C, K]` and the state
S entering it (Gamma_ijk = exp(b_ik - b_jk), i >= j, formed per key and masked so it never overflows for
non-positive gates):
  (I + A) U = diag(beta) (V - (K * exp(b)) S),   A_ij = beta_i sum_k k_ik k_jk Gamma_ijk (i > j, else 0)
  O = scale * ((Q * exp(b)) S + P U),   P_ij = sum_k q_ik k_jk Gamma_ijk (i >= j),
  S' = Diag(exp(b_C)) S + (K * exp(b_C - b))^T U.
"""

import torch
import torch.nn.functional as F

from .delta_rule import _run, recurrent_gated_delta_rule


def kda_gate(g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None = None,
             lower_bound: float | None = None) -> torch.Tensor:
    """the log-space decay `[B, T, HV, K]` fp32 (fp64 for fp64 inputs) from the raw gate input `g` `[B, T, HV, K]`,
    `A_log` `[HV]` (required without `lower_bound`) and `dt_bias` `[HV * K]` (or None): see the module docstring."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    HV, K = g.shape[-2:]
    x = g.to(dtype)
    if dt_bias is not None:
        x = x + dt_bias.to(dtype).view(HV, K)
    if lower_bound is None:
        if A_log is None:
            raise ValueError("kda_gate: A_log is required without lower_bound")
        return -A_log.to(dtype).exp()[:, None] * F.softplus(x)
    if A_log is not None:
        x = A_log.to(dtype).exp()[:, None] * x
    return lower_bound * torch.sigmoid(x)


def kda_beta(beta: torch.Tensor, use_beta_sigmoid: bool, allow_neg_eigval: bool) -> torch.Tensor:
    """the betas the recurrence takes: `beta` as given, or `sigmoid(beta)` from logits (`use_beta_sigmoid`), doubled
    into [0, 2) with `allow_neg_eigval` (which only applies together with the sigmoid, as in fla)."""
    if not use_beta_sigmoid:
        return beta
    b = torch.sigmoid(beta)
    return 2 * b if allow_neg_eigval else b


def _check_gate(q, v, g):
    if g.dim() != 4 or g.shape[:3] != v.shape[:3] or g.shape[-1] != q.shape[-1]:
        raise ValueError(f"KDA: g must be [B, T, HV, K] = {(*v.shape[:3], q.shape[-1])}, got {tuple(g.shape)}")


def recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    KDA token by token, in fp32 (fp64 for fp64 inputs): the ground truth.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, HV, V]`, HV a multiple of H.
        g (torch.Tensor): log gates `[B, T, HV, K]` (already activated: see :func:`kda_gate`).
        beta (torch.Tensor): `[B, T, HV]` (already activated: see :func:`kda_beta`).
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`).
        output_final_state (bool), state_v_first (bool), cu_seqlens (`[N + 1]`, `B == 1`).
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k first (eps 1e-6, as fla).

    Returns:
        o `[B, T, HV, V]` and the final state (or None) in the compute dtype.

    Examples::
        >>> q, k = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
        >>> v, beta = torch.randn(1, 40, 4, 8), torch.rand(1, 40, 4)
        >>> g = F.logsigmoid(torch.randn(1, 40, 4, 16))
        >>> o, ht = recurrent_kda(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    """
    _check_gate(q, v, g)
    return recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, state_v_first=state_v_first,
                                      cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def _chunk_sequence(q, k, v, beta, g, h, scale, chunk_size: int = 64):
    """the chunked form of one sequence: `[HV, L, D]` inputs (q, k expanded to the value heads), beta `[HV, L]`, g
    `[HV, L, K]`, state `[HV, K, V]`; the [C, C, K] gate factors are formed one chunk at a time."""
    HV, L, K = q.shape
    V = v.shape[-1]
    if L == 0:
        return v.new_zeros(HV, 0, V), h
    C = chunk_size
    pad = (-L) % C
    # padded tokens: zero query, key, value, beta and gate; they change neither outputs nor the state
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta, (0, pad))
    idx = torch.arange(C, device=q.device)
    lower = (idx[:, None] >= idx[None, :])[..., None]  # [C, C, 1]
    strict = (idx[:, None] > idx[None, :]).to(q.dtype)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    outs = []
    for c0 in range(0, L + pad, C):
        qc, kc, vc, bc = (x[:, c0:c0 + C] for x in (q, k, v, beta))
        b = g[:, c0:c0 + C].cumsum(1)  # [HV, C, K]
        gamma = torch.where(lower, b[:, :, None, :] - b[:, None, :, :], float("-inf")).exp()  # [HV, C, C, K]
        A = bc[..., None] * torch.einsum("hik,hjk,hijk->hij", kc, kc, gamma) * strict
        P = torch.einsum("hik,hjk,hijk->hij", qc, kc, gamma)
        # U = T (V - (K e^b) S) with T = (I + A)^-1 diag(beta): W = T (K e^b), U0 = T V
        rhs = torch.cat([bc[..., None] * vc, bc[..., None] * kc * b.exp()], -1)
        sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        u = sol[..., :V] - sol[..., V:] @ h
        outs.append(scale * ((qc * b.exp()) @ h + P @ u))
        h = b[:, -1, :, None].exp() * h + (kc * (b[:, -1:] - b).exp()).transpose(-1, -2) @ u
    return torch.cat(outs, 1)[:, :L], h


def chunk_kda_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA in the chunked form (the module docstring), differentiable by autograd; the arguments and returns of
    :func:`recurrent_kda`, plus `chunk_size`."""
    _check_gate(q, v, g)

    def seq_fn(q, k, v, beta, g, h, scale):
        return _chunk_sequence(q, k, v, beta, g, h, scale, chunk_size=chunk_size)

    return _run(seq_fn, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                use_qk_l2norm_in_kernel)
