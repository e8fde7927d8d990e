"""The benchmark's op table and shapes: what `bench.py` runs, on which inputs, and its byte and FLOP models.

- `Shape`: B x T x H x D (K = V = D), optionally `h<HV>` value heads (grouped value attention) and `n<N>` packed
  sequences (B = 1, `cu_seqlens` of N random lengths, fixed seed). Named sets in `NAMED_SHAPES`.
- `OPS`: one `OpSpec` per benchmarked op (fla_tl's function, fla's and FlashQLA's counterparts, inputs, FLOP model).
- `OP_SETS`: the op sets, one results file per GPU and set.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the chunk length the FLOP model of the chunked ops assumes
FLOP_BT = 64
# backward costs about 2.5x the forward in FLOPs; fwdbwd = 3.5x fwd
BWD_FLOP_FACTOR = 2.5
# slow ops are skipped above this B*T*H under --skip-slow
SLOW_BTH = 8 * 4096 * 16
# the seed of the packed sequences' lengths (fixed: every run packs the same lengths)
PACKED_SEED = 0


# ---------------------------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class Shape:
    """B x T x H x D with K = V = D; `HV` value heads (None: H); `seqs` packed sequences in B = 1 (0: dense)."""

    B: int
    T: int
    H: int
    D: int
    HV: int | None = None
    seqs: int = 0

    @property
    def name(self) -> str:
        hv = f"h{self.HV}" if self.HV else ""
        packed = f"n{self.seqs}" if self.seqs else ""
        return f"{self.B}x{self.T}x{self.H}x{self.D}{hv}{packed}"

    @property
    def value_heads(self) -> int:
        return self.HV or self.H

    def __str__(self) -> str:
        return self.name


SHAPE_SYNTAX = "BxTxHxD with optional h<HV> (value heads) and n<N> (N packed sequences, B = 1), e.g. 1x32768x16x128h64"


def parse_shape(text: str) -> Shape:
    """`8x4096x16x128`, `1x32768x16x128h64` (64 value heads), `1x65536x16x128n16` (16 packed sequences)."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)(?:h(\d+))?(?:n(\d+))?", text.strip())
    if not m:
        raise ValueError(f"expected {SHAPE_SYNTAX}, got {text!r}")
    B, T, H, D = (int(x) for x in m.groups()[:4])
    HV = int(m.group(5)) if m.group(5) else None
    seqs = int(m.group(6)) if m.group(6) else 0
    if min(B, T, H, D) < 1:
        raise ValueError(f"B, T, H and D must be positive, got {text!r}")
    if HV is not None and (HV < H or HV % H):
        raise ValueError(f"value heads HV must be a multiple of H = {H}, got HV = {HV} in {text!r}")
    if seqs and (B != 1 or not 1 <= seqs <= T):
        raise ValueError(f"packed sequences need B = 1 and 1 <= N <= T, got {text!r}")
    return Shape(B, T, H, D, None if HV == H else HV, seqs)


MAIN_SHAPE = Shape(8, 4096, 16, 128)
# fla's benchmark shape set; the main comparison shape leads the `fla` set
FLA_SHAPES = [
    Shape(1, 8192, 96, 128),
    Shape(2, 16384, 16, 128),
    Shape(4, 2048, 16, 128),
    Shape(4, 4096, 64, 128),
    Shape(8, 1024, 8, 64),
    Shape(8, 2048, 32, 256),
]
# a packed training batch: 16 sequences of random lengths in 65536 tokens
PACKED_SHAPE = Shape(1, 65536, 16, 128, seqs=16)
# FlashQLA's own benchmark shapes: one 32k sequence with 16 q/k heads and 32 or 64 value heads
FLASHQLA_SHAPES = [Shape(1, 32768, 16, 128, HV=32), Shape(1, 32768, 16, 128, HV=64), Shape(2, 16384, 16, 128)]
NAMED_SHAPES = {
    "fla": [MAIN_SHAPE, *FLA_SHAPES],
    "main": [MAIN_SHAPE],
    "packed": [PACKED_SHAPE],
    "flashqla": FLASHQLA_SHAPES,
}


def parse_shapes(text: str) -> list[Shape]:
    """a comma list of set names (`NAMED_SHAPES`) and shapes (`parse_shape`), in order, each shape once."""
    shapes: list[Shape] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            found = NAMED_SHAPES[item] if item in NAMED_SHAPES else [parse_shape(item)]
        except ValueError as e:
            raise ValueError(f"{e}, or a set: {', '.join(NAMED_SHAPES)}") from None
        shapes += [s for s in found if s not in shapes]
    if not shapes:
        raise ValueError(f"expected set names ({', '.join(NAMED_SHAPES)}) or shapes, got {text!r}")
    return shapes


