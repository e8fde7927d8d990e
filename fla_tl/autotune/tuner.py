"""The tuner: time every fitting config of a kernel on this GPU, keep the fastest that agrees with the default.

Method (METHOD.md of the device notes): random inputs (never zeros), every candidate compiled first in parallel
processes into TileLang's disk cache (`fla_tl.autotune.build.build`; the tuning process then only loads them), 3
warm-up calls, then `reps` calls timed with CUDA events, each after an L2 flush with a buffer larger than any L2; the
median counts. A candidate whose outputs differ from the default config's beyond the dtype's tolerance
(`fla_tl.testing.TOLERANCES`) is rejected; one that fails to compile or launch is recorded with its error. Every
candidate's time is kept in the table entry, not only the winner's.

This module sits above the kernels (it launches them); importing it installs `tune_miss` as `resolve`'s miss handler
for `FLA_TL_AUTOTUNE=tune`.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from ..testing import compare
from . import resolve
from .configs import BT, KERNELS, TORCH_TO_TL, key_dims

FLUSH_BYTES = 256 * 1024 * 1024


def op_kernels(op: str, D: int, dtype: str = "bfloat16") -> list[tuple[str, int, int, str]] | None:
    """the tunable kernels (`configs.KERNELS`) registered op `op` launches at head dim D and input dtype `dtype` (a
    TileLang name), as (name, K, V, gate option) in the order of its kernel list; None for an op without one."""
    from ..registry import get_op

    spec = get_op(op)
    if spec.kernels is None:
        return None
    found = ((k.name, *key_dims(k.name, k.kwargs), k.kwargs.get("gate", KERNELS[k.name].gate))
             for k in spec.kernels(D, dtype) if k.name in KERNELS)
    return list(dict.fromkeys(found))


def make_runner(
    name: str, *, N: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, device, gate: str = "gamma"
) -> Callable:
    """a function `config dict -> output tensors` that launches kernel `name` on fixed random inputs with gate option
    `gate` ("gamma", "none", "g" or "gk"; the delta-rule passes: "none" or "g"); a channel scan over H x K
    channels."""
    from ..kernels.common import chunk_h, chunk_o, fused_chunk, fused_recurrent
    from ..kernels.common.gates import retention_g_gamma
    from ..kernels.common.utils import seq_meta

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(N * T, H, K, device=device, generator=g).to(dtype)
    k = (torch.randn(N * T, H, K, device=device, generator=g) / K ** 0.5).to(dtype)
    v = torch.randn(N * T, H, V, device=device, generator=g).to(dtype)
    do = torch.randn(N * T, H, V, device=device, generator=g).to(dtype)
    meta = seq_meta(N, T, None, BT, device)
    if name in DELTA_PASSES:
        return _delta_runner(name, q, k, v, do, meta, gate, g)
    if "based_" in name:
        return _based_runner(name, q, k, v, do, N, T, g)
    if name.startswith("rwkv6_"):
        return _rwkv6_runner(name, q, k, v, do, meta, g)
    if name.startswith("linear_attn_"):
        return _normalize_runner(name, q, k, v, do, meta, g)
    if name.startswith("titans_"):
        return _titans_runner(name, q, k, v, do, N, T, g)
    if name.startswith("fused_recurrent_delta_"):
        return _delta_recurrent_runner(name, q, k, v, do, meta, gate, g)
    if name in GATE_SCANS:
        return _gate_scan_runner(name, q, k, v, do, meta, g)
    if name == "combine_states":
        return _combine_runner(N, T, H, K, V, device, g)
    if not KERNELS[name].head_dims:
        return _channel_scan_runner(name, N, T, H * max(K, V), dtype, device, g)
    decay = retention_g_gamma(H, device)
    if gate in ("g", "gk"):
        # a per-token (g) or per-key (gk) log gate as fla draws it: the chunk kernels read its chunk-local cumulative
        # sum, fused_recurrent the gate itself
        from ..kernels.common.cumsum import chunk_gate_cumsum

        shape = (N * T, H) if gate == "g" else (N * T, H, K)
        lg = torch.nn.functional.logsigmoid(torch.randn(shape, device=device, generator=g))
        if name.startswith("fused_recurrent"):
            extra = {"g": lg}
        elif gate == "g":
            extra = {"gc": chunk_gate_cumsum(lg, decay, meta)}
        else:
            extra = {"gc": chunk_gate_cumsum(lg.view(-1, H * K), decay.repeat_interleave(K), meta).view(-1, H, K)}
        gate = dict(gate=gate, g_gamma=decay, **extra)
    else:
        gate = dict(gate=gate, g_gamma=decay)
    scale = K ** -0.5
    if name in ("chunk_fwd_o", "chunk_bwd_dv", "chunk_bwd_dqk") or name.startswith("chunk_gla_"):
        h, _ = chunk_h.chunk_fwd_h(k, v, initial_state=None, output_final_state=False, meta=meta, **gate)
        dh, _ = chunk_h.chunk_bwd_dh(q, do, None, scale=scale, need_dh0=False, meta=meta, **gate)
    if name.startswith("chunk_gla_"):
        from ..kernels.gla import chunk as gla

        _, A = gla.chunk_gla_fwd_o(q, k, v, h, gate["gc"], scale=scale, meta=meta, store_A=True)
        gla_runners = {
            "chunk_gla_fwd_o": lambda c: gla.chunk_gla_fwd_o(q, k, v, h, gate["gc"], scale=scale, meta=meta,
                                                             store_A=True, **c),
            "chunk_gla_bwd_dv": lambda c: gla.chunk_gla_bwd_dqkv(q, k, v, do, h, dh, gate["gc"], A, scale=scale,
                                                                 meta=meta, dv_config=c)[2:3],
            "chunk_gla_bwd_dqk": lambda c: gla.chunk_gla_bwd_dqkv(q, k, v, do, h, dh, gate["gc"], A, scale=scale,
                                                                  meta=meta, dqk_config=c)[:2],
        }
        return gla_runners[name]
    runners = {
        "fused_chunk_fwd": lambda c: fused_chunk.fused_chunk_fwd(
            q, k, v, scale=scale, initial_state=None, output_final_state=True, meta=meta, **gate, **c
        ),
        "fused_chunk_bwd_dkv": lambda c: fused_chunk.fused_chunk_bwd(
            q, k, v, do, None, scale=scale, initial_state=None, meta=meta, **gate, **c
        )[1:3],
        "chunk_fwd_h": lambda c: chunk_h.chunk_fwd_h(
            k, v, initial_state=None, output_final_state=True, meta=meta, **gate, **c
        ),
        "chunk_fwd_o": lambda c: (chunk_o.chunk_fwd_o(q, k, v, h, scale=scale, meta=meta, **gate, **c),),
        "chunk_bwd_dh": lambda c: chunk_h.chunk_bwd_dh(
            q, do, None, scale=scale, need_dh0=False, meta=meta, **gate, **c
        ),
        "chunk_bwd_dv": lambda c: chunk_o.chunk_bwd_dqkv(
            q, k, v, do, h, dh, scale=scale, meta=meta, dv_config=c, **gate
        )[2:],
        "chunk_bwd_dqk": lambda c: chunk_o.chunk_bwd_dqkv(
            q, k, v, do, h, dh, scale=scale, meta=meta, dqk_config=c, **gate
        )[:2],
        "fused_recurrent_fwd": lambda c: fused_recurrent.fused_recurrent_fwd(
            q, k, v, scale=scale, initial_state=None, output_final_state=True, reverse=False, state_v_first=False,
            meta=meta, **gate, **c
        ),
        "fused_recurrent_bwd": lambda c: fused_recurrent.fused_recurrent_bwd(
            q, k, v, do, None, scale=scale, initial_state=None, reverse=False, state_v_first=False, meta=meta,
            **gate, **c
        )[:3],
    }
    return runners[name]


def _based_runner(name: str, q, k, v, do, N: int, T: int, g: torch.Generator) -> Callable:
    """the runner of a Based kernel (the fused chunk walks, the attention form): q, k, v, do as `[N, T, H, *]`, a fixed
    random normaliser gradient."""
    from ..kernels.based import fused_chunk as based

    H, K, V = q.shape[1], q.shape[2], v.shape[2]
    q, k = (x.view(N, T, H, K) for x in (q, k))
    v, do = (x.view(N, T, H, V) for x in (v, do))
    dz = torch.randn(N, T, H, device=q.device, generator=g)
    scale = K ** -0.5
    if name.startswith("parallel_based"):
        from ..kernels.based import parallel

        if name == "parallel_based_fwd":
            return lambda c: parallel.parallel_based_fwd(q, k, v, scale=scale, based=True, config=c)
        if name == "parallel_based_bwd_dq":
            return lambda c: parallel.parallel_based_bwd(q, k, v, do, dz, scale=scale, based=True, dq_config=c)[:1]
        return lambda c: parallel.parallel_based_bwd(q, k, v, do, dz, scale=scale, based=True, dkv_config=c)[1:]
    if name == "based_fwd_fused_chunk":
        return lambda c: based.based_fused_chunk_fwd(q, k, v, scale=scale, config=c)
    if name == "based_bwd_dq_fused_chunk":
        return lambda c: based.based_fused_chunk_bwd(q, k, v, do, dz, scale=scale, dq_config=c)[:1]
    return lambda c: based.based_fused_chunk_bwd(q, k, v, do, dz, scale=scale, dkv_config=c)[1:]


def _rwkv6_runner(name: str, q, k, v, do, meta, g: torch.Generator) -> Callable:
    """the runner of an RWKV6 bonus kernel: a fixed random bonus `u` (and dq for the backward, which adds into dk, dv
    in place: it gets fresh copies each call)."""
    from ..kernels.rwkv6 import bonus

    H, K = k.shape[1:]
    u = torch.randn(H, K, device=k.device, generator=g)
    kw = dict(scale=K ** -0.5, reverse=False, first=None, meta=meta)
    if name == "rwkv6_fwd_bonus":
        return lambda c: (bonus.bonus_fwd(do, q, k, v, u, **kw, **c),)
    dq = torch.randn(q.shape, device=q.device, generator=g).to(q.dtype)
    return lambda c: bonus.bonus_bwd(q, k, v, do, dq, k.clone(), v.clone(), u, **kw, **c)


def _combine_runner(N: int, T: int, H: int, K: int, V: int, device, g: torch.Generator) -> Callable:
    """the runner of the chunk ranges' state combine: N sequences of T tokens in ranges of 16 chunks, random decays
    in (0, 1) (a per-key diagonal transition) and random range states."""
    from ..kernels.common import ranges as rg
    from ..kernels.common.utils import seq_meta

    meta = seq_meta(N, T, None, BT, device)
    spans = rg.range_meta(meta, 16, BT, dense=(N, T))
    R = spans.meta.N
    decays = torch.rand(R, H, K, device=device, generator=g)
    loc = torch.randn(R, H, K, V, device=device, generator=g)
    return lambda c: (rg.combine_states(decays, None, spans, loc=loc, **c),)


# the gate scans and reductions of `common.cumsum`
GATE_SCANS = ("gate_cumsum", "gate_grad_scan", "gate_grad_chunk_scan", "gate_dot", "chunk_state_dot")


def _gate_scan_runner(name: str, q, k, v, do, meta, g: torch.Generator) -> Callable:
    """the runner of a gate scan or reduction: the scans over per-key columns (heads x keys, the widest the ops run)
    of fp32 log gates as fla draws them or of random gradient rows; the row dot products on q, k and random
    gradients; the chunk state products on the states of a forward pass and random state gradients."""
    from ..kernels.common import chunk_h, cumsum

    Ttot, H, K = k.shape
    dev = k.device
    if name == "gate_dot":
        dq, dk = (torch.randn(x.shape, device=dev, generator=g).to(x.dtype) for x in (q, k))
        return lambda c: cumsum.gate_rows(q, k, dq, dk, meta=meta, BT=BT, **c)
    if name == "chunk_state_dot":
        h, ht = chunk_h.chunk_fwd_h(k, v, gate="none", g_gamma=torch.zeros(H, device=dev), initial_state=None,
                                    output_final_state=True, meta=meta)
        dh = torch.randn(h.shape, device=dev, generator=g).to(h.dtype)
        return lambda c: (cumsum.chunk_state_terms(h, dh, ht, k, meta=meta, per_key=True, BT=BT, **c),)
    x = torch.randn(Ttot, H * K, device=dev, generator=g)
    if name == "gate_cumsum":
        lg = torch.nn.functional.logsigmoid(x)
        zero = torch.zeros(H * K, device=dev)
        return lambda c: (cumsum.chunk_gate_cumsum(lg, zero, meta, BT, **c),)
    if name == "gate_grad_scan":
        return lambda c: (cumsum._sequence_scan(x, meta=meta, reverse=False, out_dtype=torch.float32, BT=BT, **c),)
    terms = torch.randn(meta.NT, H * K, device=dev, generator=g)
    return lambda c: (cumsum.chunk_gate_grad_scan(x, terms, meta=meta, dg_dtype=torch.float32, BT=BT, **c),)


def _channel_scan_runner(name: str, N: int, T: int, D: int, dtype: torch.dtype, device, g: torch.Generator) -> Callable:
    """the runner of a channel scan over N sequences of T tokens and D channels (the heads' channels together): HGRN's
    recurrence on inputs and log forget gates as fla draws them, or GSA's slot normaliser on slot logits (the
    backward on the forward's z, with gradients of the normalised slots and of the log gates)."""
    x = torch.randn(N, T, D, device=device, generator=g).to(dtype)
    do = torch.randn(N, T, D, device=device, generator=g).to(dtype)
    if name.startswith("hgrn_"):
        from ..kernels.hgrn import fused_recurrent as hgrn

        lg = torch.nn.functional.logsigmoid(torch.randn(N, T, D, device=device, generator=g)).to(dtype)
        kw = dict(initial_state=None, cu_seqlens=None)
        if name == "hgrn_fwd":
            return lambda c: hgrn.fused_recurrent_hgrn_fwd(x, lg, output_final_state=True, **kw, **c)
        o, _ = hgrn.fused_recurrent_hgrn_fwd(x, lg, output_final_state=False, **kw)
        return lambda c: hgrn.fused_recurrent_hgrn_bwd(x, lg, o, do, None, **kw, **c)[:2]
    from ..kernels.gsa import normaliser

    s = x.view(N, T, 1, D)
    if name == "slot_normaliser_fwd":
        return lambda c: normaliser.slot_normaliser_fwd(s, None, dtype, **c)
    _, _, z = normaliser.slot_normaliser_fwd(s, None, dtype)
    dg = torch.randn(z.shape, device=device, generator=g)
    return lambda c: (normaliser.slot_normaliser_bwd(s, z, do.view(N, T, 1, D), dg, None, **c),)


def _delta_inputs(k, gate: str, g: torch.Generator):
    """(keys L2-normalised as the delta rules take them, betas in (0, 1) `[Ttot, H]`, for gate "g" a per-token log
    gate as fla draws it (`[Ttot, H]`), for gate "gk" a per-key one (`[Ttot, H, K]`), else None) for keys `k`
    `[Ttot, H, K]`."""
    Ttot, H, K = k.shape
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
    beta = torch.rand(Ttot, H, device=k.device, generator=g)
    lg = None
    if gate in ("g", "gk"):
        shape = (Ttot, H, K) if gate == "gk" else (Ttot, H)
        lg = torch.nn.functional.logsigmoid(torch.randn(shape, device=k.device, generator=g))
    return k, beta, lg


def _delta_recurrent_runner(name: str, q, k, v, do, meta, gate: str, g: torch.Generator) -> Callable:
    """the runner of the delta rule's token-by-token forward or backward: keys L2-normalised, betas in (0, 1), for
    gate "g" a per-token log gate as fla draws it, for "gk" a per-key one, for "gk_<act>" a raw per-key input that
    the kernels activate (KDA's); the backward on the forward's stored corrections."""
    from ..kernels.common import fused_recurrent_delta as recurrent

    Ttot, H, K = k.shape
    act = None
    if gate.startswith("gk_"):
        kind = gate[3:]
        A_log = torch.randn(H, device=k.device, generator=g) * 0.5
        dt_bias = torch.randn(H * K, device=k.device, generator=g) * 0.5
        act = recurrent.GateActivation(kind, A_log, dt_bias, -5.0 if kind == "sigmoid" else 0.0)
        gate = "gk"
    k, beta, lg = _delta_inputs(k, gate, g)
    kw = dict(scale=K ** -0.5, initial_state=None, state_v_first=False, meta=meta, act=act)
    if name == "fused_recurrent_delta_fwd":
        return lambda c: recurrent.fused_recurrent_delta_rule_fwd(q, k, v, beta, lg, output_final_state=True,
                                                                   store_w=False, **kw, **c)[:2]
    _, _, w = recurrent.fused_recurrent_delta_rule_fwd(q, k, v, beta, lg, output_final_state=False, store_w=True,
                                                       **kw)
    return lambda c: recurrent.fused_recurrent_delta_rule_bwd(q, k, beta, lg, w, do, None, **kw, **c)[:3]


def _titans_runner(name: str, q, k, v, do, N: int, T: int, g: torch.Generator) -> Callable:
    """the runner of a Titans chunk kernel at chunk length `configs.TITANS_BT`: q, k, v, do as `[N, T, H, D]`,
    per-head weights and per-token rates as the benchmarks draw them (a small learning rate, decay and momentum in
    (0, 1)), the backward on the forward's stored states."""
    from ..kernels.titans import chunk as titans
    from .configs import TITANS_BT

    H, D = q.shape[1], q.shape[2]
    q, k, v, do = (x.view(N, T, H, D) for x in (q, k, v, do))
    dev = q.device
    w = (1 + 0.1 * torch.randn(H, D, device=dev, generator=g)).to(q.dtype)
    b = (0.1 * torch.randn(H, D, device=dev, generator=g)).to(q.dtype)
    theta = (torch.rand(N, T, H, 1, device=dev, generator=g) * 0.05 / D ** 0.5).to(q.dtype)
    alpha = (torch.rand(N, T, H, 1, device=dev, generator=g) * 0.2).to(q.dtype)
    eta = (0.5 + 0.5 * torch.rand(N, T, H, 1, device=dev, generator=g)).to(q.dtype)
    args = (q, k, v, w, b, theta, alpha, eta)
    kw = dict(eps=1e-6, chunk_size=TITANS_BT)
    if name == "titans_fwd_chunk":
        return lambda c: titans.titans_fwd(*args, initial_state=None, output_final_state=True, **kw, **c)[:2]
    _, _, (hm, hs) = titans.titans_fwd(*args, initial_state=None, output_final_state=False, store_states=True, **kw)
    return lambda c: titans.titans_bwd(*args, do, None, hm, hs, **kw, **c)


def _normalize_runner(name: str, q, k, v, do, meta, g: torch.Generator) -> Callable:
    """the runner of a stage of linear attention's key-sum normalisation: positive q, k (the feature maps it is meant
    for), the outputs v to normalise, output gradients do."""
    from ..kernels.linear_attn import normalize as norm

    q, k = (torch.rand(x.shape, device=x.device, generator=g).to(x.dtype) for x in (q, k))
    scale = q.shape[-1] ** -0.5
    if name == "linear_attn_key_scan":
        return lambda c: norm._chunk_scan(k, None, None, meta, BT, reverse=False, **c)
    zc, _ = norm._chunk_scan(k, None, None, meta, BT, reverse=False)
    if name == "linear_attn_normalize_fwd":
        return lambda c: norm._normalize_fwd(q, k, v, zc, meta, scale, BT, **c)
    y, den = norm._normalize_fwd(q, k, v, zc, meta, scale, BT)
    if name == "linear_attn_normalize_bwd_c":
        return lambda c: norm._normalize_bwd_c(do, y, den, meta, scale, BT, **c)
    _, w = norm._normalize_bwd_c(do, y, den, meta, scale, BT)
    rc, _ = norm._chunk_scan(q, w, None, meta, BT, reverse=True)
    return lambda c: norm._normalize_bwd_dqk(q, k, w, zc, rc, meta, BT, **c)


# the delta rules' sequential passes (`common.chunk_delta_h`, `common.fused_chunk_delta`)
DELTA_PASSES = ("chunk_delta_fwd_h", "chunk_delta_bwd_dhu", "fused_chunk_delta_fwd", "wy_fwd", "wy_bwd",
                "chunk_delta_bwd_dqkw")


def _delta_runner(name: str, q, k, v, do, meta, gate: str, g: torch.Generator) -> Callable:
    """the runner of a delta-rule stage: keys L2-normalised as the delta rules take them, betas in (0, 1), for gate
    "g" a per-token log gate as fla draws it, and the WY form of every chunk (`wy.wy_repr`). The WY backward adds
    into dk in place, so its runner adds into a fresh copy each call (the copy is timed with every config)."""
    from ..kernels.common import chunk_delta_h, fused_chunk_delta, wy
    from ..kernels.common.cumsum import chunk_gate_cumsum
    from ..kernels.common.gates import head_decay

    H, K = k.shape[1:]
    k, beta, lg = _delta_inputs(k, gate, g)
    gc = chunk_gate_cumsum(lg, head_decay(None, H, k.device), meta, BT) if gate == "g" else None
    w, u, ai = wy.wy_repr(k, v, beta, meta=meta, gc=gc, pair=True, BT=BT)
    scale = K ** -0.5
    common = dict(gate=gate, gc=gc, meta=meta, BT=BT)
    runners = {
        "fused_chunk_delta_fwd": lambda c: fused_chunk_delta.fused_chunk_delta_fwd(
            q, k, w, u, scale=scale, initial_state=None, output_final_state=True, **common, **c
        ),
        "chunk_delta_fwd_h": lambda c: chunk_delta_h.chunk_delta_fwd_h(
            k, v, beta, ai, initial_state=None, output_final_state=True, **common, **c
        ),
        "chunk_delta_bwd_dhu": lambda c: chunk_delta_h.chunk_delta_bwd_dhu(
            q, k, beta, ai, do, None, scale=scale, need_dh0=False, **common, **c
        )[:2],
        "wy_fwd": lambda c: wy.wy_repr(k, v, beta, meta=meta, gc=gc, pair=True, BT=BT, **c),
    }
    if name in runners:
        return runners[name]
    # the backward stages on the forward's states and fixed random output gradients
    h, v_new, _ = chunk_delta_h.chunk_delta_fwd_h(k, v, beta, ai, initial_state=None, output_final_state=False,
                                                  **common)
    dh, dv_new, _ = chunk_delta_h.chunk_delta_bwd_dhu(q, k, beta, ai, do, None, scale=scale, need_dh0=False, **common)
    if name == "chunk_delta_bwd_dqkw":
        return lambda c: chunk_delta_h.chunk_delta_bwd_dqkw(q, k, v_new, do, dv_new, h, dh, scale=scale, **common,
                                                            config=c)[:3]
    dw = torch.randn(k.shape, device=k.device, generator=g).to(k.dtype)

    def wy_bwd(c):
        dk = dw.clone()
        return (dk, *wy.wy_bwd(k, v, beta, ai, dv_new, dw, dk, meta=meta, gc=gc, BT=BT, **c))

    return wy_bwd


def cuda_time_ms(fn: Callable[[], object], reps: int = 30, warmup: int = 3) -> list[float]:
    """times of `reps` calls of `fn` in ms, each after an L2 flush, measured with CUDA events."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _outputs(out) -> list[torch.Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [x for x in items if isinstance(x, torch.Tensor)]


def tune_kernel(
    name: str,
    runner: Callable[[dict], object],
    *,
    K: int,
    V: int,
    dtype: torch.dtype,
    gate: str = "gamma",
    timer: Callable = cuda_time_ms,
    compile_workers: int = 4,
    progress: bool = True,
) -> dict:
    """time every fitting config of kernel `name` with `runner`; return the table entry (the winner, its time, the
    default's time and every candidate with its time or the reason it was rejected)."""
    kernel = KERNELS[name]
    tl_dtype = resolve.key_dtype(name, dtype)
    # a kernel of a fixed dtype (the fp32 gate scans) compares its candidates at that dtype's tolerance
    dtype = {tl: torch_dtype for torch_dtype, tl in TORCH_TO_TL.items()}[tl_dtype]
    candidates = kernel.candidates(K, V, tl_dtype, gate)
    default = candidates[0]

    # compile ahead in parallel processes (into TileLang's disk cache); the first call of each config then loads it
    if compile_workers > 1 and torch.cuda.is_available():
        from ..kernels.common.state_op import stage_spec
        from ..kernels.common.utils import target_for
        from .build import build

        specs = [stage_spec(name, K, V, tl_dtype, gate, dataclasses.asdict(c), factory=f) for c in candidates
                 for f in (None, *kernel.companions)]
        build(specs, target_for(torch.device("cuda")), compile_workers)

    def warm(config):
        try:
            runner(dataclasses.asdict(config))
            return None
        except Exception as e:  # noqa: BLE001 - a config that fails is recorded, not fatal
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    errors = {config: warm(config) for config in candidates}
    if errors[default] is not None:
        raise RuntimeError(f"{name}: the default config {default} fails: {errors[default]}")
    reference = [x.detach().clone() for x in _outputs(runner(dataclasses.asdict(default)))]

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    iterator = candidates
    if progress and tqdm is not None:
        iterator = tqdm(candidates, desc=f"tune {name} K={K} V={V} {tl_dtype}", unit="cfg")
    rows = []
    start = time.perf_counter()
    for config in iterator:
        row = {"config": dataclasses.asdict(config), "time_ms": None}
        if errors[config] is not None:
            row["status"] = f"error: {errors[config]}"
            rows.append(row)
            continue
        out = _outputs(runner(row["config"]))
        bad = [detail for ok, detail in (compare(a, b, dtype) for a, b in zip(out, reference)) if not ok]
        if len(out) != len(reference) or bad:
            row["status"] = "rejected: differs from the default config: " + "; ".join(bad)
            rows.append(row)
            continue
        times = timer(lambda c=row["config"]: runner(c))
        row.update(time_ms=statistics.median(times), status="ok")
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["time_ms"])
    return {
        "kernel": name,
        "dims": {"K": K, "V": V},
        "dtype": tl_dtype,
        "gate": gate,
        "config": best["config"],
        "time_ms": best["time_ms"],
        "default_ms": rows[0]["time_ms"],
        "candidates": rows,
        "tuned_in_s": round(time.perf_counter() - start, 1),
    }


def tune_miss(name: str, ref, *, K: int, V: int, gate: str, N: int, T: int) -> dict:
    """`FLA_TL_AUTOTUNE=tune`'s answer to a table miss (installed in `resolve` when this module is imported): tune
    kernel `name` at the launch's shape (N sequences of T tokens, `ref` `[Ttot, H, *]`) and return the entry."""
    # a channel scan's launch (`[Ttot, 1, D]`) is timed at its own width
    width = dict(K=K, V=V) if KERNELS[name].head_dims else dict(K=ref.shape[-1], V=ref.shape[-1])
    runner = make_runner(name, N=N, T=T, H=ref.shape[1], **width, dtype=ref.dtype, device=ref.device, gate=gate)
    return tune_kernel(name, runner, K=K, V=V, dtype=ref.dtype, gate=gate)


resolve.set_miss_handler(tune_miss)
