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
"""

import torch
import torch.nn.functional as F

from .delta_rule import recurrent_gated_delta_rule


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
    if g.dim() != 4 or g.shape[:3] != v.shape[:3] or g.shape[-1] != q.shape[-1]:
        raise ValueError(f"recurrent_kda: g must be [B, T, HV, K] = {(*v.shape[:3], q.shape[-1])}, got "
                         f"{tuple(g.shape)}")
    return recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, state_v_first=state_v_first,
                                      cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