def packed_cu_seqlens(T: int, n: int, seed: int = PACKED_SEED) -> list[int]:
    """the offsets `[0, ..., T]` of `n` sequences of random lengths (>= 1 token each) packed into `T` tokens."""
    if not 1 <= n <= T:
        raise ValueError(f"`n` must be in [1, T = {T}], got {n}")
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(T - 1, generator=gen)[: n - 1] + 1
    return [0, *sorted(cuts.tolist()), T]


# ---------------------------------------------------------------------------------------------------------------------
# inputs


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


def gated_delta_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str,
                       HV: int | None = None) -> dict[str, torch.Tensor]:
    # Gated DeltaNet: q, k of H heads; v, beta and the log gate g (fp32) of HV value heads (grouped value attention)
    HV = HV or H
    x = qkv_inputs(B, T, H, D, dtype, device)
    x["v"] = torch.randn(B, T, HV, D, dtype=dtype, device=device)
    x["beta"] = torch.rand(B, T, HV, dtype=dtype, device=device)
    x["g"] = F.logsigmoid(torch.randn(B, T, HV, dtype=torch.float32, device=device))
    return x


def kda_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str,
               HV: int | None = None) -> dict[str, torch.Tensor]:
    # KDA: Gated DeltaNet's inputs with a per-key log gate g [B, T, HV, K] (fp32)
    HV = HV or H
    x = gated_delta_inputs(B, T, H, D, dtype, device, HV)
    x["g"] = F.logsigmoid(torch.randn(B, T, HV, D, dtype=torch.float32, device=device))
    return x


def dplr_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str,
                gated: bool = True) -> dict[str, torch.Tensor]:
    # the generalized delta rule: the low-rank pair a = -kk, b = kk * rate (kk normalised, rate in [0, 1)) in the
    # input dtype, the log decay gk (fp32) unless IPLR
    x = qkv_inputs(B, T, H, D, dtype, device)
    kk = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    x.update(a=(-kk).to(dtype), b=(kk * torch.rand(B, T, H, D, device=device)).to(dtype))
    if gated:
        x["gk"] = F.logsigmoid(torch.randn(B, T, H, D, dtype=torch.float32, device=device))
    return x


def iplr_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    return dplr_inputs(B, T, H, D, dtype, device, gated=False)


def rwkv7_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # RWKV-7's names: r for q, w for the log decay
    x = dplr_inputs(B, T, H, D, dtype, device)
    return {"r": x.pop("q"), "w": x.pop("gk"), **x}


def rwkv6_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # RWKV6: receptance r, per-key log decays w (fp32, as GLA's gate), the bonus u [H, K]
    x = qkv_inputs(B, T, H, D, dtype, device)
    return {"r": x.pop("q"), **x, "w": F.logsigmoid(torch.randn(B, T, H, D, dtype=torch.float32, device=device)),
            "u": torch.randn(H, D, dtype=dtype, device=device)}


# gated slot attention and ABC: M = 64 slots as fla's tests and benchmarks use
GSA_SLOTS = 64


def abc_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    return {**qkv_inputs(B, T, H, D, dtype, device),
            "s": torch.randn(B, T, H, GSA_SLOTS, dtype=torch.float32, device=device).to(dtype)}


def gsa_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # the slot log gate in fp32
    return {**abc_inputs(B, T, H, D, dtype, device),
            "g": F.logsigmoid(torch.randn(B, T, H, GSA_SLOTS, dtype=torch.float32, device=device))}


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


def sdpa_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    # layout [B, H, T, D] as SDPA wants it
    return {n: torch.randn(B, H, T, D, dtype=dtype, device=device) for n in ("query", "key", "value")}


def sdpa_call(**kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # flash attention only: a refusal becomes an error row rather than a silent slower backend
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(**kw, is_causal=True)


def decay_consts(B: int, T: int, H: int, D: int, device: str) -> dict:
    # retention-like per-head constant decays
    return {"g_gamma": torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float32, device=device)))}


def lightning_consts(B: int, T: int, H: int, D: int, device: str) -> dict:
    return {"layer_idx": 1, "num_layers": 8}


def titans_consts(B: int, T: int, H: int, D: int, device: str) -> dict:
    return {"eps": 1e-6, "chunk_size": 16}


# ---------------------------------------------------------------------------------------------------------------------
# FLOP models: (B, T, H, K, V) -> FLOPs of the forward; H counts the value heads


def chunk_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per token per head, chunk length BT: q k^T in the chunk (2*BT*K), A v (2*BT*V),
    # q h against the chunk-start state (2*K*V), the state update k^T v (2*K*V); causal halving ignored
    return B * T * H * 2.0 * (FLOP_BT * K + FLOP_BT * V + 2 * K * V)


