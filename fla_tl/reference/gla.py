"""Pure-PyTorch GLA (gated linear attention with a log gate per key channel): the token-by-token recurrence (ground
truth) and a chunked form (the `torch` backend).

`h_t = diag(exp(g_t)) h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`, with `g` `[B, T, H, K]`. The chunked form
keeps every exponent non-positive for non-positive gates: inside a chunk the pairwise factors exp(b_i - b_j) (i >= j)
are formed per key channel, never exp(b_i) * exp(-b_j), so long chunks and strong gates cannot overflow.
"""

import torch
import torch.nn.functional as F

from .simple_gla import _compute_dtype, _run_sequences, segmented_recurrence


def _recurrent_steps(q, k, v, g, h, scale):
    """`[H, L, D]` inputs, per-key log gates `g` `[H, L, K]`, state `h` `[H, K, V]`."""
    outputs = []
    for t in range(q.shape[1]):
        h = h * g[:, t].exp()[:, :, None] + k[:, t, :, None] * v[:, t, None, :]
        outputs.append(scale * torch.einsum("hk,hkv->hv", q[:, t], h))
    return torch.stack(outputs, 1), h


def _recurrent_sequence(q, k, v, g, h, scale):
    return segmented_recurrence(_recurrent_steps, (q, k, v, g), v, h, scale)


def _chunk_sequence(q, k, v, g, h, scale, chunk_size: int = 64):
    """one sequence in chunks: per chunk, pairwise per-channel decays inside it and the carried state across."""
    H, L, K = q.shape
    if L == 0:
        return q.new_zeros(H, 0, v.shape[-1]), h
    pad = (-L) % chunk_size
    # padded tokens have zero keys and a zero log gate: they change neither the outputs nor the state
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for s in range(0, L + pad, chunk_size):
        qc, kc, vc = q[:, s:s + chunk_size], k[:, s:s + chunk_size], v[:, s:s + chunk_size]
        b = g[:, s:s + chunk_size].cumsum(1)  # [H, C, K]
        # mask before exp so the upper triangle never overflows; [H, C, C, K]
        gap = torch.where(causal[None, :, :, None], b[:, :, None, :] - b[:, None, :, :], float("-inf"))
        attn = torch.einsum("hik,hjk,hijk->hij", qc, kc, gap.exp())
        outputs.append(scale * (attn @ vc + (qc * b.exp()) @ h))
        h = b[:, -1].exp()[:, :, None] * h + (kc * (b[:, -1:] - b).exp()).transpose(-1, -2) @ vc
    return torch.cat(outputs, 1)[:, :L], h


def _run(seq_fn, q, k, v, g, scale, initial_state, output_final_state, reverse, state_v_first, cu_seqlens):
    dtype = _compute_dtype(q, k, v, g, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _run_sequences(seq_fn, q, k, v, g.to(dtype), scale=float(scale), initial_state=initial_state,
                          output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                          cu_seqlens=cu_seqlens, dtype=dtype)


def recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    GLA by the token-by-token recurrence in fp32 (fp64 when any input is fp64): the ground truth.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        g (torch.Tensor): per-key log gates `[B, T, H, K]`.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`).
        output_final_state (bool), reverse (bool), state_v_first (bool): as in simple GLA.
        cu_seqlens (Optional[torch.Tensor]): `[N + 1]` with `B == 1`.

    Returns:
        o `[B, T, H, V]` and the final state (or None) in the compute dtype.

    Examples::
        >>> q, k, v = torch.randn(2, 50, 4, 16), torch.randn(2, 50, 4, 16), torch.randn(2, 50, 4, 8)
        >>> g = torch.randn(2, 50, 4, 16).sigmoid().log()
        >>> o, ht = recurrent_gla(q, k, v, g, output_final_state=True)
        >>> q, k, v, g = (x.flatten(0, 1)[None] for x in (q, k, v, g))
        >>> o, ht = recurrent_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 30, 100]), output_final_state=True)
    """
    return _run(_recurrent_sequence, q, k, v, g, scale, initial_state, output_final_state, reverse, state_v_first,
                cu_seqlens)


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA in chunks (the `torch` backend); same arguments and returns as :func:`recurrent_gla`."""

    def seq_fn(qs, ks, vs, gs, h0, scale):
        return _chunk_sequence(qs, ks, vs, gs, h0, scale, chunk_size=chunk_size)

    return _run(seq_fn, q, k, v, g, scale, initial_state, output_final_state, reverse, state_v_first, cu_seqlens)
