"""Decay parameters shared by the variants."""

import functools
import math

import tilelang.language as T
import torch


@functools.lru_cache(maxsize=32)
def retention_g_gamma(H: int, device: torch.device) -> torch.Tensor:
    """retention's per-head log decay, log(1 - 2^(-5-h)), fp32 `[H]`."""
    return torch.tensor([math.log(1 - 2.0 ** (-5.0 - h)) for h in range(H)], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _no_decay(H: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(H, dtype=torch.float32, device=device)


def head_decay(g_gamma: torch.Tensor | None, H: int, device: torch.device) -> torch.Tensor:
    """the per-head log decay `[H]` as the kernels read it (fp32, contiguous); None means no decay (log decay 0, so
    every gate factor is exp2(0) = 1 exactly and the constant-decay kernels compute plain linear attention)."""
    if g_gamma is None:
        return _no_decay(H, device)
    return g_gamma.to(torch.float32).contiguous()


# ---------------------------------------------------------------- gate hooks of the TileLang stages
#
# Gate options (log-space, accumulated in fp32, exponentiated with exp2):
#   "none"  : no decay;
#   "gamma" : a per-head constant log decay `g_gamma[H]`; inside a chunk, row i carries b_i = (i + 1) * gamma;
#   "g"     : a per-token log gate; the stages read `gc` `[Ttot, H]`, its chunk-local inclusive cumulative sum in
#             log2 units (`common.cumsum.chunk_gate_cumsum`, with g_gamma folded in), so row i carries b_i = gc[t0 + i].
#             Rows past the sequence end repeat the last valid value (a zero gate), so every factor
#             2^(b_i - b_j) with i >= j stays <= 1 there too and padded rows cannot overflow. The sequential
#             (warp-specialized) passes read a chunk-major copy `[H * NT, BT]` (`gate_chunks`) by one bulk copy
#             per chunk (`gate_load_chunk`).


def activated_gate(kind: str, x, a, lower_bound):
    """KDA's gate activation (fp32 TileLang expressions) of x = g + dt_bias with a = exp(A_log): "softplus":
    -a * softplus(x); "sigmoid": lower_bound * sigmoid(a x)."""
    if kind == "softplus":
        return -a * T.if_then_else(x > 20.0, x, T.log(1.0 + T.exp(x)))
    return lower_bound / (1.0 + T.exp(-a * x))


def gate_state(gate: str, g_gamma, i_h, BT: int):
    """per-block gate state: log2 of the head's constant decay, or the chunk's [BT] cumulative log2 gates (shared)."""
    from .utils import LOG2E

    if gate == "g":
        return T.alloc_shared([BT], "float32")
    return g_gamma[i_h] * LOG2E


@T.macro
def gate_load(gate, lg, gc, t0, nvalid, i_h, BT):
    """fill the chunk's cumulative log2 gates (gate "g"; a no-op otherwise)."""
    if gate == "g":
        for i in T.Parallel(BT):
            lg[i] = T.if_then_else(i < nvalid, gc[t0 + i, i_h], gc[t0 + nvalid - 1, i_h])


@T.macro
def gate_load_chunk(gate, lg, gcc, chunk, BT, nvalid=None):
    """fill the chunk's cumulative log2 gates from their chunk-major copy `gcc` `[H, NT, BT]` (`gate_chunks`) by one
    bulk copy (gate "g"; a no-op otherwise). A warp-specialized pipeline then keeps a producer of bulk copies only
    (one warpgroup, registers handed to the consumers); `gate_load`'s element loads made the producer as wide as the
    consumers and left every thread 128 registers (the fused forward spilled). With `nvalid`, element loads of the
    chunk's first `nvalid` rows (zero past them; the consumers mask those rows), for kernels whose other loads are
    element loads too: a bulk copy beside them raced in the delta rule's state passes on fp32 tiles, and an unmasked
    element load broke their code generation."""
    if gate == "g":
        if nvalid is None:
            T.copy(gcc[chunk, 0:BT], lg)
        else:
            for i in T.Parallel(BT):
                lg[i] = T.if_then_else(i < nvalid, gcc[chunk, i], 0)


def gate_row(gate: str, lg, i):
    """log2 of the cumulative decay from the chunk start through row i."""
    if gate == "gamma":
        return (i + 1) * lg
    if gate == "g":
        return lg[i]
    return 0.0


def gate_last(gate: str, lg, nvalid):
    """log2 of the decay over the whole (possibly partial) chunk."""
    if gate == "gamma":
        return nvalid * lg
    if gate == "g":
        return lg[nvalid - 1]
    return 0.0


def gate_chunks(gc: torch.Tensor | None, meta, H: int, BT: int, like: torch.Tensor) -> torch.Tensor:
    """the cumulative gates `gc` `[Ttot, H]` chunk-major, `[H * NT, BT]` fp32 (row h * NT + c: chunk c of head h,
    rows past its sequence's end repeating the last valid value, as `gate_load` reads them), for
    `gate_load_chunk`; a `[1, BT]` placeholder the kernels never read without a per-token gate."""
    if gc is None:
        return like.new_empty((1, BT), dtype=torch.float32)
    return gc.t()[:, meta.chunk_rows(BT)].reshape(H * meta.NT, BT)


def gate_or_dummy(gc: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """the cumulative gates `[Ttot, H]` fp32 for gate "g", else a `[1, H]` placeholder the kernels never read."""
    if gc is not None:
        return gc
    return like.new_empty((1, like.shape[1]), dtype=torch.float32)


def chunk_gate(g: torch.Tensor | None, g_gamma: torch.Tensor | None, H: int, meta, BT: int = 64):
    """the gate option of a chunk launch: ("gamma", decay `[H]`, None) without a per-token gate, else ("g", decay,
    the chunk-local cumulative log2 gates `[Ttot, H]` with the decay folded in)."""
    decay = head_decay(g_gamma, H, meta.cu.device)
    if g is None:
        return "gamma", decay, None
    from .cumsum import chunk_gate_cumsum

    return "g", decay, chunk_gate_cumsum(g.reshape(-1, H).contiguous(), decay, meta, BT)


def state_term(ht: torch.Tensor | None, dht: torch.Tensor | None, dims=(-2, -1)) -> torch.Tensor | None:
    """<ht, dht> per sequence and head `[N, H]` fp32 (the final state's share of a per-token gate's gradient); with
    `dims` the value axis alone, the sums per key `[N, H, K]` (a per-key gate's share)."""
    if dht is None:
        return None
    if ht is None:
        raise ValueError("a gate's gradient with a final-state gradient `dht` needs the forward's final state `ht`")
    if ht.shape != dht.shape:
        raise ValueError(f"`ht` {tuple(ht.shape)} and `dht` {tuple(dht.shape)} must have one shape (state layout)")
    return (ht.float() * dht.float()).sum(dims)
