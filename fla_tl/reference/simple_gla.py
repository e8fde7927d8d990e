"""Pure-PyTorch simple GLA: the token-by-token recurrence (ground truth) and the chunked matrix form (the CPU path).

Both compute `h_t = exp(g_t) h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`, where the log decay `g_t` is the
per-token gate `g[b, t, h]` plus the per-head constant `g_gamma[h]`. They compute in fp32 (fp64 when given fp64),
return `o` and the final state in that precision, and are differentiable by autograd.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _log_decay(
    q: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """the log decay of every token, `[B, T, H]`, from the per-token gate and the per-head constant."""
    B, T, H, _ = q.shape
    decay = q.new_zeros(B, T, H, dtype=dtype)
    if g is not None:
        decay = decay + g.to(dtype)
    if g_gamma is not None:
        decay = decay + g_gamma.to(dtype).view(1, 1, H)
    return decay


def _sequences(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence, in the order of the state index `N`."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bos, eos) for bos, eos in zip(bounds[:-1], bounds[1:])]


def _run_sequences(
    seq_fn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    reverse: bool,
    state_v_first: bool,
    cu_seqlens: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """split into sequences, orient time and state layout, run `seq_fn` on each, and reassemble."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    outputs, states = [], []
    for n, (b, bos, eos) in enumerate(_sequences(B, T, cu_seqlens)):
        # [H, L, D] per sequence
        qs, ks, vs = (x[b, bos:eos].to(dtype).transpose(0, 1) for x in (q, k, v))
        gs = decay[b, bos:eos].transpose(0, 1)
        if reverse:
            qs, ks, vs, gs = (x.flip(1) for x in (qs, ks, vs, gs))
        if initial_state is None:
            h0 = q.new_zeros(H, K, V, dtype=dtype)
        else:
            h0 = initial_state[n].to(dtype)
            if state_v_first:
                h0 = h0.transpose(-1, -2)
        o, ht = seq_fn(qs, ks, vs, gs, h0, scale)
        if reverse:
            o = o.flip(1)
        outputs.append((b, bos, eos, o.transpose(0, 1)))
        states.append(ht.transpose(-1, -2) if state_v_first else ht)
    if cu_seqlens is None:
        o = torch.stack([x[-1] for x in outputs], 0)
    elif outputs:
        o = torch.cat([x[-1] for x in outputs], 0).unsqueeze(0)
    else:
        o = q.new_zeros(1, 0, H, V, dtype=dtype)
    final_state = torch.stack(states, 0) if output_final_state else None
    return o, final_state


def _recurrent_steps(q, k, v, g, h, scale):
    """token-by-token recurrence over `[H, L, D]` inputs from state `h` `[H, K, V]`."""
    outputs = []
    for t in range(q.shape[1]):
        h = h * g[:, t].exp()[:, None, None] + k[:, t, :, None] * v[:, t, None, :]
        outputs.append(scale * torch.einsum("hk,hkv->hv", q[:, t], h))
    return torch.stack(outputs, 1), h


def checkpointing() -> bool:
    """whether the references checkpoint their blocks: under autograd, but not inside a torch.func transform (the
    torch backend's vector-Jacobian product under torch.compile), which does not support checkpoint's saved-tensor
    hooks."""
    return torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()


def segmented_recurrence(steps, xs: tuple, v, h, scale, segment: int = 64):
    """run `steps(*xs, h, scale) -> (o, h)` over one sequence (every x `[H, L, ...]`, time on dim 1; `v` gives the
    output width); under autograd, segments of `segment` steps are checkpointed so memory stays `O(L/segment)`
    states. Shared by the token-by-token references."""
    L = xs[0].shape[1]
    if L == 0:
        return v.new_zeros(v.shape[0], 0, v.shape[-1]), h
    if not checkpointing() or L <= segment:
        return steps(*xs, h, scale)
    outputs = []
    for s in range(0, L, segment):
        o, h = checkpoint(steps, *(x[:, s:s + segment] for x in xs), h, scale, use_reentrant=False)
        outputs.append(o)
    return torch.cat(outputs, 1), h


