"""Pure-PyTorch HGRN: the elementwise gated recurrence `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t`.

`x`, `g` `[B, T, D]`; `initial_state` `[N, D]`. The recurrence (ground truth) steps token by token; the chunked form
(the `torch` backend) forms pairwise decays exp(b_t - b_s), s <= t, inside 64-token chunks (never exp(-b_s), so it
cannot overflow) and carries the state across chunks. Both compute in fp32 (fp64 for fp64 inputs) and return o in x's
dtype and the final state in the compute dtype.
"""

import torch
import torch.nn.functional as F

from .simple_gla import _sequences


def _run(step_fn, x, g, initial_state, output_final_state, cu_seqlens):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, T, D = x.shape
    outs, states = [], []
    for n, (b, bos, eos) in enumerate(_sequences(B, T, cu_seqlens)):
        h = initial_state[n].to(dtype) if initial_state is not None else x.new_zeros(D, dtype=dtype)
        o, h = step_fn(x[b, bos:eos].to(dtype), g[b, bos:eos].to(dtype), h)
        outs.append(o)
        states.append(h)
    o = torch.stack(outs) if cu_seqlens is None else torch.cat(outs)[None]
    return o.to(x.dtype), (torch.stack(states) if output_final_state else None)


def _recurrent(x, g, h):
    outs = []
    for t in range(x.shape[0]):
        h = g[t].exp() * h + x[t]
        outs.append(h)
    return (torch.stack(outs) if outs else x.new_zeros(0, x.shape[-1])), h


def _chunked(x, g, h, chunk_size: int = 64):
    L, D = x.shape
    pad = (-L) % chunk_size
    x, g = F.pad(x, (0, 0, 0, pad)), F.pad(g, (0, 0, 0, pad))
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    outs = []
    for s in range(0, L + pad, chunk_size):
        b = g[s:s + chunk_size].cumsum(0)  # [C, D]
        gap = torch.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf"))  # [C, C, D]
        o = (gap.exp() * x[s:s + chunk_size][None]).sum(1) + b.exp() * h
        outs.append(o)
        h = o[-1]
    # padded steps have zero input and zero log gate: the state after them is the state at the last real step
    o = torch.cat(outs)[:L] if outs else x.new_zeros(0, D)
    return o, (o[-1] if L > 0 else h)


def recurrent_hgrn(x, g, initial_state=None, output_final_state: bool = False, cu_seqlens=None):
    """HGRN token by token (the ground truth): `(o [B, T, D], final_state [N, D] or None)`."""
    return _run(_recurrent, x, g, initial_state, output_final_state, cu_seqlens)


def chunk_hgrn_torch(x, g, initial_state=None, output_final_state: bool = False, cu_seqlens=None):
    """HGRN in 64-token chunks (the `torch` backend); same returns as :func:`recurrent_hgrn`."""
    return _run(_chunked, x, g, initial_state, output_final_state, cu_seqlens)
