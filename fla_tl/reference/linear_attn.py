"""Linear attention: simple GLA without decay, optionally normalised by the running key sum (fla's `normalize`).

`o_t = (scale * q_t^T h_t) / (scale * q_t . z_t + 1e-10)` with `z_t = z_0 + sum_{s <= t} k_s` (`s >= t` in reverse),
`h_t` the undecayed state. The normalisation is a pure-PyTorch stage shared by the reference and the ops (both
backends): it is elementwise plus one cumulative sum over time, computed in fp32.
"""

import torch

from .simple_gla import recurrent_simple_gla

EPS = 1e-10


def _segments(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index of every token `[T]`, start of every sequence `[N]`) of a packed batch."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens, output_size=T)
    return seg, cu_seqlens[:-1].to(torch.long)


def normalize_with_key_sum(
    o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    z_init: torch.Tensor | None = None,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o divided by `scale * q . z + 1e-10` in o's dtype, the final key sum `[N, 1, H, K]` in fp32 (fp64 for fp64
    inputs)); differentiable by autograd. `z_init` `[N, 1, H, K]` is the key sum carried in (None: zeros)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, K = k.shape
    kf = k.to(dtype)
    if reverse:
        kf = kf.flip(1)
    kc = kf.cumsum(1)
    if cu_seqlens is None:
        if z_init is not None:
            kc = kc + z_init.to(dtype)
        z_final = kc[:, -1:] if T > 0 else (z_init.to(dtype) if z_init is not None else kf.new_zeros(B, 1, H, K))
    else:
        N = cu_seqlens.numel() - 1
        # in reverse the packed sequence is flipped: sequence n occupies [T - eos, T - bos)
        cu = (T - cu_seqlens.flip(0)) if reverse else cu_seqlens
        seg, starts = _segments(cu, T)
        before = torch.cat([kc.new_zeros(1, 1, H, K), kc[:, :-1]], 1)  # cumsum before each token
        kc = kc - before[:, starts][:, seg]
        if z_init is not None:
            z = z_init.to(dtype)[:, 0]  # [N, H, K]
            z = z.flip(0) if reverse else z
            kc = kc + z[seg][None]
        ends = (cu[1:] - 1).clamp(min=0).to(torch.long)
        last = kc[0, ends] if T > 0 else kc.new_zeros(N, H, K)
        empty = (cu[1:] == cu[:-1])[:, None, None]
        carried = z_init.to(dtype)[:, 0].flip(0) if (z_init is not None and reverse) else (
            z_init.to(dtype)[:, 0] if z_init is not None else kc.new_zeros(N, H, K))
        z_final = torch.where(empty, carried, last)
        z_final = (z_final.flip(0) if reverse else z_final)[:, None]
    if reverse:
        kc = kc.flip(1)
    denom = (q.to(dtype) * scale * kc).sum(-1, keepdim=True) + EPS
    return (o.to(dtype) / denom).to(o.dtype), z_final


def split_state(initial_state, normalize: bool):
    """(h0, z0) from fla's linear-attention `initial_state`: a tuple `(h0, z0)` only with `normalize`."""
    if normalize and isinstance(initial_state, tuple):
        return initial_state
    if isinstance(initial_state, tuple):
        raise TypeError("`initial_state` must be a tensor [N, H, K, V] when `normalize=False`, got a tuple")
    return initial_state, None


def recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | tuple | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """linear attention by the token-by-token recurrence (the ground truth), fla's returns: `(o, final_state)`, and
    with `normalize` `(o, (final_state, z_state))`; `initial_state` is then `(h0, z0)` (or just `h0`)."""
    h0, z0 = split_state(initial_state, normalize)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, ht = recurrent_simple_gla(q, k, v, scale=scale, initial_state=h0, output_final_state=output_final_state,
                                 reverse=reverse, cu_seqlens=cu_seqlens)
    if not normalize:
        return o, ht
    o, z = normalize_with_key_sum(o, q, k, scale, z0, reverse, cu_seqlens)
    return o, (ht, z)