def _recurrent_sequence(q, k, v, g, h, scale):
    return segmented_recurrence(_recurrent_steps, (q, k, v, g), v, h, scale)


def _chunk_sequence(q, k, v, g, h, scale, chunk_size: int = 64):
    """the chunked matrix form of one sequence: intra-chunk attention plus a sequential inter-chunk state pass."""
    H, L, K = q.shape
    V = v.shape[-1]
    if L == 0:
        return q.new_zeros(H, 0, V), h
    pad = (-L) % chunk_size
    # padded tokens have zero keys and zero log decay: they change neither the outputs nor the state
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g = F.pad(g, (0, pad))
    NC = (L + pad) // chunk_size
    q, k, v = (x.view(H, NC, chunk_size, -1) for x in (q, k, v))
    # cumulative log decay inside each chunk, [H, NC, BT]
    b = g.view(H, NC, chunk_size).cumsum(-1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # mask before exp so the upper triangle never overflows
    gap = torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf"))
    # [H, NC, BT, BT]
    attn = (q @ k.transpose(-1, -2)) * gap.exp()
    o_intra = attn @ v
    # keys decayed to the chunk end, [H, NC, BT, K]
    k_end = k * (b[..., -1:] - b).exp()[..., None]
    q_start = q * b.exp()[..., None]
    chunk_decay = b[..., -1].exp()
    states = []
    for c in range(NC):
        states.append(h)
        h = h * chunk_decay[:, c, None, None] + k_end[:, c].transpose(-1, -2) @ v[:, c]
    # state entering each chunk, [H, NC, K, V]
    h_in = torch.stack(states, 1)
    o = scale * (o_intra + q_start @ h_in)
    return o.reshape(H, NC * chunk_size, V)[:, :L], h


def _prepare(q, k, v, g, g_gamma, scale, initial_state):
    dtype = _compute_dtype(q, k, v, g, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return dtype, float(scale), _log_decay(q, g, g_gamma, dtype)


def recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA by the token-by-token recurrence, in fp32 (fp64 when any input is fp64): the ground truth.

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, K]`.
        k (torch.Tensor): keys of shape `[B, T, H, K]`.
        v (torch.Tensor): values of shape `[B, T, H, V]`.
        g (Optional[torch.Tensor]): per-token log decay of shape `[B, T, H]`. Default: `None`.
        g_gamma (Optional[torch.Tensor]): per-head constant log decay of shape `[H]`. Default: `None`.
        scale (Optional[float]): output scale. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): of shape `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`).
            Default: `None`.
        output_final_state (bool): return the final state. Default: `False`.
        reverse (bool): run time backwards within each sequence. Default: `False`.
        state_v_first (bool): states are laid out `[N, H, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.Tensor]): cumulative sequence lengths of shape `[N + 1]`, with `B == 1`.
            Default: `None`.

    Returns:
        o (torch.Tensor): of shape `[B, T, H, V]` in the compute dtype.
        final_state (Optional[torch.Tensor]): of shape `[N, H, K, V]` in the compute dtype, or `None`.

    Examples::
        >>> q, k = torch.randn(2, 100, 4, 64), torch.randn(2, 100, 4, 64)
        >>> v = torch.randn(2, 100, 4, 32)
        >>> g_gamma = torch.full((4,), -0.05)
        >>> o, ht = recurrent_simple_gla(q, k, v, g_gamma=g_gamma, output_final_state=True)
        >>> cu_seqlens = torch.tensor([0, 30, 200])
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, ht = recurrent_simple_gla(q, k, v, g_gamma=g_gamma, output_final_state=True, cu_seqlens=cu_seqlens)
    """
    dtype, scale, decay = _prepare(q, k, v, g, g_gamma, scale, initial_state)
    return _run_sequences(
        _recurrent_sequence,
        q, k, v, decay,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        dtype=dtype,
    )


def chunk_simple_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA in the chunked matrix form (chunks of `chunk_size`): the `torch` backend.

    Same arguments, semantics and returns as :func:`recurrent_simple_gla`, plus `chunk_size` (default `64`).

    Examples::
        >>> q, k = torch.randn(1, 300, 4, 64), torch.randn(1, 300, 4, 64)
        >>> v = torch.randn(1, 300, 4, 32)
        >>> g = torch.randn(1, 300, 4).sigmoid().log()
        >>> o, _ = chunk_simple_gla_torch(q, k, v, g=g)
        >>> o, ht = chunk_simple_gla_torch(q, k, v, g=g, output_final_state=True, cu_seqlens=torch.tensor([0, 7, 300]))
    """
    dtype, scale, decay = _prepare(q, k, v, g, g_gamma, scale, initial_state)

    def seq_fn(qs, ks, vs, gs, h0, scale):
        return _chunk_sequence(qs, ks, vs, gs, h0, scale, chunk_size=chunk_size)

    return _run_sequences(
        seq_fn,
        q, k, v, decay,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        dtype=dtype,
    )