def recurrent_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per token per head: rank-1 state update k^T v (2*K*V) and the readout q S (2*K*V)
    return B * T * H * 4.0 * K * V


def parallel_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # the attention form: q k^T and p v over the causal half of the T*T square
    return B * H * T * T * (K + V)


def hgrn_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per channel per token: exp(g), the multiply and the add
    return B * T * H * K * 3.0


def sdpa_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # causal: q k^T and p v over half the T*T square, 2*B*T*T*H*D in all
    return 2.0 * B * T * T * H * K


def gsa_chunk_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    return chunk_flops(B, T, H, K, GSA_SLOTS) + chunk_flops(B, T, H, GSA_SLOTS, V)


def gsa_recurrent_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    return recurrent_flops(B, T, H, K, GSA_SLOTS) + recurrent_flops(B, T, H, GSA_SLOTS, V)


def titans_flops(B: int, T: int, H: int, K: int, V: int) -> float:
    # per token: K M, Q M, Q S, the two state updates (2 K V each) and the [16, 16] in-chunk attention both ways
    return B * T * H * (10.0 * K * V + 4.0 * 16 * (K + V) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# the gate's fp32 reference where fla is missing


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


# ---------------------------------------------------------------------------------------------------------------------
# the op table


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op: where its fla_tl, fla and FlashQLA functions live ("module:attr"), and its models.

    `inputs(B, T, H, D, dtype, device)` returns the keyword tensors; every one gets a gradient in fwdbwd (with
    `gva`, it also takes `HV=` value heads). `consts(B, T, H, D, device)` returns keyword arguments without gradient
    (a constant decay, a layer index). The call is `fn(**inputs, **consts)` (plus `cu_seqlens=` at packed shapes)
    and its first return value is the output `o`. `slow` ops are skipped under --skip-slow for the providers in
    `slow_providers` where B*T*H > `slow_bth`.
    """

    fla_tl: str
    fla: str | None
    flops: Callable[[int, int, int, int, int], float]
    inputs: Callable[..., dict[str, torch.Tensor]] = qkv_inputs
    reference: Callable | None = None
    slow: bool = False
    slow_providers: tuple[str, ...] = ("fla_tl", "fla", "flashqla")
    slow_bth: int = SLOW_BTH
    consts: Callable[..., dict] | None = None
    # FlashQLA's counterpart ("module:attr"; Gated DeltaNet only), timed as its own provider
    flashqla: str | None = None
    # takes v with more heads than q and k (grouped value attention, shapes with h<HV>)
    gva: bool = False

    @property
    def registered_name(self) -> str:
        """the name of fla_tl's op (the attribute of `fla_tl`)."""
        return self.fla_tl.split(":")[1]


# adding an op is one entry here and its name in one of the OP_SETS
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
    # the attention form, parallel_simple_gla's inputs without g
    "parallel_retention": OpSpec(
        fla_tl="fla_tl.ops:parallel_retention",
        fla="fla.ops.retention:parallel_retention",
        flops=parallel_flops,
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
    "parallel_simple_gla": OpSpec(
        fla_tl="fla_tl.ops:parallel_simple_gla",
        fla="fla.ops.simple_gla:parallel_simple_gla",
        flops=parallel_flops,
        inputs=qkvg_inputs,
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
        flashqla="flash_qla:chunk_gated_delta_rule",
        gva=True,
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
        gva=True,
    ),
    "chunk_kda": OpSpec(
        fla_tl="fla_tl.ops:chunk_kda",
        fla="fla.ops.kda:chunk_kda",
        flops=chunk_flops,
        inputs=kda_inputs,
        gva=True,
    ),
    # fla 0.6.0's has no backward (its fwdbwd row is an error row)
    "fused_recurrent_kda": OpSpec(
        fla_tl="fla_tl.ops:fused_recurrent_kda",
        fla="fla.ops.kda:fused_recurrent_kda",
        flops=recurrent_flops,
        inputs=kda_inputs,
        slow=True,
        gva=True,
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
        inputs=based16_inputs,
    ),
    # Based / ReBased in the attention form (quadratic in T)
    "parallel_based": OpSpec(
        fla_tl="fla_tl.ops:parallel_based",
        fla="fla.ops.based:parallel_based",
        flops=parallel_flops,
    ),
    "parallel_rebased": OpSpec(
        fla_tl="fla_tl.ops:parallel_rebased",
        fla="fla.ops.rebased:parallel_rebased",
        flops=parallel_flops,
    ),
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
    # fla's provider is its pure-PyTorch reference: seconds per call past B*T*H = 8 * 1024 * 16
    "chunk_titans_linear": OpSpec(
        fla_tl="fla_tl.ops:chunk_titans_linear",
        fla="fla.ops.titans.naive:chunk_titans_linear_ref",
        flops=titans_flops,
        inputs=titans_inputs,
        consts=titans_consts,
        slow=True,
        slow_providers=("fla",),
        slow_bth=8 * 1024 * 16,
    ),
    # the generalized delta rule and RWKV-7: fla_tl runs the chunked PyTorch form (its TileLang kernels are not built
    # yet): skipped under --skip-slow at every shape; fla 0.6.0's chunk_iplr has no backward
    **{name: OpSpec(fla_tl=f"fla_tl.ops:{name}", fla=f"fla.ops.{module}:{name}", flops=flops, inputs=inputs, slow=True,
                    slow_providers=("fla_tl",), slow_bth=0)
       for name, module, flops, inputs in (
           ("chunk_dplr_delta_rule", "generalized_delta_rule", chunk_flops, dplr_inputs),
           ("fused_recurrent_dplr_delta_rule", "generalized_delta_rule", recurrent_flops, dplr_inputs),
           ("chunk_iplr_delta_rule", "generalized_delta_rule", chunk_flops, iplr_inputs),
           ("fused_recurrent_iplr_delta_rule", "generalized_delta_rule", recurrent_flops, iplr_inputs),
           ("chunk_rwkv7", "rwkv7", chunk_flops, rwkv7_inputs),
           ("fused_recurrent_rwkv7", "rwkv7", recurrent_flops, rwkv7_inputs),
       )},
}

# the op sets, one results file per GPU and set (benchmarks/results/<gpu>-<set>.csv)
OP_SETS = {
    "retention": ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention"),
    "gla-family": (
        "chunk_simple_gla", "chunk_simple_gla_g", "fused_chunk_simple_gla", "fused_recurrent_simple_gla",
        "parallel_simple_gla", "chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn",
        "chunk_lightning_attn", "fused_recurrent_lightning_attn", "chunk_gla", "fused_recurrent_gla",
        "chunk_hgrn", "fused_recurrent_hgrn", "chunk_rwkv6", "fused_recurrent_rwkv6",
        "chunk_abc", "chunk_gsa", "fused_recurrent_gsa",
    ),
    "delta-rule": ("chunk_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_delta_rule",
                   "fused_recurrent_gated_delta_rule"),
    "kda": ("chunk_kda", "fused_recurrent_kda"),
    "dplr": ("chunk_dplr_delta_rule", "fused_recurrent_dplr_delta_rule", "chunk_iplr_delta_rule",
             "fused_recurrent_iplr_delta_rule", "chunk_rwkv7", "fused_recurrent_rwkv7"),
    "based": ("fused_chunk_based", "parallel_based", "parallel_rebased"),
    "titans": ("chunk_titans_linear",),
}  # fmt: skip

# the modes of fla_tl's registry, usable as op groups in --ops
REGISTRY_MODES = ("chunk", "fused_chunk", "fused_recurrent", "parallel")


def registry_modes() -> dict[str, str]:
    """fla_tl's registered ops and their modes (chunk, fused_chunk, fused_recurrent, parallel)."""
    import fla_tl.ops  # noqa: F401  (registers the ops)
    from fla_tl.registry import registered_ops

    return {spec.name: spec.mode for spec in registered_ops()}


def ops_of_mode(mode: str, modes: dict[str, str] | None = None) -> list[str]:
    """the benchmarked ops whose fla_tl op is registered with `mode`, in the order of `OPS`."""
    modes = registry_modes() if modes is None else modes
    return [name for name, spec in OPS.items() if modes.get(spec.registered_name) == mode]


def takes_argument(fn: Callable, name: str) -> bool:
    """whether `fn` has a parameter `name`; True where the signature says nothing (a bare `*args, **kwargs` wrapper)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return name in params or (bool(params) and all(p.kind in variadic for p in params.values()))


def op_inputs(spec: OpSpec, shape: Shape, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """the op's keyword tensors at `shape` (value heads passed on to the ops that take them)."""
    extra = {"HV": shape.HV} if shape.HV and spec.gva else {}
    return spec.inputs(shape.B, shape.T, shape.H, shape.D, dtype, device, **extra)


def op_consts(spec: OpSpec, shape: Shape, device: str) -> dict:
    """the op's keyword arguments without gradient at `shape`, `cu_seqlens` (int64) at packed shapes."""
    consts = spec.consts(shape.B, shape.T, shape.H, shape.D, device) if spec.consts is not None else {}
    if shape.seqs:
        consts["cu_seqlens"] = torch.tensor(packed_cu_seqlens(shape.T, shape.seqs), dtype=torch.int64, device=device)
    return consts
