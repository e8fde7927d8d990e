"""Time fla_tl against fla (Triton) and causal SDPA at fla's benchmark shapes.

Modes: `fwd` (forward only, inputs without grad) and `fwdbwd` (forward + `o.backward(do)`).
For each (op, shape) a correctness gate runs first: fla_tl against fla (or, when fla is missing or refuses,
against an fp32 PyTorch reference where the op has one). A row whose gate fails gets no speed-up.

Writes one CSV row per (op, provider, mode, shape) and a PNG; prints a compact table last.
See benchmarks/README.md for the columns and the formulas.

    python benchmarks/bench.py --ops chunk_retention --shapes 8x4096x16x128 --modes fwd,fwdbwd
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.metadata
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# `python benchmarks/bench.py` puts benchmarks/ on the path, not the repo: make fla_tl importable uninstalled
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from fla_tl.testing import compare, rel_rms  # noqa: E402  (the shared check harness)

# measured device-to-device copy ceiling (bytes read + bytes written) on the H100, GB/s
COPY_CEILING_GBPS = 3000.0
# a failed gate against fla: relative RMS of fla_tl against fla above this, or NaN. Both sides round (fla_tl and fla
# in the input dtype), so the bound is looser than the harness's table (fla_tl.testing.TOLERANCES), which applies
# when the gate compares against the fp32 reference instead
GATE_TOL = 5e-2
# the chunk length the FLOP model of the chunked ops assumes
FLOP_BT = 64
# backward costs about 2.5x the forward in FLOPs; fwdbwd = 3.5x fwd
BWD_FLOP_FACTOR = 2.5
# L2 flush buffer, larger than any L2 (50 MB on H100)
FLUSH_BYTES = 256 * 1024 * 1024

# fla's benchmark shape set, (B, T, H, D), plus the main comparison shape B=8, T=4096, H=16, D=128
SHAPES = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 1024, 8, 64),
    (8, 2048, 32, 256),
    (8, 4096, 16, 128),
]
# fused_recurrent is skipped above this B*T*H under --skip-slow
SLOW_BTH = 8 * 4096 * 16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fla_tl", "fla", "flash_qla", "sdpa")
MODES = ("fwd", "fwdbwd")
CSV_COLUMNS = [
    "date", "gpu", "torch", "triton", "tilelang", "fla_version", "fla_tl_version",
    "op", "provider", "mode", "B", "T", "H", "D", "dtype",
    "median_ms", "p20_ms", "p80_ms", "gbps", "pct_of_copy", "tflops", "peak_mem_mb",
    "ratio_to_fla", "gate_rel_rms", "gate", "fla_path", "status",
]  # fmt: skip


def shape_name(shape: tuple[int, int, int, int]) -> str:
    return "x".join(str(x) for x in shape)


# ---------------------------------------------------------------------------------------------------------------------
# inputs, FLOP models, references


def qkv_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # layout [B, T, H, D]; k l2-normalised like fla's benchmarks, so the un-gated states stay bounded
    q = torch.randn(B, T, H, D, dtype=dtype, device=device)
    k = F.normalize(torch.randn(B, T, H, D, dtype=torch.float32, device=device), p=2, dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, dtype=dtype, device=device)
    return {"q": q, "k": k, "v": v}


# fla's fused_chunk_based takes feature dims up to 16; its second-order Taylor map gives 1 + 16 + 16 * 17 / 2 dims
BASED_FEATURE, BASED_MAP = 16, 153


def based16_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # q, k of the feature dim 16 (scaled like fla's Based layer's feature projections), v of head dim D
    qk = {n: (torch.randn(B, T, H, BASED_FEATURE, dtype=torch.float32, device=device) / 4).to(dtype) for n in "qk"}
    return {**qk, "v": torch.randn(B, T, H, D, dtype=dtype, device=device)}


def positive_qkv_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # normalised linear attention divides by q . sum(k): with the positive feature maps it is used with (elu + 1)
    # the denominators stay away from zero; on raw randn they cross it and the output is ill-conditioned
    x = qkv_inputs(B, T, H, D, dtype, device)
    return {**x, "q": (F.elu(x["q"].float()) + 1).to(dtype), "k": (F.elu(x["k"].float()) + 1).to(dtype)}


def qkvg_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # simple GLA's per-token log gate, fp32 as fla's benchmarks draw it
    return {**qkv_inputs(B, T, H, D, dtype, device),
            "g": F.logsigmoid(torch.randn(B, T, H, dtype=torch.float32, device=device))}


def hgrn_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # HGRN runs on [B, T, H * D] channels; log forget gates in the input dtype, as fla's tests draw them
    return {"x": torch.randn(B, T, H * D, dtype=torch.float32, device=device).to(dtype),
            "g": F.logsigmoid(torch.randn(B, T, H * D, dtype=torch.float32, device=device)).to(dtype)}


def qkvgk_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # GLA's per-key log gate, fp32
    return {**qkv_inputs(B, T, H, D, dtype, device),
            "g": F.logsigmoid(torch.randn(B, T, H, D, dtype=torch.float32, device=device))}


def qkv_gk_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # fused_recurrent_gla names the key gate gk
    x = qkvgk_inputs(B, T, H, D, dtype, device)
    x["gk"] = x.pop("g")
    return x


def delta_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # DeltaNet: normalised keys, beta in (0, 1)
    x = qkv_inputs(B, T, H, D, dtype, device)
    x["beta"] = torch.rand(B, T, H, dtype=dtype, device=device)
    return x


def gated_delta_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    x = delta_inputs(B, T, H, D, dtype, device)
    x["g"] = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float32, device=device))
    return x


def rwkv6_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # RWKV6: receptance r, per-key log decays w (fp32, as GLA's gate), the bonus u [H, K]
    x = qkv_inputs(B, T, H, D, dtype, device)
    return {"r": x.pop("q"), **x, "w": F.logsigmoid(torch.randn(B, T, H, D, dtype=torch.float32, device=device)),
            "u": torch.randn(H, D, dtype=dtype, device=device)}


def decay_consts(B: int, T: int, H: int, D: int, device: str) -> dict:
    # retention-like per-head constant decays
    return {"g_gamma": torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float32, device=device)))}


def lightning_consts(B: int, T: int, H: int, D: int, device: str) -> dict:
    return {"layer_idx": 1, "num_layers": 8}


def chunk_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per token per head, chunk length BT: q k^T in the chunk (2*BT*K), A v (2*BT*V),
    # q h against the chunk-start state (2*K*V), the state update k^T v (2*K*V); causal halving ignored
    return B * T * H * 2.0 * (FLOP_BT * K + FLOP_BT * V + 2 * K * V)


def recurrent_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per token per head: rank-1 state update k^T v (2*K*V) and the readout q S (2*K*V)
    return B * T * H * 4.0 * K * V


def hgrn_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per channel per token: exp(g), the multiply and the add
    return B * T * H * K * 3.0


def sdpa_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # causal: q k^T and p v over half the T*T square, 2*B*T*T*H*D in all
    return 2.0 * B * T * T * H * K


def retention_reference(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fp32 chunked retention, fla's decay gamma_h = 1 - 2^(-5 - h); dense, no initial state. Gate fallback only."""
    if initial_state is not None or cu_seqlens is not None:
        raise NotImplementedError("reference gate covers the dense, stateless call only")
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = 64
    scale = K**-0.5 if scale is None else scale
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    pad = (-T) % BT
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    NT = (T + pad) // BT
    q, k, v = (x.reshape(B, H, NT, BT, -1) for x in (q, k, v))
    log_gamma = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, device=q.device, dtype=torch.float32)))
    i = torch.arange(BT, device=q.device, dtype=torch.float32)
    lg = log_gamma[:, None, None]
    # [H, BT, BT] decay gamma^(i - j) on and under the diagonal
    decay = torch.exp((i[:, None] - i[None, :]) * lg).masked_fill(i[:, None] < i[None, :], 0.0)
    q_decay = torch.exp((i + 1) * log_gamma[:, None])[:, :, None]  # [H, BT, 1]
    k_decay = torch.exp((BT - 1 - i) * log_gamma[:, None])[:, :, None]  # [H, BT, 1]
    chunk_decay = torch.exp(BT * log_gamma)[:, None, None]  # [H, 1, 1]
    state = q.new_zeros(B, H, K, V)
    outs = []
    for n in range(NT):
        qn, kn, vn = q[:, :, n], k[:, :, n], v[:, :, n]
        attn = (qn @ kn.transpose(-1, -2)) * decay
        outs.append((attn @ vn + (qn * q_decay) @ state) * scale)
        state = chunk_decay * state + (kn * k_decay).transpose(-1, -2) @ vn
    o = torch.stack(outs, dim=2).reshape(B, H, NT * BT, V)[:, :, :T].transpose(1, 2)
    # the padded tail decayed the state pad steps too far
    state = state * torch.exp(-pad * log_gamma)[:, None, None]
    return o, (state if output_final_state else None)


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op: where its fla_tl and fla functions live ("module:attr"), and its models.

    `inputs(B, T, H, D, dtype, device)` returns the keyword tensors; every one gets a gradient in fwdbwd.
    `consts(B, T, H, D, device)` returns keyword arguments without gradient (a constant decay, a layer index).
    The call is `fn(**inputs, **consts)` and its first return value is the output `o`.
    """

    fla_tl: str
    fla: str | None
    flops: Callable[[int, int, int, int, int], float]
    inputs: Callable[..., dict[str, torch.Tensor]] = qkv_inputs
    reference: Callable | None = None
    slow: bool = False
    consts: Callable[..., dict] | None = None
    # FlashQLA's counterpart ("module:attr"; Gated DeltaNet only), timed as its own provider
    flash_qla: str | None = None


# adding an op is one entry here
OPS: dict[str, OpSpec] = {
    "chunk_retention": OpSpec(
        fla_tl="fla_tl.ops:chunk_retention",
        fla="fla.ops.retention:chunk_retention",
        flops=chunk_flops,
        reference=retention_reference,
    ),
    "fused_chunk_retention": OpSpec(
        fla_tl="fla_tl.ops:fused_chunk_retention",
        fla="fla.ops.retention:fused_chunk_retention",
        flops=chunk_flops,
        reference=retention_reference,
    ),
    "fused_recurrent_retention": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_retention",
        fla="fla.ops.retention:fused_recurrent_retention",
        flops=recurrent_flops,
        reference=retention_reference,
        slow=True,
    ),
    "chunk_simple_gla": OpSpec(
        fla_tl="fla_tl.ops:chunk_simple_gla",
        fla="fla.ops.simple_gla:chunk_simple_gla",
        flops=chunk_flops,
        consts=decay_consts,
    ),
    # the per-token gate g (fp32) instead of a constant decay
    "chunk_simple_gla_g": OpSpec(
        fla_tl="fla_tl.ops:chunk_simple_gla",
        fla="fla.ops.simple_gla:chunk_simple_gla",
        flops=chunk_flops,
        inputs=qkvg_inputs,
    ),
    "fused_chunk_simple_gla": OpSpec(
        fla_tl="fla_tl.ops:fused_chunk_simple_gla",
        fla="fla.ops.simple_gla:fused_chunk_simple_gla",
        flops=chunk_flops,
        consts=decay_consts,
    ),
    "fused_recurrent_simple_gla": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_simple_gla",
        fla="fla.ops.simple_gla:fused_recurrent_simple_gla",
        flops=recurrent_flops,
        consts=decay_consts,
        slow=True,
    ),
    "chunk_linear_attn": OpSpec(
        fla_tl="fla_tl.ops:chunk_linear_attn",
        fla="fla.ops.linear_attn:chunk_linear_attn",
        flops=chunk_flops,
        inputs=positive_qkv_inputs,
    ),
    "fused_chunk_linear_attn": OpSpec(
        fla_tl="fla_tl.ops:fused_chunk_linear_attn",
        fla="fla.ops.linear_attn:fused_chunk_linear_attn",
        flops=chunk_flops,
        inputs=positive_qkv_inputs,
    ),
    "fused_recurrent_linear_attn": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_linear_attn",
        fla="fla.ops.linear_attn:fused_recurrent_linear_attn",
        flops=recurrent_flops,
        slow=True,
    ),
    # no TileLang kernel yet: fla_tl runs its torch backend
    "chunk_gla": OpSpec(
        fla_tl="fla_tl.ops:chunk_gla",
        fla="fla.ops.gla:chunk_gla",
        flops=chunk_flops,
        inputs=qkvgk_inputs,
    ),
    "fused_recurrent_gla": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_gla",
        fla="fla.ops.gla:fused_recurrent_gla",
        flops=recurrent_flops,
        inputs=qkv_gk_inputs,
        slow=True,
    ),
    "chunk_delta_rule": OpSpec(
        fla_tl="fla_tl.ops:chunk_delta_rule",
        fla="fla.ops.delta_rule:chunk_delta_rule",
        flops=chunk_flops,
        inputs=delta_inputs,
    ),
    "chunk_gated_delta_rule": OpSpec(
        fla_tl="fla_tl.ops:chunk_gated_delta_rule",
        fla="fla.ops.gated_delta_rule:chunk_gated_delta_rule",
        flops=chunk_flops,
        inputs=gated_delta_inputs,
        flash_qla="flash_qla:chunk_gated_delta_rule",
    ),
    "fused_recurrent_delta_rule": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_delta_rule",
        fla="fla.ops.delta_rule:fused_recurrent_delta_rule",
        flops=recurrent_flops,
        inputs=delta_inputs,
        slow=True,
    ),
    # fla 0.6.0's has no backward (its fwdbwd row is an error row)
    "fused_recurrent_gated_delta_rule": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_gated_delta_rule",
        fla="fla.ops.gated_delta_rule:fused_recurrent_gated_delta_rule",
        flops=recurrent_flops,
        inputs=gated_delta_inputs,
        slow=True,
    ),
    "chunk_hgrn": OpSpec(
        fla_tl="fla_tl.ops:chunk_hgrn",
        fla="fla.ops.hgrn:chunk_hgrn",
        flops=hgrn_flops,
        inputs=hgrn_inputs,
    ),
    "fused_recurrent_hgrn": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_hgrn",
        fla="fla.ops.hgrn:fused_recurrent_hgrn",
        flops=hgrn_flops,
        inputs=hgrn_inputs,
    ),
    "chunk_lightning_attn": OpSpec(
        fla_tl="fla_tl.ops:chunk_lightning_attn",
        fla="fla.ops.lightning_attn:chunk_lightning_attn",
        flops=chunk_flops,
        consts=lightning_consts,
    ),
    "fused_recurrent_lightning_attn": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_lightning_attn",
        fla="fla.ops.lightning_attn:fused_recurrent_lightning_attn",
        flops=recurrent_flops,
        consts=lightning_consts,
        slow=True,
    ),
    "chunk_rwkv6": OpSpec(
        fla_tl="fla_tl.ops:chunk_rwkv6",
        fla="fla.ops.rwkv6:chunk_rwkv6",
        flops=chunk_flops,
        inputs=rwkv6_inputs,
    ),
    "fused_recurrent_rwkv6": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_rwkv6",
        fla="fla.ops.rwkv6:fused_recurrent_rwkv6",
        flops=recurrent_flops,
        inputs=rwkv6_inputs,
        slow=True,
    ),
    # Based on fla's fused chunk kernel: q, k of its feature dim 16 (expanded to 1 + 16 + 136 = 153 by the map)
    "fused_chunk_based": OpSpec(
        fla_tl="fla_tl.ops:fused_chunk_based",
        fla="fla.ops.based:fused_chunk_based",
        flops=lambda B, T, H, K, V: chunk_flops(B, T, H, BASED_MAP, V),
        inputs=lambda B, T, H, D, dtype, device: based16_inputs(B, T, H, D, dtype, device),
    ),
    # Based / ReBased in the attention form (quadratic in T)
    "parallel_based": OpSpec(
        fla_tl="fla_tl.ops:parallel_based",
        fla="fla.ops.based:parallel_based",
        flops=lambda B, T, H, K, V: B * H * T * T * (K + V),
    ),
    "parallel_rebased": OpSpec(
        fla_tl="fla_tl.ops:parallel_rebased",
        fla="fla.ops.rebased:parallel_rebased",
        flops=lambda B, T, H, K, V: B * H * T * T * (K + V),
    ),
}

# gated slot attention and ABC: M = 64 slots as fla's tests and benchmarks use; FLOPs of the two passes
GSA_SLOTS = 64


def abc_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    return {**qkv_inputs(B, T, H, D, dtype, device),
            "s": torch.randn(B, T, H, GSA_SLOTS, dtype=torch.float32, device=device).to(dtype)}


def gsa_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # the slot log gate in fp32
    return {**abc_inputs(B, T, H, D, dtype, device),
            "g": F.logsigmoid(torch.randn(B, T, H, GSA_SLOTS, dtype=torch.float32, device=device))}


def gsa_chunk_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    return chunk_flops(B, T, H, K, GSA_SLOTS) + chunk_flops(B, T, H, GSA_SLOTS, V)


def gsa_recurrent_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    return recurrent_flops(B, T, H, K, GSA_SLOTS) + recurrent_flops(B, T, H, GSA_SLOTS, V)


OPS.update({
    "chunk_abc": OpSpec(
        fla_tl="fla_tl.ops:chunk_abc",
        fla="fla.ops.abc:chunk_abc",
        flops=gsa_chunk_flops,
        inputs=abc_inputs,
    ),
    "chunk_gsa": OpSpec(
        fla_tl="fla_tl.ops:chunk_gsa",
        fla="fla.ops.gsa:chunk_gsa",
        flops=gsa_chunk_flops,
        inputs=gsa_inputs,
    ),
    "fused_recurrent_gsa": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_gsa",
        fla="fla.ops.gsa:fused_recurrent_gsa",
        flops=gsa_recurrent_flops,
        inputs=gsa_inputs,
        slow=True,
    ),
})


def sdpa_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # layout [B, H, T, D] as SDPA wants it
    return {n: torch.randn(B, H, T, D, dtype=dtype, device=device) for n in ("query", "key", "value")}


def sdpa_call(**kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # flash attention only: a refusal becomes an error row rather than a silent slower backend
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(**kw, is_causal=True)


# ---------------------------------------------------------------------------------------------------------------------
# byte model, timing


def io_bytes(inputs: dict[str, torch.Tensor], out_numel: int, elem: int, mode: str) -> int:
    # fwd: read every input once (q, k, v) + write o; fwdbwd adds: read the inputs and do again + write a grad per input
    read_in = sum(x.numel() * x.element_size() for x in inputs.values())
    fwd = read_in + out_numel * elem
    if mode == "fwd":
        return fwd
    return fwd + read_in + out_numel * elem + read_in


def quantile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    pos = p * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Timer:
    def __init__(self, warmup_ms: float, rep: int, max_case_ms: float, sleep_us: float = 0.0):
        self.warmup_ms = warmup_ms
        self.rep = rep
        self.max_case_ms = max_case_ms
        # gpu clock cycles to spin before each timed call, so the host enqueues ahead (0: launch overhead counts)
        self.sleep_cycles = int(sleep_us * 1980)
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def run(self, step: Callable[[], None], reset: Callable[[], None]) -> list[float]:
        """Warm up (>= 3 calls and warmup_ms), then time `step` with CUDA events; `reset` and the L2 flush run outside."""
        t0 = time.perf_counter()
        n = 0
        while n < 3 or (time.perf_counter() - t0) * 1e3 < self.warmup_ms:
            reset()
            step()
            torch.cuda.synchronize()
            n += 1
        # estimate one call, to fit the reps into max_case_ms (at least 5)
        reset()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e), 1e-3)
        reps = max(5, min(self.rep, int(self.max_case_ms / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            reset()
            self.flush.zero_()
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------------------------------
# the run


def resolve(path: str) -> Callable:
    mod, attr = path.split(":")
    return getattr(importlib.import_module(mod), attr)


def version(dist: str, module: str | None = None) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module:
        try:
            return getattr(importlib.import_module(module), "__version__", "?")
        except ImportError:
            return ""
    return ""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def gpu_tag(name: str) -> str:
    """the GPU's short name for file names: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200"."""
    m = re.search(r"\b([a-z]*\d{3,}[a-z]*)\b", name.lower())
    return m.group(1) if m else slug(name)