def parallel_simple_gla_torch(q, k, v, g=None, scale=None, output_attentions: bool = False, cu_seqlens=None,
                              query_block: int = 512):
    """Simple GLA in the attention form (fla's `parallel_simple_gla`): `a_ij = scale * (q_i . k_j) * exp(G_i - G_j)`
    for j <= i in the same sequence, `G` the cumulative log gate; returns `(o [B, T, H, V] in q's dtype, a [B, H, T, T]
    or None)`. Queries are processed in checkpointed blocks unless the attention is returned."""
    dtype = _compute_dtype(q, k, v, g)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    B, T, H, K = q.shape
    qf, kf, vf = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    seq = torch.zeros(T, dtype=torch.long, device=q.device)
    if cu_seqlens is not None:
        seq = torch.bucketize(torch.arange(T, device=q.device), cu_seqlens[1:].to(q.device), right=True)
    G = None
    if g is not None:
        gf = g.to(dtype)
        if cu_seqlens is not None:
            # cumulative sums restart at each sequence: subtract the running total before its first token
            total = gf.cumsum(1)
            before = torch.cat([total.new_zeros(B, 1, H), total[:, :-1]], 1)
            starts = cu_seqlens[:-1].to(torch.long).clamp(max=max(T - 1, 0))
            G = (total - before[:, starts][:, seq]).transpose(1, 2)
        else:
            G = gf.cumsum(1).transpose(1, 2)  # [B, H, T]

    def block(qb, start):
        Lq = qb.shape[-2]
        i = torch.arange(start, start + Lq, device=q.device)
        j = torch.arange(T, device=q.device)
        keep = (j[None, :] <= i[:, None]) & (seq[j][None, :] == seq[i][:, None])
        s = (qb @ kf.transpose(-1, -2)) * scale
        if G is not None:
            gap = torch.where(keep, G[..., start:start + Lq, None] - G[..., None, :], float("-inf"))
            s = s * gap.exp()
        a = s.masked_fill(~keep, 0)
        return a @ vf, a

    if output_attentions:
        o, a = block(qf, 0)
        return o.transpose(1, 2).to(q.dtype), a
    outs = []
    for start in range(0, T, query_block):
        qb = qf[..., start:start + query_block, :]
        if checkpointing():
            outs.append(checkpoint(lambda x, s=start: block(x, s)[0], qb, use_reentrant=False))
        else:
            outs.append(block(qb, start)[0])
    o = torch.cat(outs, -2) if outs else vf.new_zeros(B, H, 0, v.shape[-1])
    return o.transpose(1, 2).to(q.dtype).contiguous(), None
