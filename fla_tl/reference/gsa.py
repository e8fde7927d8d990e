"""Pure-PyTorch GSA (gated slot attention): the token-by-token recurrence (ground truth) and a chunked form (the
`torch` backend).

Two gated passes over M slots with a softmax between, the slot log gate `g` `[B, T, H, M]` shared by both:

    hk_t = hk_{t-1} diag(exp(g_t)) + k_t s_t^T          (`[K, M]`, gate on the value side)
    ok_t = scale * hk_t^T q_t,  p_t = softmax(ok_t)
    hv_t = diag(exp(g_t)) hv_{t-1} + s_t v_t^T          (`[M, V]`, gate on the key side: GLA)
    o_t  = hv_t^T p_t

Without `g` (ABC) the slots are normalised by their running log-sum-exp `z_t = logcumsumexp(s)_t`:
`s <- exp(s - z)` and `g_t = z_{t-1} - z_t` (`g = 0` at each sequence start), as fla does.
"""

import torch
import torch.nn.functional as F

from .gla import _chunk_sequence as _key_gated_chunks
from .gla import _recurrent_steps as _key_gated_steps
from .simple_gla import _compute_dtype, _sequences, segmented_recurrence


def slot_gates(s: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ABC's normalised slots and log gates from raw slot logits `s` `[B, T, H, M]`: `(exp(s - z), z_prev - z)`
    with `z` the running log-sum-exp over time of each sequence; differentiable, in s's dtype (fp32 at least)."""
    x = s if s.dtype == torch.float64 else s.float()
    parts_s, parts_g = [], []
    for b, bos, eos in _sequences(x.shape[0], x.shape[1], cu_seqlens):
        xs = x[b:b + 1, bos:eos]
        z = xs.logcumsumexp(1)
        parts_s.append((xs - z).exp())
        parts_g.append(torch.cat((z[:, :1], z[:, :-1]), 1) - z)
    cat = (lambda p: torch.cat(p, 0)) if cu_seqlens is None else (lambda p: torch.cat(p, 1))
    return cat(parts_s), cat(parts_g)


def _value_gated_steps(q, k, v, g, h, scale):
    """`[H, L, D]` inputs, per-value log gates `g` `[H, L, V]`, state `h` `[H, K, V]`."""
    outputs = []
    for t in range(q.shape[1]):
        h = h * g[:, t].exp()[:, None, :] + k[:, t, :, None] * v[:, t, None, :]
        outputs.append(scale * torch.einsum("hk,hkv->hv", q[:, t], h))
    return torch.stack(outputs, 1), h


def _value_gated_chunks(q, k, v, g, h, scale, chunk_size: int = 64):
    """one sequence of the value-gated pass in chunks (pairwise per-channel decays, never exp(b_i) * exp(-b_j))."""
    H, L = q.shape[:2]
    if L == 0:
        return q.new_zeros(H, 0, v.shape[-1]), h
    pad = (-L) % chunk_size
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for s in range(0, L + pad, chunk_size):
        qc, kc, vc = q[:, s:s + chunk_size], k[:, s:s + chunk_size], v[:, s:s + chunk_size]
        b = g[:, s:s + chunk_size].cumsum(1)  # [H, C, V]
        gap = torch.where(causal[None, :, :, None], b[:, :, None, :] - b[:, None, :, :], float("-inf"))
        attn = qc @ kc.transpose(-1, -2)  # [H, C, C]
        o_intra = torch.einsum("hij,hjv,hijv->hiv", attn, vc, gap.exp())
        outputs.append(scale * (o_intra + (qc @ h) * b.exp()))
        h = h * b[:, -1].exp()[:, None, :] + kc.transpose(-1, -2) @ (vc * (b[:, -1:] - b).exp())
    return torch.cat(outputs, 1)[:, :L], h


def _recurrent_value_pass(q, k, v, g, h, scale):
    return segmented_recurrence(_value_gated_steps, (q, k, v, g), v, h, scale)


def _recurrent_key_pass(q, k, v, g, h, scale):
    return segmented_recurrence(_key_gated_steps, (q, k, v, g), v, h, scale)


def _run_gsa(key_pass, value_pass, q, k, v, s, g, scale, initial_state, output_final_state, reverse, cu_seqlens):
    """split into sequences (in the dtype of the computation), run the two passes with the softmax between, and
    reassemble; GQA (more query heads than key heads) by repeating k, v, s, g and the states per group."""
    dtype = _compute_dtype(q, k, v, s, g, *(initial_state or ()))
    if g is None:
        s, g = slot_gates(s, cu_seqlens)
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    NG = HQ // H
    q, k, v, s, g = (x.to(dtype) for x in (q, k, v, s, g))
    hk0 = hv0 = None
    if initial_state is not None:
        hk0, hv0 = (x.to(dtype) for x in initial_state)
    if NG > 1:
        k, v, s, g = (x.repeat_interleave(NG, dim=2) for x in (k, v, s, g))
        if hk0 is not None:
            hk0, hv0 = (x.repeat_interleave(NG, dim=1) for x in (hk0, hv0))
    if scale is None:
        scale = K ** -0.5
    outputs, hks, hvs = [], [], []
    for n, (b, bos, eos) in enumerate(_sequences(B, T, cu_seqlens)):
        qs, ks, vs, ss, gs = (x[b, bos:eos].transpose(0, 1) for x in (q, k, v, s, g))
        if reverse:
            qs, ks, vs, ss, gs = (x.flip(1) for x in (qs, ks, vs, ss, gs))
        hk = q.new_zeros(HQ, K, M, dtype=dtype) if hk0 is None else hk0[n]
        hv = q.new_zeros(HQ, M, V, dtype=dtype) if hv0 is None else hv0[n]
        ok, hk = value_pass(qs, ks, ss, gs, hk, float(scale))
        o, hv = key_pass(ok.softmax(-1), ss, vs, gs, hv, 1.0)
        if reverse:
            o = o.flip(1)
        outputs.append(o.transpose(0, 1))
        hks.append(hk)
        hvs.append(hv)
    o = torch.stack(outputs, 0) if cu_seqlens is None else torch.cat(outputs, 0).unsqueeze(0)
    final_state = None
    if output_final_state:
        final_state = (torch.stack(hks, 0)[:, ::NG], torch.stack(hvs, 0)[:, ::NG])
    return o, final_state


def recurrent_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    r"""
    GSA by the token-by-token recurrence in fp32 (fp64 when any input is fp64): the ground truth.

    Args:
        q (torch.Tensor): `[B, T, HQ, K]`. k (torch.Tensor): `[B, T, H, K]` (HQ a multiple of H).
        v (torch.Tensor): `[B, T, H, V]`. s (torch.Tensor): slots `[B, T, H, M]`.
        g (Optional[torch.Tensor]): slot log gates `[B, T, H, M]`; `None` derives ABC's gates from `s`.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[Tuple[torch.Tensor, torch.Tensor]]): `[N, H, K, M]` and `[N, H, M, V]`.
        output_final_state (bool), reverse (bool): Default: `False`.
        cu_seqlens (Optional[torch.Tensor]): `[N + 1]` with `B == 1`.

    Returns:
        o `[B, T, HQ, V]` and the final states `([N, H, K, M], [N, H, M, V])` (or None) in the compute dtype.

    Examples::
        >>> q, k, v, s = (torch.randn(2, 50, 4, d) for d in (16, 16, 8, 6))
        >>> g = torch.randn(2, 50, 4, 6).sigmoid().log()
        >>> o, (hk, hv) = recurrent_gsa(q, k, v, s, g, output_final_state=True)
        >>> q, k, v, s, g = (x.flatten(0, 1)[None] for x in (q, k, v, s, g))
        >>> o, ht = recurrent_gsa(q, k, v, s, g, cu_seqlens=torch.tensor([0, 30, 100]), output_final_state=True)
    """
    return _run_gsa(_recurrent_key_pass, _recurrent_value_pass, q, k, v, s, g, scale, initial_state,
                    output_final_state, reverse, cu_seqlens)


def chunk_gsa_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """GSA in chunks (the `torch` backend); same arguments and returns as :func:`recurrent_gsa`."""

    def key_pass(qs, ks, vs, gs, h, scale):
        return _key_gated_chunks(qs, ks, vs, gs, h, scale, chunk_size=chunk_size)

    def value_pass(qs, ks, vs, gs, h, scale):
        return _value_gated_chunks(qs, ks, vs, gs, h, scale, chunk_size=chunk_size)

    return _run_gsa(key_pass, value_pass, q, k, v, s, g, scale, initial_state, output_final_state, reverse,
                    cu_seqlens)