def default_out(gpu: str, ops: list[str]) -> Path:
    """results/<gpu>-<op set>.csv: the op set of the ops (`OP_SETS`), sets joined by "+" when they span several."""
    sets = [s for s, members in OP_SETS.items() if any(op in members for op in ops)]
    name = "all" if len(sets) == len(OP_SETS) else "+".join(sets) or "custom"
    return HERE / "results" / f"{gpu_tag(gpu)}-{name}.csv"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="all", help=f"comma list or 'all' (default); known: {', '.join(OPS)}")
    p.add_argument(
        "--shapes",
        default="all",
        help="comma list of BxTxHxD (e.g. 8x4096x16x128) or 'all' (default): "
        + ", ".join(shape_name(s) for s in SHAPES),
    )
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd (default both)")
    p.add_argument("--providers", default="fla_tl,fla,sdpa",
                   help="comma list of fla_tl, fla, flash_qla, sdpa (default fla_tl,fla,sdpa)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<gpu>-<op set>.csv)")
    p.add_argument("--plot", default=None, help="PNG path (default beside the CSV, same stem)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--append", action="store_true", help="append to the CSV instead of overwriting it")
    p.add_argument("--warmup-ms", type=float, default=200.0, help="warm-up time per case after 3 calls (default 200)")
    p.add_argument("--rep", type=int, default=50, help="timed repetitions per case, at most (default 50)")
    p.add_argument(
        "--max-case-ms",
        type=float,
        default=3000.0,
        help="cap on timed GPU time per case: reps shrink to fit, never under 5 (default 3000)",
    )
    p.add_argument(
        "--sleep-us",
        type=float,
        default=0.0,
        help="spin the GPU this long before each timed call so host launch overhead is hidden (default 0: counted)",
    )
    p.add_argument("--skip-slow", action="store_true", help=f"skip slow ops (fused_recurrent) at B*T*H > {SLOW_BTH}")
    p.add_argument("--gate-tol", type=float, default=GATE_TOL,
                   help=f"gate threshold on the rel RMS against fla (default {GATE_TOL})")
    p.add_argument("--no-gate", action="store_true", help="skip the correctness gate (speed-ups then unreported)")
    p.add_argument("--fla-dispatch", action="store_true", help="leave fla's backend dispatch on (default: Triton path)")
    p.add_argument("--copy-gbps", type=float, default=COPY_CEILING_GBPS, help="copy ceiling for pct_of_copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="list the cases and their models; needs no GPU")
    args = p.parse_args(argv)

    args.ops = list(OPS) if args.ops == "all" else [s.strip() for s in args.ops.split(",") if s.strip()]
    for op in args.ops:
        if op not in OPS:
            p.error(f"--ops: unknown op {op!r}; known: {', '.join(OPS)}")
    if args.shapes == "all":
        args.shapes = list(SHAPES)
    else:
        shapes = []
        for s in args.shapes.split(","):
            m = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", s.strip())
            if not m:
                p.error(f"--shapes: expected BxTxHxD like 8x4096x16x128, got {s!r}")
            shapes.append(tuple(int(x) for x in m.groups()))
        args.shapes = shapes
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; expected among {MODES}")
    args.providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    for x in args.providers:
        if x not in PROVIDERS:
            p.error(f"--providers: unknown provider {x!r}; expected among {PROVIDERS}")
    return args



# Titans (linear memory). fla 0.6.0 ships it as plain PyTorch only: the fla provider is its chunked reference
# `chunk_titans_linear_ref` ([B, T, H, D], fp32 inside, Python loops over each chunk's tokens).
def titans_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    x = qkv_inputs(B, T, H, D, dtype, device)
    x["w"] = torch.ones(H, D, dtype=dtype, device=device)
    x["b"] = torch.zeros(H, D, dtype=dtype, device=device)
    # learning rate small against fla's vn (grows like D), decay and momentum in (0, 1)
    x["theta"] = (torch.rand(B, T, H, 1, device=device) * 0.05 / D ** 0.5).to(dtype)
    x["alpha"] = (torch.rand(B, T, H, 1, device=device) * 0.2).to(dtype)
    x["eta"] = (0.5 + 0.5 * torch.rand(B, T, H, 1, device=device)).to(dtype)
    return x


def titans_consts(B: int, T: int, H: int, D: int, device: str) -> dict:
    return {"eps": 1e-6, "chunk_size": 16}


def titans_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per token: K M, Q M, Q S, the two state updates (2 K V each) and the [16, 16] in-chunk attention both ways
    return B * T * H * (10.0 * K * V + 4.0 * 16 * (K + V) / 2)


OPS["chunk_titans_linear"] = OpSpec(
    fla_tl="fla_tl.ops:chunk_titans_linear",
    fla="fla.ops.titans.naive:chunk_titans_linear_ref",
    flops=titans_flops,
    inputs=titans_inputs,
    consts=titans_consts,
    slow=True,
)

# the op sets, one results file per GPU and set (benchmarks/results/<gpu>-<set>.csv)
OP_SETS = {
    "retention": ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention"),
    "gla-family": (
        "chunk_simple_gla", "chunk_simple_gla_g", "fused_chunk_simple_gla", "fused_recurrent_simple_gla",
        "chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn",
        "chunk_lightning_attn", "fused_recurrent_lightning_attn", "chunk_gla", "fused_recurrent_gla",
        "chunk_hgrn", "fused_recurrent_hgrn", "chunk_rwkv6", "fused_recurrent_rwkv6",
        "chunk_abc", "chunk_gsa", "fused_recurrent_gsa",
    ),
    "delta-rule": ("chunk_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_delta_rule",
                   "fused_recurrent_gated_delta_rule"),
    "based": ("fused_chunk_based", "parallel_based", "parallel_rebased"),
    "titans": ("chunk_titans_linear",),
}  # fmt: skip


def cases(args):
    """(op, shape, mode, provider, skip-reason) in run order: per shape, sdpa once, then per op fla before fla_tl."""
    order = [x for x in ("fla", "flash_qla", "fla_tl") if x in args.providers]
    for shape in args.shapes:
        B, T, H, _ = shape
        for mode in args.modes:
            if "sdpa" in args.providers:
                yield "sdpa", shape, mode, "sdpa", None
        for op in args.ops:
            spec = OPS[op]
            skip = "skipped: slow (--skip-slow)" if args.skip_slow and spec.slow and B * T * H > SLOW_BTH else None
            for mode in args.modes:
                for prov in order:
                    if prov != "flash_qla" or spec.flash_qla:
                        yield op, shape, mode, prov, skip


def dry_run(args) -> None:
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    print(f"dry run: {len(args.shapes)} shapes, ops {args.ops}, modes {args.modes}, providers {args.providers}")
    print(f"{'op':<28}{'prov':<8}{'mode':<8}{'shape':<18}{'MB moved':>10}{'GFLOP':>10}  note")
    for op, shape, mode, prov, skip in cases(args):
        B, T, H, D = shape
        # meta tensors: the shapes without memory
        make = sdpa_inputs if op == "sdpa" else OPS[op].inputs
        nbytes = io_bytes(make(B, T, H, D, DTYPES[args.dtype], "meta"), B * T * H * D, elem, mode)
        flops_fn = sdpa_flops if op == "sdpa" else OPS[op].flops
        fl = flops_fn(B, T, H, D, D) * (1 + BWD_FLOP_FACTOR if mode == "fwdbwd" else 1)
        print(f"{op:<28}{prov:<8}{mode:<8}{shape_name(shape):<18}{nbytes / 1e6:>10.1f}{fl / 1e9:>10.1f}  {skip or ''}")
    print(f"gate: fla_tl vs fla, rel RMS <= {args.gate_tol} (fallback: fp32 reference, fla_tl.testing.TOLERANCES)")
    print(f"fla path: {'dispatch' if args.fla_dispatch else 'triton (FLA_DISABLE_BACKEND_DISPATCH=1)'}")


def write_csv(path: Path, rows: list[dict], previous: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in previous + rows:
            w.writerow({c: r.get(c, "") for c in CSV_COLUMNS})


def fmt(x, spec=".3f") -> str:
    return "" if x is None or x == "" else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return 0
    if not torch.cuda.is_available():
        print("bench.py: no CUDA GPU here; run it on a GPU machine (or use --dry-run to list the cases)")
        return 2

    # fla's Triton kernels, not whatever backend fla would dispatch to, unless asked
    if not args.fla_dispatch:
        os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    fla_path = "triton" if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH", "0") == "1" else "dispatch"

    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else default_out(gpu, args.ops)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")

    # resolve the callables once; a missing package becomes an error status on its rows
    fns: dict[tuple[str, str], Callable | str] = {}
    for op in args.ops:
        spec = OPS[op]
        for prov, target in (("fla_tl", spec.fla_tl), ("fla", spec.fla), ("flash_qla", spec.flash_qla)):
            if prov not in args.providers:
                continue
            try:
                fns[op, prov] = resolve(target) if target else "error: no fla counterpart"
            except Exception as e:  # noqa: BLE001
                fns[op, prov] = f"error: import {target}: {type(e).__name__}: {e}"
                print(f"note: cannot import {target}: {type(e).__name__}: {e}", file=sys.stderr)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": version("triton", "triton"),
        "tilelang": version("tilelang"),
        "fla_version": version("fla-core") or version("flash-linear-attention"),
        "fla_tl_version": version("fla-tl", "fla_tl"),
        "dtype": args.dtype,
        "fla_path": fla_path,
    }
    print(
        f"{gpu} | torch {meta['torch']} triton {meta['triton']} tilelang {meta['tilelang']} "
        f"fla {meta['fla_version'] or '-'} ({fla_path}) fla_tl {meta['fla_tl_version'] or '-'}"
    )

    previous: list[dict] = []
    if args.append and out.exists():
        with open(out, newline="") as f:
            previous = list(csv.DictReader(f))
    torch.manual_seed(args.seed)
    timer = Timer(args.warmup_ms, args.rep, args.max_case_ms, args.sleep_us)
    rows: list[dict] = []
    # gate per (op, shape, mode): (rel rms or None, 'PASS' / 'FAIL' / 'n/a ...')
    gates: dict[tuple, tuple[float | None, str]] = {}
    # fla median per (op, shape, mode), for the ratio
    fla_ms: dict[tuple, float] = {}
    data: dict[tuple, dict] = {}

    def get_inputs(op: str, shape) -> tuple[dict, torch.Tensor]:
        make = sdpa_inputs if op == "sdpa" else OPS[op].inputs
        key = (make, shape)
        if key not in data:
            data.clear()
            torch.cuda.empty_cache()
            B, T, H, D = shape
            inputs = make(B, T, H, D, dtype, "cuda")
            # hgrn (inputs with "x") returns [B, T, H * D]
            o_shape = (B, H, T, D) if op == "sdpa" else (B, T, H * D) if "x" in inputs else (B, T, H, D)
            do = torch.randn(o_shape, dtype=dtype, device="cuda")
            data[key] = (inputs, do)
        return data[key]

    def get_consts(op: str, shape) -> dict:
        spec = OPS.get(op)
        return spec.consts(*shape, "cuda") if spec is not None and spec.consts is not None else {}

    def gate(op: str, shape, mode: str) -> tuple[float | None, str]:
        if args.no_gate:
            return None, "n/a (--no-gate)"
        spec = OPS[op]
        f_tl = fns.get((op, "fla_tl"))
        if not callable(f_tl):
            return None, "n/a (no fla_tl)"
        inputs, do = get_inputs(op, shape)
        refs = [("fla", fns.get((op, "fla"))), ("reference", spec.reference)]
        reasons = []

        def run(fn, cast=None, **kw):
            xs = {n: (t.detach().clone() if cast is None else t.detach().to(cast)).requires_grad_(mode == "fwdbwd")
                  for n, t in inputs.items()}
            with torch.set_grad_enabled(mode == "fwdbwd"):
                o = first(fn(**xs, **get_consts(op, shape), **kw))
                if mode == "fwdbwd":
                    o.backward(do.to(o.dtype))
            return [o.detach()] + ([xs[n].grad for n in xs] if mode == "fwdbwd" else [])

        def max_err(a, b):
            return max(rel_rms(x, y) for x, y in zip(a, b))

        for ref_name, ref_fn in refs:
            if not callable(ref_fn):
                continue
            try:
                results = [run(f_tl), run(ref_fn)]
                err = max_err(*results)
                if ref_name == "fla":
                    ok = not math.isnan(err) and err <= args.gate_tol
                else:
                    # the fp32 reference: the check harness's tolerance for the input dtype, per output and gradient
                    ok = not math.isnan(err) and all(compare(x, y, dtype)[0]
                                                     for x, y in zip(*results))
                if not ok and ref_name == "fla" and not math.isnan(err):
                    # fla_tl and fla differ: which of them is the closer to fla_tl's fp32 torch backend on the same
                    # inputs in fp32? fla_tl passes when its error is no larger than fla's
                    truth = run(f_tl, cast=torch.float32, backend="torch")
                    e_tl, e_fla = max_err(results[0], truth), max_err(results[1], truth)
                    del truth
                    if e_tl <= e_fla:
                        return err, f"PASS (vs fp32 torch: fla_tl {e_tl:.2e} <= fla {e_fla:.2e})"
                    return err, f"FAIL (vs fp32 torch: fla_tl {e_tl:.2e} > fla {e_fla:.2e})"
                del results
                label = "PASS" if ok else "FAIL"
                return err, label if ref_name == "fla" else f"{label} (vs reference)"
            except Exception as e:  # noqa: BLE001
                reasons.append(f"{ref_name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
                torch.cuda.empty_cache()
        return None, "n/a (" + ("; ".join(reasons) or "no reference") + ")"

    def measure(fn: Callable, inputs: dict, do: torch.Tensor, mode: str, consts: dict) -> tuple[list[float], float]:
        grad = mode == "fwdbwd"
        xs = {n: t.detach().clone().requires_grad_(grad) for n, t in inputs.items()}

        def step():
            with torch.set_grad_enabled(grad):
                o = first(fn(**xs, **consts))
                if grad:
                    o.backward(do.to(o.dtype))

        def reset():
            for x in xs.values():
                x.grad = None

        times = timer.run(step, reset)
        # peak memory of one call above what is held before it (inputs, do, flush buffer)
        reset()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        reset()
        return times, peak_mb

    for op, shape, mode, prov, skip in cases(args):
        B, T, H, D = shape
        row = dict(meta, op=op, provider=prov, mode=mode, B=B, T=T, H=H, D=D)
        key = (op, shape, mode)
        if op != "sdpa" and prov == "fla_tl" and key not in gates and not skip:
            gates[key] = gate(op, shape, mode)
        if prov == "fla_tl" and key in gates:
            err, label = gates[key]
            row["gate_rel_rms"] = fmt(err, ".3e")
            row["gate"] = label
        fn = sdpa_call if op == "sdpa" else fns.get((op, prov))
        if skip:
            row["status"] = skip
        elif not callable(fn):
            row["status"] = fn or "error: not resolved"
        else:
            try:
                inputs, do = get_inputs(op, shape)
                times, peak_mb = measure(fn, inputs, do, mode, get_consts(op, shape) if op != "sdpa" else {})
                med = statistics.median(times)
                nbytes = io_bytes(inputs, do.numel(), elem, mode)
                flops_fn = sdpa_flops if op == "sdpa" else OPS[op].flops
                flops = flops_fn(B, T, H, D, D) * (1 + BWD_FLOP_FACTOR if mode == "fwdbwd" else 1)
                gbps = nbytes / (med * 1e-3) / 1e9
                row.update(
                    median_ms=fmt(med, ".4f"),
                    p20_ms=fmt(quantile(times, 0.2), ".4f"),
                    p80_ms=fmt(quantile(times, 0.8), ".4f"),
                    gbps=fmt(gbps, ".1f"),
                    pct_of_copy=fmt(100 * gbps / args.copy_gbps, ".1f"),
                    tflops=fmt(flops / (med * 1e-3) / 1e12, ".2f"),
                    peak_mem_mb=fmt(peak_mb, ".1f"),
                    status=f"ok ({len(times)} reps)",
                )
                if prov == "fla":
                    fla_ms[key] = med
                if prov == "fla_tl" and key in fla_ms and row.get("gate", "").startswith("PASS"):
                    row["ratio_to_fla"] = fmt(med / fla_ms[key], ".3f")
            except Exception as e:  # noqa: BLE001
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                row["status"] = f"error: {type(e).__name__}: {msg}"
                print(f"[{op} {prov} {mode} {shape_name(shape)}] {row['status']}", file=sys.stderr)
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
                torch.cuda.empty_cache()
        rows.append(row)
        print(
            f"{op:<26} {prov:<9} {mode:<7} {shape_name(shape):<16} {row.get('median_ms', '') or '-':>10} ms  "
            f"{row.get('gbps', '') or '-':>7} GB/s  {row.get('gate', '')} {row['status']}",
            flush=True,
        )
        # rewrite after each row, so a run cut short keeps what it measured
        write_csv(out, rows, previous)

    print(f"\nCSV: {out}")
    if not args.no_plot:
        plot(previous + rows if args.append else rows, plot_path)
    summary(rows)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing, no plot written")
        return
    ok = [r for r in rows if r.get("median_ms")]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    if not modes:
        print("note: nothing measured, no plot written")
        return
    fig, axes = plt.subplots(len(modes), 1, figsize=(16, 5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mr = [r for r in ok if r["mode"] == mode]
        shapes = list(dict.fromkeys(f"{r['B']}x{r['T']}x{r['H']}x{r['D']}" for r in mr))
        series = list(dict.fromkeys((r["op"], r["provider"]) for r in mr))
        width = 0.8 / max(len(series), 1)
        for i, (op, prov) in enumerate(series):
            vals = {f"{r['B']}x{r['T']}x{r['H']}x{r['D']}": float(r["median_ms"]) for r in mr
                    if (r["op"], r["provider"]) == (op, prov)}  # fmt: skip
            xs = [j + (i - (len(series) - 1) / 2) * width for j, s in enumerate(shapes) if s in vals]
            ys = [vals[s] for s in shapes if s in vals]
            label = "sdpa (causal flash)" if op == "sdpa" else f"{op} / {prov}"
            ax.bar(xs, ys, width, label=label, hatch="//" if prov == "fla" else None)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_xlabel("B x T x H x D")
        ax.set_title(f"{mode}, {mr[0]['dtype']}, {mr[0]['gpu']}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"PNG: {path}")


def summary(rows: list[dict]) -> None:
    by = {(r["op"], r["mode"], r["B"], r["T"], r["H"], r["D"], r["provider"]): r for r in rows}
    print(f"\n{'op':<26} {'mode':<7} {'shape':<16} {'fla_tl ms':>10} {'fla ms':>10} {'ratio':>7}  {'gate':<6} rel_rms")
    seen = set()
    for r in rows:
        k = (r["op"], r["mode"], r["B"], r["T"], r["H"], r["D"])
        if k in seen:
            continue
        seen.add(k)
        shape = f"{r['B']}x{r['T']}x{r['H']}x{r['D']}"
        if r["op"] == "sdpa":
            s = by.get(k + ("sdpa",), {})
            print(f"{'sdpa':<26} {r['mode']:<7} {shape:<16} {s.get('median_ms') or s.get('status', '')[:30]:>10}")
            continue
        tl, fl = by.get(k + ("fla_tl",), {}), by.get(k + ("fla",), {})
        print(
            f"{r['op']:<26} {r['mode']:<7} {shape:<16} {tl.get('median_ms') or '-':>10} {fl.get('median_ms') or '-':>10} "
            f"{tl.get('ratio_to_fla') or '-':>7}  {(tl.get('gate') or '-').split()[0]:<6} {tl.get('gate_rel_rms') or ''}"
        )
    noisy = [r for r in rows if r.get("p20_ms") and float(r["p80_ms"]) > 1.5 * float(r["p20_ms"])]
    if noisy:
        print(f"\n{len(noisy)} rows with p80 > 1.5x p20 (host-bound or noisy; try --sleep-us 2000):")
        for r in noisy:
            print(
                f"  {r['op']} {r['provider']} {r['mode']} {r['B']}x{r['T']}x{r['H']}x{r['D']}: {r['p20_ms']}..{r['p80_ms']}"
            )
    errs = [r for r in rows if r.get("status", "").startswith("error")]
    if errs:
        print(f"\n{len(errs)} error rows:")
        for r in errs:
            print(f"  {r['op']} {r['provider']} {r['mode']} {r['B']}x{r['T']}x{r['H']}x{r['D']}: {r['status'][:150]}")


if __name__ == "__main__":
    sys.exit(main())
