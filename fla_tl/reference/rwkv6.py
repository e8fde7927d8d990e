"""Pure-PyTorch RWKV6: the token-by-token recurrence (ground truth) and a chunked form (the `torch` backend).

`o_t = scale * (h_{t-1}^T r_t + (sum_k r_t[k] u[k] k_t[k]) v_t)`, `h_t = diag(exp(w_t)) h_{t-1} + k_t v_t^T`, with a
per-key log decay `w` `[B, T, H, K]` and a per-head bonus `u` `[H, K]`. The state update is GLA's; the output reads the
state before the current token and adds the current token through the bonus instead. The chunked form keeps every
exponent non-positive for non-positive decays (pairwise factors exp(b_{i-1} - b_j), j < i, formed per key channel).
"""

import torch
import torch.nn.functional as F

from .simple_gla import _compute_dtype, _run_sequences, segmented_recurrence


def _recurrent_steps(r, k, v, w, u, h, scale):
    """`[H, L, D]` inputs, per-key log decays `w` `[H, L, K]`, bonus `u` `[H, K]`, state `h` `[H, K, V]`."""
    outputs = []
    for t in range(r.shape[1]):
        bonus = (r[:, t] * u * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        outputs.append(scale * (torch.einsum("hk,hkv->hv", r[:, t], h) + bonus))
        h = h * w[:, t].exp()[:, :, None] + k[:, t, :, None] * v[:, t, None, :]
    return torch.stack(outputs, 1), h


def _chunk_sequence(r, k, v, w, u, h, scale, chunk_size: int = 64):
    """one sequence in chunks: strictly causal pairwise per-channel decays inside a chunk, the bonus on the diagonal,
    the carried state across chunks."""
    H, L = r.shape[:2]
    if L == 0:
        return r.new_zeros(H, 0, v.shape[-1]), h
    pad = (-L) % chunk_size
    # padded tokens have zero keys and a zero log decay: they change neither the outputs nor the state
    r, k, v, w = (F.pad(x, (0, 0, 0, pad)) for x in (r, k, v, w))
    strict = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=r.device).tril(-1)
    outputs = []
    for s in range(0, L + pad, chunk_size):
        rc, kc, vc = r[:, s:s + chunk_size], k[:, s:s + chunk_size], v[:, s:s + chunk_size]
        b = w[:, s:s + chunk_size].cumsum(1)  # [H, C, K], inclusive
        bq = b - w[:, s:s + chunk_size]  # exclusive: the decay a query applies to the state before its token
        # mask before exp so the upper triangle never overflows; [H, C, C, K]
        gap = torch.where(strict[None, :, :, None], bq[:, :, None, :] - b[:, None, :, :], float("-inf"))
        attn = torch.einsum("hik,hjk,hijk->hij", rc, kc, gap.exp())
        bonus = (rc * u[:, None, :] * kc).sum(-1, keepdim=True) * vc
        outputs.append(scale * (attn @ vc + bonus + (rc * bq.exp()) @ h))
        h = b[:, -1].exp()[:, :, None] * h + (kc * (b[:, -1:] - b).exp()).transpose(-1, -2) @ vc
    return torch.cat(outputs, 1)[:, :L], h


def _run(seq_fn, r, k, v, w, u, scale, initial_state, output_final_state, reverse, cu_seqlens):
    dtype = _compute_dtype(r, k, v, w, u, initial_state)
    if scale is None:
        scale = r.shape[-1] ** -0.5
    u = u.to(dtype)

    def fn(rs, ks, vs, ws, h0, s):
        return seq_fn(rs, ks, vs, ws, u, h0, s)

    return _run_sequences(fn, r, k, v, w.to(dtype), scale=float(scale), initial_state=initial_state,
                          output_final_state=output_final_state, reverse=reverse, state_v_first=False,
                          cu_seqlens=cu_seqlens, dtype=dtype)


def recurrent_rwkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    RWKV6 by the token-by-token recurrence in fp32 (fp64 when any input is fp64): the ground truth.

    Args:
        r, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        w (torch.Tensor): per-key log decays `[B, T, H, K]`. u (torch.Tensor): bonus `[H, K]`.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`.
        output_final_state (bool), reverse (bool): as fla's `fused_recurrent_rwkv6`.
        cu_seqlens (Optional[torch.Tensor]): `[N + 1]` with `B == 1`.

    Returns:
        o `[B, T, H, V]` and the final state (or None) in the compute dtype.

    Examples::
        >>> r, k, v = torch.randn(2, 50, 4, 16), torch.randn(2, 50, 4, 16), torch.randn(2, 50, 4, 8)
        >>> w, u = torch.randn(2, 50, 4, 16).sigmoid().log(), torch.randn(4, 16)
        >>> o, ht = recurrent_rwkv6(r, k, v, w, u, output_final_state=True)
        >>> r, k, v, w = (x.flatten(0, 1)[None] for x in (r, k, v, w))
        >>> o, ht = recurrent_rwkv6(r, k, v, w, u, cu_seqlens=torch.tensor([0, 30, 100]), output_final_state=True)
    """

    def seq_fn(rs, ks, vs, ws, us, h0, s):
        return segmented_recurrence(lambda *a: _recurrent_steps(*a[:4], us, *a[4:]), (rs, ks, vs, ws), vs, h0, s)

    return _run(seq_fn, r, k, v, w, u, scale, initial_state, output_final_state, reverse, cu_seqlens)


def chunk_rwkv6_torch(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV6 in chunks (the `torch` backend, differentiable by autograd); same arguments and returns as
    :func:`recurrent_rwkv6`."""

    def seq_fn(rs, ks, vs, ws, us, h0, s):
        return _chunk_sequence(rs, ks, vs, ws, us, h0, s, chunk_size=chunk_size)

    return _run(seq_fn, r, k, v, w, u, scale, initial_state, output_final_state, reverse, cu_seqlens)
