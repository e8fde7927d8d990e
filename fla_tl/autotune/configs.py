"""Tile configs as data: for every TileLang kernel, a frozen dataclass of its factory's tile keywords, the heuristic
default, the search space, and the shared-memory arithmetic that filters out configs that cannot launch.

`factory(**dims, **asdict(config))` builds the kernel. The chunk length BT is fixed at 64 (every stage of a chunk op
must agree on it), so it is not a field. Sizes below are bytes; `es` is the input element size, KP the key dim padded
to the kernel's tile (64 for the chunk kernels, 16 for the recurrent ones).

This module sits below the kernels: they import their constants, tile arithmetic and heuristics from here, and it
imports nothing from `fla_tl.kernels`. A kernel is named by its factory's "module:function" string (`TunableKernel.
factory`); its module's source hash keys the tuning table.
"""

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

# the chunk length of every chunk kernel
BT = 64
# sm_90 gives a block at most 227 KB of dynamic shared memory; 2 KB stay for barriers and alignment
SMEM_BUDGET = 225 * 1024
ELEMENT_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
# the TileLang names of the input dtypes the kernels take
TORCH_TO_TL = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def pad_dim(d: int, multiple: int = 64) -> int:
    """the tile extent that holds a head dim: the next multiple of 64 (a warpgroup mma's m-extent)."""
    return cdiv(d, multiple) * multiple


@dataclass(frozen=True)
class ChunkFwdHConfig:
    BK: int = 64
    BV: int = 64
    num_stages: int = 2
    threads: int = 128


@dataclass(frozen=True)
class ChunkFwdOConfig:
    BV: int = 64
    threads: int = 128


@dataclass(frozen=True)
class ChunkBwdDhConfig:
    BK: int = 64
    BV: int = 64
    num_stages: int = 2
    threads: int = 128


@dataclass(frozen=True)
class ChunkBwdDvConfig:
    BV: int = 64
    threads: int = 128


@dataclass(frozen=True)
class ChunkBwdDqkConfig:
    BK: int = 128
    BV: int = 64
    num_stages: int = 2
    threads: int = 256


@dataclass(frozen=True)
class FusedChunkConfig:
    BV: int = 64
    num_stages: int = 2
    threads: int = 128
    smem_store: bool = True


@dataclass(frozen=True)
class FusedRecurrentConfig:
    TB: int = 16
    BV: int = 32
    num_stages: int = 2
    threads: int = 128


@dataclass(frozen=True)
class DeltaPassConfig:
    """the sequential passes of the delta rules (`common.chunk_delta_h`'s state passes forward and backward,
    `common.fused_chunk_delta`'s fused forward): the V tile and the block size (one or two consumer warpgroups)."""

    BV: int = 64
    threads: int = 128


@dataclass(frozen=True)
class WyConfig:
    """the WY stages (`common.wy`: the forward's inverse and pair, the backward): the column tile of their [BT, BD]
    products over the key and value dims (the backward stages [BT, BT] tiles in it too: BD = BT there), and the block
    size."""

    BD: int = 64
    threads: int = 128


@dataclass(frozen=True)
class GlaChunkConfig:
    """the per-key-gate chunk kernels (`gla.chunk`: the output, dv and dq/dk stages, which GSA and RWKV6 share): the key
    and value tiles and the block size (the sub-chunk of the gated intra-chunk products stays at 16: it bounds the
    gates' span, so it is numerics, not a tile knob)."""

    BK: int = 64
    BV: int = 128
    threads: int = 256


@dataclass(frozen=True)
class BasedChunkConfig:
    """Based's fused chunk kernels (`based.fused_chunk`: the forward, dq and dk/dv walks): the V tile (the blocks are
    two warpgroups: a [BV, F] fp32 state overflows one)."""

    BV: int = 128


@dataclass(frozen=True)
class ParallelBasedFwdConfig:
    """parallel Based's forward (`based.parallel`, the attention form of Based and ReBased): the streamed key tile, the
    V tile, the pipeline depth and the block size."""

    BS: int = 64
    BV: int = 128
    num_stages: int = 2
    threads: int = 128


@dataclass(frozen=True)
class ParallelBasedBwdConfig:
    """parallel Based's dq and dk/dv passes (each block holds the whole padded V): the streamed tile, the pipeline
    depth and the block size."""

    BS: int = 64
    num_stages: int = 2
    threads: int = 128


@dataclass(frozen=True)
class BlockConfig:
    """a kernel whose only tile knob is its block size (its tiles are the chunk length by the padded head dims)."""

    threads: int = 128


@dataclass(frozen=True)
class DeltaRecurrentFwdConfig:
    """the delta rule's token-by-token forward (`delta_rule.fused_recurrent`): tokens staged per step, the value
    columns of a block, the lanes sharing a column's keys (the block is BV x KT threads) and the blocks an SM must
    hold (the register cap)."""

    TB: int = 16
    BV: int = 32
    KT: int = 4
    min_blocks: int = 4


@dataclass(frozen=True)
class DeltaRecurrentBwdConfig:
    """the delta rule's token-by-token backward sweeps (dk/dv, then dq/dk: one config for both, their partial sums
    over V tiles meet in dk): tokens staged per step, the value columns of a block and its size."""

    TB: int = 8
    BV: int = 128
    threads: int = 256


@dataclass(frozen=True)
class ChannelScanConfig:
    """the channel scans (HGRN's recurrence, GSA's slot normaliser: one thread a channel walks the tokens): tokens
    staged per step, the channels of a block (its size) and the copy pipeline's depth."""

    TB: int = 64
    BD: int = 64
    num_stages: int = 2


@dataclass(frozen=True)
class ColumnScanConfig:
    """the gate scans (`common.cumsum`: the chunk-local sums of the log gates, and the per-sequence and chunk-local
    reverse sums of their gradients): the columns (heads, or heads x keys) a block scans, one thread each."""

    BH: int = 32


@dataclass(frozen=True)
class CombineConfig:
    """the chunk ranges' state combine (`common.ranges.combine_states_kernel`): the value columns of a block, the key
    tile of its transition products, and the block size."""

    BV: int = 32
    BK: int = 32
    threads: int = 128


@dataclass(frozen=True)
class KeyScanConfig:
    """linear attention's chunk-wise key-sum scan (`linear_attn.normalize.chunk_scan_kernel`): the key tile each
    block carries through a sequence's chunks, and the block size."""

    BK: int = 64
    threads: int = 128


# ---------------------------------------------------------------- shared memory of each kernel, from its allocations


def _state_bk(K, BK) -> int:
    # the state passes split K in BK tiles when K is a multiple of it, else keep one padded tile
    return BK if K % BK == 0 else pad_dim(K)


def smem_chunk_fwd_h(K, V, dtype, c: ChunkFwdHConfig) -> int:
    # stages * (k [BT, BK] + v [BT, BV]) + vg [BT, BV]
    return ELEMENT_SIZE[dtype] * (c.num_stages * (BT * _state_bk(K, c.BK) + BT * c.BV) + BT * c.BV)


def smem_chunk_fwd_o(K, V, dtype, c: ChunkFwdOConfig) -> int:
    # q, k [BT, KP] + v [BT, BV] + h [KP, BV] + s [BT, BT]
    KP = pad_dim(K)
    return ELEMENT_SIZE[dtype] * (2 * BT * KP + BT * c.BV + KP * c.BV + BT * BT)


def smem_chunk_bwd_dh(K, V, dtype, c: ChunkBwdDhConfig) -> int:
    # stages * (q [BT, BK] + do [BT, BV]) + dog [BT, BV]
    return ELEMENT_SIZE[dtype] * (c.num_stages * (BT * _state_bk(K, c.BK) + BT * c.BV) + BT * c.BV)


def smem_chunk_bwd_dv(K, V, dtype, c: ChunkBwdDvConfig) -> int:
    # q, k [BT, KP] + do [BT, BV] + dh [KP, BV] + a [BT, BT]
    KP = pad_dim(K)
    return ELEMENT_SIZE[dtype] * (2 * BT * KP + BT * c.BV + KP * c.BV + BT * BT)


def smem_chunk_bwd_dqk(K, V, dtype, c: ChunkBwdDqkConfig) -> int:
    # q, k [BT, BK] + v, do [BT, BV] + h, dh [BK, BV] + ds [BT, BT]; its V-tile loop loads through registers, so the
    # pipeline keeps one buffer each (a copy per stage would put fp32 K = V = 128 at the defaults over the budget,
    # and that config launches)
    BK = min(c.BK, pad_dim(K))
    return ELEMENT_SIZE[dtype] * (2 * BT * BK + 2 * BT * c.BV + 2 * BK * c.BV + BT * BT)


def fused_chunk_smem(
    K: int, V: int, dtype: str, kind: str, BT: int = BT, BV: int = 64, num_stages: int = 2, smem_store: bool = False
) -> int:
    """bytes of dynamic shared memory a fused chunk kernel (`common.fused_chunk`, `kind` "fwd" or "dkv") asks for,
    by the formula of its allocations.

    fwd: stages * (q, k [BT, KP] + v [BT, BV]) + vg [BT, BV] + h [KP, BV] + s [BT, BT] (+ o [BT, BV])
    dkv: stages * (q, k [BT, KP] + v, do [BT, BV]) + x [BT, BV] + dh [KP, BV] + a [BT, BT] (+ dk [BT, KP], dv [BT, BV])
    dk is staged in fp32 when it is a partial sum over several V tiles. Checked against TileLang's lowering
    (`dyn_shared_memory_buf`): fwd fp32 K = V = 128, BV = 64, 2 stages lowers to 229376 bytes, the formula's number;
    the dkv kernel at the same sizes asks for 262144, more than sm_90 gives a block, as the budget predicts.
    """
    KP, es = pad_dim(K), ELEMENT_SIZE[dtype]
    nv_tiles = 1 if kind == "fwd" else 2
    staged = num_stages * (2 * BT * KP + nv_tiles * BT * BV)
    total = es * (staged + BT * BV + KP * BV + BT * BT)
    if smem_store:
        total += es * BT * BV
        if kind == "dkv":
            total += BT * KP * (es if cdiv(V, BV) == 1 else 4)
    return total


def smem_fused_chunk(kind: str) -> Callable:
    def smem(K, V, dtype, c: FusedChunkConfig) -> int:
        return fused_chunk_smem(K, V, dtype, kind, BV=c.BV, num_stages=c.num_stages, smem_store=c.smem_store)

    return smem


def smem_fused_recurrent(kind: str) -> Callable:
    def smem(K, V, dtype, c: FusedRecurrentConfig) -> int:
        # staged in fp32: fwd q, k [TB, KP] + v, o [TB, BV]; bwd a, k, ak [TB, KP] + v, do, av [TB, BV]
        KP = pad_dim(K, 16)
        n = 2 if kind == "fwd" else 3
        return 4 * n * (c.TB * KP + c.TB * c.BV)

    return smem


def smem_delta_pass(kind: str) -> Callable:
    """shared memory of a delta-rule pass ("fwd_h", "dhu", "fused") at a config: its pipelined chunk tiles (two stages
    for 16-bit inputs with K <= 128, else one: `delta_pass_stages`) plus its single tiles, as the kernels allocate
    them."""

    def smem(K, V, dtype, c: DeltaPassConfig) -> int:
        es, KP, BV = ELEMENT_SIZE[dtype], pad_dim(K), c.BV
        stages = delta_pass_stages(K, dtype)
        if kind == "fwd_h":  # k, v, Ai, beta per stage; aw, wn, h, vg, vn
            staged = es * (BT * KP + BT * BV + BT * BT) + 4 * BT
            single = es * (BT * BT + BT * KP + KP * BV + 2 * BT * BV)
        elif kind == "dhu":  # q, k, Ai, beta, do per stage; aw, a, dog, dvo, t, dh
            staged = es * (2 * BT * KP + BT * BT + BT * BV) + 4 * BT
            single = es * (2 * BT * BT + 3 * BT * BV + KP * BV)
        else:  # q, k, w, u per stage; vn, vg, h, s, o
            staged = es * (3 * BT * KP + BT * BV)
            single = es * (3 * BT * BV + KP * BV + BT * BT)
        return stages * staged + single

    return smem


def smem_wy_fwd(K, V, dtype, c: WyConfig) -> int:
    # k [BT, KP], Ai [BT, BT] and the product tile [BT, BD] in the input dtype; A, X [BT, BT], beta and the gate
    # [BT] in fp32
    es = ELEMENT_SIZE[dtype]
    return es * (BT * pad_dim(K) + BT * BT + BT * c.BD) + 4 * (2 * BT * BT + 2 * BT)


def smem_wy_bwd(K, V, dtype, c: WyConfig) -> int:
    # k, dw [BT, KP], v, du [BT, VP], Ai, M, G2 [BT, BT] in the input dtype; the staged tile [BT, BD] and five [BT]
    # rows (beta, gate, dbeta, db parts) in fp32
    es = ELEMENT_SIZE[dtype]
    return es * (2 * BT * pad_dim(K) + 2 * BT * pad_dim(V) + 3 * BT * BT) + 4 * (BT * c.BD + 5 * BT)


def wy_rule(K: int, V: int, dtype: str, config: WyConfig) -> bool:
    """the column tile divides the padded key and value dims (the stages slice their [BT, KP] / [BT, VP] tiles)."""
    return pad_dim(K) % config.BD == 0 and pad_dim(V) % config.BD == 0


def smem_chunk_delta_bwd_dqkw(K, V, dtype, c: ChunkBwdDqkConfig) -> int:
    # v, do, du [BT, BV] + h, dh [BK, BV] (the V-tile loop loads through registers: one buffer each) + q, k [BT, BK] +
    # ds [BT, BT]; the staged output [BT, BK] shares the loop's buffers (an upper bound of TileLang's lowering: bf16
    # K = V = 128 at the default lowers to 91136 bytes, this counts 98304)
    BK = min(c.BK, pad_dim(K))
    return ELEMENT_SIZE[dtype] * (3 * BT * c.BV + 2 * BK * c.BV + 2 * BT * BK + BT * BT)


def smem_gla_chunk(kind: str) -> Callable:
    """shared memory of a per-key-gate chunk kernel ("fwd_o", "dv", "dqk") at a config, by its allocations."""

    def smem(K, V, dtype, c: GlaChunkConfig) -> int:
        es, BK, BV = ELEMENT_SIZE[dtype], min(c.BK, pad_dim(K)), min(c.BV, pad_dim(V))
        if kind == "fwd_o":  # q, k, qg, kg [BT, BK] + h [BK, BV] + v [BT, BV] + a [BT, BT]; fp32 g [BT, BK], d, bonus
            return es * (4 * BT * BK + BK * BV + BT * BV + BT * BT) + 4 * (BT * BK + BT * 16 + BT)
        if kind == "dv":  # a [BT, BT] + do [BT, BV] + kg [BT, BK] + dh [BK, BV]
            return es * (BT * BT + BT * BV + BT * BK + BK * BV)
        # v, do [BT, BV] + h, dh [BK, BV] + q, k, x [BT, BK] + da [BT, BT]; fp32 g [BT, BK], da [BT, BT]
        return es * (2 * BT * BV + 2 * BK * BV + 3 * BT * BK + BT * BT) + 4 * (BT * BK + BT * BT)

    return smem


def small_grid(V: int, blocks: int | None, sms: int | None) -> bool:
    """whether `blocks` sequences x heads with V tiles of 128 leave more than a quarter of `sms` multiprocessors idle
    (8 sequences x 16 heads at V = 128 are 128 blocks: not small; 2 x 16 are); False without a grid."""
    return blocks is not None and sms is not None and 4 * blocks * cdiv(V, 128) < 3 * sms


def based_feature_dims(K: int) -> int:
    """Based's padded feature count: 1 + K + K (K + 1) / 2 rounded up to 32 (160 at K = 16)."""
    return cdiv(1 + K + K * (K + 1) // 2, 32) * 32


# the margin Based's fused chunk arithmetic keeps under the block budget: it counts the tiles the kernels allocate,
# not TileLang's own buffers
BASED_SMEM_MARGIN = 15 * 1024


def smem_based_chunk(stage: str) -> Callable:
    """shared memory of a Based fused chunk stage ("fwd", "dq", "dkv") at a config, plus `BASED_SMEM_MARGIN`: the
    feature tables and state, the key tiles (padded to 16) and their fp32 augmented rows, the [BT, F] feature tiles,
    the [BV, F] state copy, and per stage its value / score tiles."""

    def smem(K, V, dtype, c: BasedChunkConfig) -> int:
        elt, KP, KA, FP, BV = ELEMENT_SIZE[dtype], cdiv(K, 16) * 16, K + 1, based_feature_dims(K), c.BV
        common = 4 * 4 * FP + 8 * KP * KA + 2 * BT * (elt * KP + 4 * KA) + 2 * elt * BT * FP + elt * BV * FP
        if stage == "fwd":
            tiles = elt * (BT * BV + BT * BT) + 4 * BT * BT
        else:
            tiles = 2 * elt * BT * BV + 4 * BT + 4 * BT * FP + elt * KP * BT
            tiles += elt * BT * BT if stage == "dq" else 2 * elt * BT * BT + elt * BV * FP
        return common + tiles + BASED_SMEM_MARGIN

    return smem


def based_chunk_heuristic(stage: str) -> Callable:
    """the V tile of a Based fused chunk stage over `blocks` sequences x heads on `sms` multiprocessors: 128 (one tile
    for V <= 128) while the shared memory fits, else 64; 64 also while V tiles of 128 leave a quarter of the
    multiprocessors idle (the blocks walk whole sequences: 2 sequences x 16 heads are 32 blocks)."""
    fits = smem_based_chunk(stage)

    def heuristic(K, V, dtype, *, blocks: int | None = None, sms: int | None = None, **_) -> BasedChunkConfig:
        wide = V > 64 and fits(K, V, dtype, BasedChunkConfig(BV=128)) <= SMEM_BUDGET
        return BasedChunkConfig(BV=128 if wide and not small_grid(V, blocks, sms) else 64)

    return heuristic


# fla's limit on fused_chunk_based's feature dim (its Taylor features grow as K^2)
BASED_CHUNK_MAX_K = 16


def based_chunk_launches(K: int, V: int, dtype: str) -> bool:
    """Based's fused chunk walks take feature dims up to `BASED_CHUNK_MAX_K` and 16-bit inputs (fp32 takes the
    attention form)."""
    return K <= BASED_CHUNK_MAX_K and ELEMENT_SIZE[dtype] == 2


# the margin parallel Based's arithmetic keeps under the block budget (it counts its tiles, not TileLang's buffers)
PARALLEL_BASED_SMEM_MARGIN = 25 * 1024
# the widest feature / key dim the attention form takes
PARALLEL_BASED_MAX_K = 128


def parallel_based_launches(K: int, V: int, dtype: str) -> bool:
    return K <= PARALLEL_BASED_MAX_K


def smem_parallel_based(stage: str) -> Callable:
    """shared memory of a parallel Based stage ("fwd", "dq", "dkv") at a config, plus `PARALLEL_BASED_SMEM_MARGIN`: the
    resident [BT, *] tiles plus num_stages copies of the streamed [BS, *] ones."""

    def smem(K, V, dtype, c) -> int:
        elt, KP, VP, BS, stages = ELEMENT_SIZE[dtype], pad_dim(K), pad_dim(V), c.BS, c.num_stages
        if stage == "fwd":
            n = elt * (BT * KP + BT * BS + stages * BS * (KP + min(c.BV, VP)))
        elif stage == "dq":
            n = elt * (BT * (KP + VP) + BT * BS + stages * BS * (KP + VP)) + 4 * BT
        else:
            n = elt * (BT * (KP + VP) + 2 * BT * BS + stages * BS * (KP + VP)) + 4 * stages * BS
        return n + PARALLEL_BASED_SMEM_MARGIN

    return smem


def parallel_based_heuristic(stage: str) -> Callable:
    """the tiles of a parallel Based stage: the most pipeline stages, then the widest streamed tile, whose shared
    memory fits; V tiles of 128 (no wider than V); two warpgroups for the dk, dv accumulators of a wide V (V > 128)
    and of fp32 inputs (with 128 threads their TF32 mma operands spill registers)."""
    smem = smem_parallel_based(stage)

    def heuristic(K, V, dtype, **_):
        base = ParallelBasedFwdConfig(BV=min(128, pad_dim(V))) if stage == "fwd" else ParallelBasedBwdConfig()
        for BS, num_stages in ((64, 2), (64, 1), (32, 2), (32, 1)):
            config = dataclasses.replace(base, BS=BS, num_stages=num_stages)
            if smem(K, V, dtype, config) <= SMEM_BUDGET:
                break
        wide = stage == "dkv" and (pad_dim(V) > 128 or ELEMENT_SIZE[dtype] == 4)
        return dataclasses.replace(config, threads=256 if wide else 128)

    return heuristic


def smem_rwkv6_bonus(kind: str) -> Callable:
    """shared memory of RWKV6's bonus kernels ("fwd", "bwd"): r, k [BT, KP] (the backward also v, do [BT, VP]) in the
    input dtype; u [KP] and the per-token scores [BT] (the backward two) in fp32."""

    def smem(K, V, dtype, c: BlockConfig) -> int:
        es, KP, VP = ELEMENT_SIZE[dtype], pad_dim(K), pad_dim(V)
        if kind == "fwd":
            return es * 2 * BT * KP + 4 * (KP + BT)
        return es * (2 * BT * KP + 2 * BT * VP) + 4 * (KP + 2 * BT)

    return smem


def smem_normalize(kind: str) -> Callable:
    """shared memory of linear attention's key-sum normalisation kernels (`linear_attn.normalize`): the scan keeps its
    tiles in registers; the forward stages q, k [BT, KP] in the input dtype, the key sum [KP] and the denominators
    [BT] in fp32; the dq/dk pass q, k and the row weights [BT]; the do/c pass the denominators."""

    def smem(K, V, dtype, c) -> int:
        es, KP = ELEMENT_SIZE[dtype], pad_dim(K)
        return {"scan": 0, "fwd": es * 2 * BT * KP + 4 * (KP + BT), "bwd_c": 4 * BT,
                "bwd_dqk": es * 2 * BT * KP + 4 * BT}[kind]

    return smem


def delta_recurrent_fwd_heuristic(K, V, dtype, **_) -> DeltaRecurrentFwdConfig:
    """4 lanes a column up to K = 128 (8 beyond), 128 threads, at most 128 registers a thread (4 blocks an SM), so B *
    HV * V / 32 blocks fill the GPU in one wave at the benchmark shape."""
    KT = 4 if pad_dim(K) <= 128 else 8
    return DeltaRecurrentFwdConfig(TB=16, BV=128 // KT, KT=KT, min_blocks=4)


def delta_recurrent_bwd_heuristic(K, V, dtype, **_) -> DeltaRecurrentBwdConfig:
    """a lane holds KP / 32 key rows of 16 columns (8 beyond K = 128), up to 8 warps over V."""
    RV = 16 if pad_dim(K) <= 128 else 8
    W = min(8, cdiv(V, RV))
    return DeltaRecurrentBwdConfig(TB=8, BV=RV * W, threads=32 * W)


def delta_recurrent_fwd_rule(K, V, dtype, c: DeltaRecurrentFwdConfig) -> bool:
    """a column's KT lanes sit in one warp (a power of two), at most 64 key rows a lane (its registers), whole warps."""
    R = pad_dim(K) // c.KT
    return c.KT in (1, 2, 4, 8, 16, 32) and R <= 64 and 32 <= c.BV * c.KT <= 1024 and c.BV * c.KT % 32 == 0


def delta_recurrent_bwd_rule(K, V, dtype, c: DeltaRecurrentBwdConfig) -> bool:
    """whole warps, each holding a power of two from 4 to 32 of the block's columns (`_bwd_layout`)."""
    W = c.threads // 32
    if c.threads % 32 or c.BV % W:
        return False
    RV = c.BV // W
    return RV & (RV - 1) == 0 and 4 <= RV <= 32


def smem_delta_recurrent(kind: str) -> Callable:
    """shared memory of the delta rules' token-by-token kernels, all fp32: the forward stages q, k [TB, KP], v, o, w
    [TB, BV], beta [TB] and the decays [TB, KP] (a per-key gate's; a per-token gate's take [TB]); the backward's dk/dv
    sweep q, k, do, u, du, the decays and per-warp dk partials [TB, W, KP], its dq/dk sweep k, do, u, dv, the decays
    and per-warp dq, dk partials (the larger of the two counts). The decays are counted at the per-key size, so one
    config fits every gate."""

    def smem(K, V, dtype, c) -> int:
        KP = pad_dim(K)
        if kind == "fwd":
            return 4 * (3 * c.TB * KP + 3 * c.TB * c.BV + c.TB)
        W = c.threads // 32
        dkv = 3 * c.TB * KP + 3 * c.TB * c.BV + c.TB + c.TB * W * KP
        dqk = 2 * c.TB * KP + 3 * c.TB * c.BV + 2 * c.TB * W * KP
        return 4 * max(dkv, dqk)

    return smem


def smem_column_scan(K, V, dtype, c: ColumnScanConfig) -> int:
    """a gate scan stages one [BT, BH] tile of fp32 (or 16-bit gates: counted as fp32) per block."""
    return 4 * BT * c.BH


def smem_combine(K, V, dtype, c: CombineConfig) -> int:
    """the combine stages the running state [KP, BV] and a transition tile [KP, BK] in fp32 (KP: K padded to BK)."""
    KP = cdiv(K, c.BK) * c.BK
    return 4 * KP * (c.BV + c.BK)


def smem_none(K, V, dtype, c) -> int:
    """a kernel that keeps its tiles in registers."""
    return 0


def smem_channel_scan(tiles: tuple[int, ...]) -> Callable:
    """shared memory of a channel scan staging one [TB, BD] tile per entry of `tiles` (0: the input dtype, else that
    many bytes an element: fp32 gates and normalisers count 4) in each pipeline stage."""

    def smem(K, V, dtype, c: ChannelScanConfig) -> int:
        return c.num_stages * c.TB * c.BD * sum(t or ELEMENT_SIZE[dtype] for t in tiles)

    return smem


# the widest head dim the Titans kernels take (their [D, D] memories live in shared memory)
TITANS_MAX_D = 128


def titans_launches(kind: str) -> Callable:
    """(K, V, dtype) -> whether the Titans ops launch kernel `kind` there: head dims that are multiples of 16 up to
    `TITANS_MAX_D`; the backward for 16-bit inputs whose tiles fit (the others take the PyTorch recompute)."""

    def launches(K, V, dtype) -> bool:
        if K % 16 or K > TITANS_MAX_D:
            return False
        return kind == "fwd" or (ELEMENT_SIZE[dtype] == 2 and smem_titans("bwd")(K, V, dtype, None) <= SMEM_BUDGET)

    return launches


# the chunk length the Titans kernels' shared-memory arithmetic counts (their factories' default; the op's chunk_size
# sets it per call, and the block size, the only knob, does not change what it takes)
TITANS_BT = 16


def smem_titans(kind: str) -> Callable:
    """shared memory of the Titans chunk kernels (`titans.chunk`) at chunk length `TITANS_BT`: the forward stages the
    memories M, S [D, D], five [BT, D] tiles and the [BT, BT] attention in q's dtype and two [BT, D] fp32 tiles; the
    backward four [D, D] and nine [BT, D] tiles in q's dtype and five [BT, D] fp32 tiles."""

    def smem(K, V, dtype, c) -> int:
        es, D, BT_ = ELEMENT_SIZE[dtype], K, TITANS_BT
        if kind == "fwd":
            return es * (2 * D * D + 5 * BT_ * D + BT_ * BT_) + 4 * 2 * BT_ * D
        return es * (4 * D * D + 9 * BT_ * D + BT_ * BT_) + 4 * 5 * BT_ * D

    return smem


def key_scan_rule(K: int, V: int, dtype: str, config: KeyScanConfig) -> bool:
    """the key tile divides the padded K (each block owns whole tiles)."""
    return config.BK <= pad_dim(K) and pad_dim(K) % config.BK == 0


def delta_pass_stages(K: int, dtype: str) -> int:
    """pipeline stages of the delta-rule state passes: two for 16-bit inputs with K <= 128, else one (two stages of
    [64, 256] key tiles, or of fp32 tiles, overflow shared memory)."""
    return 2 if pad_dim(K) <= 128 and ELEMENT_SIZE[dtype] == 2 else 1


# ---------------------------------------------------------------- registry of tunable kernels


@dataclass(frozen=True)
class TunableKernel:
    name: str
    config_cls: type
    smem: Callable
    space: dict  # field -> candidate values
    heuristic: Callable  # (K, V, dtype, *, gate) -> config, gate the launch's gate option (None: unknown)
    factory: str  # "module:function" of the kernel factory the configs feed (its module's source hash keys the table)
    # the heuristic also takes the launch's grid: (K, V, dtype, *, gate, blocks, sms) with `blocks` sequences x heads
    # and `sms` the GPU's multiprocessors (the defaults' small-grid rules)
    grid: bool = False
    # a launch rule beyond shared memory and tile width, (K, V, dtype, config) -> bool, or None
    rule: Callable | None = None
    # (K, V, dtype) -> whether the ops launch the kernel at these dims, or None (always)
    launches: Callable | None = None
    # the gate option of a kernel whose factory takes no gate keyword (it always runs that one), or None
    gate: str | None = None
    # "module:function" of the factories launched beside this one with the same config (their tiles must agree)
    companions: tuple[str, ...] = ()
    # False for a kernel over rows of any width with no head dims (the channel scans): its table keys take K = V = 0
    head_dims: bool = True
    # the dtype its table keys take for a kernel that works on fp32 whatever the op's dtype (the gate scans), or None
    # (the launch's input dtype)
    dtype: str | None = None

    def fits(self, K: int, V: int, dtype: str, config) -> bool:
        """whether the config launches: shared memory within the budget, tiles no wider than the padded dims."""
        if getattr(config, "BV", 0) > pad_dim(V):
            return False
        if self.rule is not None and not self.rule(K, V, dtype, config):
            return False
        return self.smem(K, V, dtype, config) <= SMEM_BUDGET

    def candidates(self, K: int, V: int, dtype: str, gate: str | None = None) -> list:
        """every config of the search space that fits, the heuristic default at gate option `gate` first."""
        default = self.heuristic(K, V, dtype, gate=gate)
        out = [default]
        fields = list(self.space)
        for values in itertools.product(*(self.space[f] for f in fields)):
            config = dataclasses.replace(default, **dict(zip(fields, values)))
            if config not in out and self.fits(K, V, dtype, config):
                out.append(config)
        return out


# ---------------------------------------------------------------- heuristic defaults


def fused_chunk_config(K: int, V: int, dtype: str, kind: str) -> dict:
    """the heuristic tile config of a fused chunk kernel: the first candidate whose shared memory fits the budget.

    Candidates run from the widest V tile (q and k are read once for more of V) and the deepest pipeline down; a
    shared-memory store of full chunks (one bulk copy instead of row stores from registers) is preferred at each size.
    256 threads (two consumer warpgroups) once the state tile [KP, BV] holds more than 128 x 64 fp32 values, so it
    stays at 64 registers per thread or below (a wider state on 128 threads spills registers: fused_chunk_based's
    fp32 feature maps, K = 153, for one)."""
    for BV, num_stages in ((128, 2), (64, 2), (128, 1), (64, 1), (32, 2), (32, 1), (16, 1)):
        if BV > pad_dim(V):
            continue
        for smem_store in (True, False):
            if fused_chunk_smem(K, V, dtype, kind, BV=BV, num_stages=num_stages, smem_store=smem_store) <= SMEM_BUDGET:
                threads = 256 if pad_dim(K) * BV > 128 * 64 else 128
                return dict(BV=BV, num_stages=num_stages, threads=threads, smem_store=smem_store)
    raise ValueError(f"no fused_chunk tile config fits K={K}, V={V}, dtype={dtype}")


def fused_recurrent_bwd_config(K: int, V: int) -> dict:
    """the heuristic tiles of the token-by-token backward: one V tile up to 128 wide where the state fits registers,
    so dq and dk are written once in the input dtype instead of as fp32 partial sums over V tiles (four 32-wide tiles
    hold eight times the memory of bf16 dq and dk)."""
    BV = 128 if V > 64 and pad_dim(K, 16) <= 128 else 64
    threads = 256 if pad_dim(K, 16) * BV >= 128 * 128 else 128
    return dict(BV=BV, threads=threads)


def _fused_heuristic(kind: str) -> Callable:
    def heuristic(K, V, dtype, **_) -> FusedChunkConfig:
        return FusedChunkConfig(**fused_chunk_config(K, V, dtype, kind))

    return heuristic


def _recurrent_bwd_heuristic(K, V, dtype, **_) -> FusedRecurrentConfig:
    return FusedRecurrentConfig(**fused_recurrent_bwd_config(K, V))


def _constant(config) -> Callable:
    return lambda K, V, dtype, **_: config


def _narrowed(config) -> Callable:
    """the config with its V tile no wider than the padded V (the kernel's own clamp)."""
    return lambda K, V, dtype, **_: dataclasses.replace(config, BV=min(config.BV, pad_dim(V)))


def delta_dqkw_heuristic(K, V, dtype, *, gate=None, **_) -> "ChunkBwdDqkConfig":
    """the delta rules' dq / dk / dw pass: for 16-bit inputs one pipeline stage over V tiles of 128, K tiles of 128
    under a per-token gate and of 64 without one (the tuned winners at K = V = 128 on the H100, 5-9% faster than the
    class defaults there); the class defaults for fp32 inputs and under the per-key gate (whose gate tiles take the
    shared memory)."""
    if ELEMENT_SIZE[dtype] == 2 and gate in ("none", "g"):
        return ChunkBwdDqkConfig(BK=128 if gate == "g" else 64, BV=min(128, pad_dim(V)), num_stages=1)
    return ChunkBwdDqkConfig()


def wy_fwd_heuristic(K, V, dtype, *, gate=None, **_) -> "WyConfig":
    """the WY forward: column tiles of 128 under a per-token gate where they divide the padded head dims (the tuned
    winner at K = V = 128 on the H100, 4% faster than 64 there), else the class default."""
    if gate == "g" and pad_dim(K) % 128 == 0 and pad_dim(V) % 128 == 0:
        return WyConfig(BD=128)
    return WyConfig()


def _state_pass_heuristic(cls) -> Callable:
    """the chunk state passes (chunk_fwd_h, chunk_bwd_dh): the class defaults, and under GLA's per-key gate ("gk")
    V tiles of 128 on two warpgroups (faster there than BK = BV = 64 on 128 threads)."""

    def heuristic(K, V, dtype, *, gate=None, **_):
        return cls(BK=64, BV=min(128, pad_dim(V)), num_stages=2, threads=256) if gate == "gk" else cls()

    return heuristic


def delta_pass_configs(K: int, V: int, dtype: str, gate: str) -> list[DeltaPassConfig]:
    """the heuristic tile configs of the delta-rule passes (bf16, K = V = 128, H100): for 16-bit inputs with K <= 128
    the large-grid one (V tiles of 128 with two consumer warpgroups: the fastest of the space at 8 x 4096 x 16 heads
    in every pass, gated or not; no wider than V), then the small-grid one (more, narrower tiles so more blocks run:
    V tiles of 32 with two warpgroups, the fastest at 2 x 16384 x 16 heads in five of the six passes, gated or not,
    and 14% behind one warpgroup in the ungated fused forward); otherwise only the kernels' defaults (fp32 inputs
    with two consumer warpgroups gave dhu wrong dk: 5% off)."""
    if K > 128 or ELEMENT_SIZE[dtype] != 2:
        return [DeltaPassConfig()]
    return [DeltaPassConfig(BV=min(128, pad_dim(V)), threads=256), DeltaPassConfig(BV=min(32, pad_dim(V)), threads=256)]


def delta_pass_heuristic(K: int, V: int, dtype: str, *, gate: str = "none", blocks: int | None = None,
                         sms: int | None = None) -> DeltaPassConfig:
    """the default of a delta-rule pass over `blocks` sequences x heads on `sms` multiprocessors: the large-grid
    config while a grid of V tiles of 128 covers three quarters of the multiprocessors (8 sequences x 16 heads at
    V = 128: 128 blocks), else the small-grid one (e.g. 2 sequences x 16 heads); the large-grid one without a grid."""
    configs = delta_pass_configs(K, V, dtype, gate)
    return configs[-1] if small_grid(V, blocks, sms) else configs[0]


def delta_pass_rule(K: int, V: int, dtype: str, config: DeltaPassConfig) -> bool:
    """two consumer warpgroups only for 16-bit inputs (fp32 inputs with two gave dhu wrong dk)."""
    return config.threads == 128 or ELEMENT_SIZE[dtype] == 2


# the widest fp32 keys the delta rules' chunk kernels take (their fp32 tiles overflow shared memory beyond)
DELTA_MAX_K_FP32 = 128


def delta_pass_launches(kind: str) -> Callable:
    """(K, V, dtype) -> whether the delta rules launch pass `kind` there: the state passes for keys up to 256 (fp32:
    `DELTA_MAX_K_FP32`), the fused forward up to 128 (fp32: 64: it holds q, k and w tiles in shared memory)."""

    def launches(K: int, V: int, dtype: str) -> bool:
        wide = ELEMENT_SIZE[dtype] == 2
        if kind == "fused":
            return K <= (128 if wide else 64)
        return K <= (256 if wide else DELTA_MAX_K_FP32)

    return launches


KERNELS = {
    k.name: k
    for k in (
        TunableKernel(
            "chunk_fwd_h", ChunkFwdHConfig, smem_chunk_fwd_h,
            {"BK": (64, 128), "BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256)},
            _state_pass_heuristic(ChunkFwdHConfig),
            "fla_tl.kernels.common.chunk_h:chunk_fwd_h_kernel",
        ),
        TunableKernel(
            "chunk_fwd_o", ChunkFwdOConfig, smem_chunk_fwd_o,
            {"BV": (32, 64, 128), "threads": (128, 256)}, _constant(ChunkFwdOConfig()),
            "fla_tl.kernels.common.chunk_o:chunk_fwd_o_kernel",
        ),
        TunableKernel(
            "chunk_bwd_dh", ChunkBwdDhConfig, smem_chunk_bwd_dh,
            {"BK": (64, 128), "BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256)},
            _state_pass_heuristic(ChunkBwdDhConfig),
            "fla_tl.kernels.common.chunk_h:chunk_bwd_dh_kernel",
        ),
        TunableKernel(
            "chunk_bwd_dv", ChunkBwdDvConfig, smem_chunk_bwd_dv,
            {"BV": (32, 64, 128), "threads": (128, 256)}, _constant(ChunkBwdDvConfig()),
            "fla_tl.kernels.common.chunk_o:chunk_bwd_dv_kernel",
        ),
        TunableKernel(
            "chunk_bwd_dqk", ChunkBwdDqkConfig, smem_chunk_bwd_dqk,
            {"BK": (64, 128), "BV": (32, 64, 128), "num_stages": (1, 2), "threads": (128, 256)},
            _constant(ChunkBwdDqkConfig()),
            "fla_tl.kernels.common.chunk_o:chunk_bwd_dqk_kernel",
        ),
        TunableKernel(
            "fused_chunk_fwd", FusedChunkConfig, smem_fused_chunk("fwd"),
            {"BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256), "smem_store": (True, False)},
            _fused_heuristic("fwd"),
            "fla_tl.kernels.common.fused_chunk:fused_chunk_fwd_kernel",
        ),
        TunableKernel(
            "fused_chunk_bwd_dkv", FusedChunkConfig, smem_fused_chunk("dkv"),
            {"BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256), "smem_store": (True, False)},
            _fused_heuristic("dkv"),
            "fla_tl.kernels.common.fused_chunk:fused_chunk_bwd_dkv_kernel",
        ),
        TunableKernel(
            "fused_recurrent_fwd", FusedRecurrentConfig, smem_fused_recurrent("fwd"),
            {"TB": (8, 16, 32), "BV": (16, 32, 64), "threads": (128, 256)}, _constant(FusedRecurrentConfig()),
            "fla_tl.kernels.common.fused_recurrent:fused_recurrent_fwd_kernel",
        ),
        TunableKernel(
            "fused_recurrent_bwd", FusedRecurrentConfig, smem_fused_recurrent("bwd"),
            {"TB": (8, 16, 32), "BV": (32, 64, 128), "threads": (128, 256)}, _recurrent_bwd_heuristic,
            "fla_tl.kernels.common.fused_recurrent:fused_recurrent_bwd_kernel",
        ),
        TunableKernel(
            "chunk_delta_fwd_h", DeltaPassConfig, smem_delta_pass("fwd_h"),
            {"BV": (32, 64, 128), "threads": (128, 256)}, delta_pass_heuristic,
            "fla_tl.kernels.common.chunk_delta_h:chunk_delta_fwd_h_kernel", grid=True, rule=delta_pass_rule,
            launches=delta_pass_launches("fwd_h"),
        ),
        TunableKernel(
            "chunk_delta_bwd_dhu", DeltaPassConfig, smem_delta_pass("dhu"),
            {"BV": (32, 64, 128), "threads": (128, 256)}, delta_pass_heuristic,
            "fla_tl.kernels.common.chunk_delta_h:chunk_delta_bwd_dhu_kernel", grid=True, rule=delta_pass_rule,
            launches=delta_pass_launches("dhu"),
        ),
        TunableKernel(
            "fused_chunk_delta_fwd", DeltaPassConfig, smem_delta_pass("fused"),
            {"BV": (32, 64, 128), "threads": (128, 256)}, delta_pass_heuristic,
            "fla_tl.kernels.common.fused_chunk_delta:fused_chunk_delta_fwd_kernel", grid=True, rule=delta_pass_rule,
            launches=delta_pass_launches("fused"),
        ),
        TunableKernel(
            "chunk_gla_fwd_o", GlaChunkConfig, smem_gla_chunk("fwd_o"),
            {"BK": (32, 64), "BV": (32, 64, 128), "threads": (128, 256)}, _narrowed(GlaChunkConfig()),
            "fla_tl.kernels.gla.chunk:chunk_gla_fwd_o_kernel", gate="gk",
        ),
        TunableKernel(
            "chunk_gla_bwd_dv", GlaChunkConfig, smem_gla_chunk("dv"),
            {"BK": (32, 64), "BV": (32, 64, 128), "threads": (128, 256)},
            _constant(GlaChunkConfig(BV=64, threads=128)),
            "fla_tl.kernels.gla.chunk:chunk_gla_bwd_dv_kernel", gate="gk",
        ),
        TunableKernel(
            "chunk_gla_bwd_dqk", GlaChunkConfig, smem_gla_chunk("dqk"),
            {"BK": (32, 64), "BV": (32, 64, 128), "threads": (128, 256)}, _narrowed(GlaChunkConfig()),
            "fla_tl.kernels.gla.chunk:chunk_gla_bwd_dqk_kernel", gate="gk",
        ),
        *(TunableKernel(
            f"based_{name}_fused_chunk", BasedChunkConfig, smem_based_chunk(stage), {"BV": (64, 128)},
            based_chunk_heuristic(stage), f"fla_tl.kernels.based.fused_chunk:based_{name}_fused_chunk_kernel",
            grid=True, gate="none", launches=based_chunk_launches,
        ) for name, stage in (("fwd", "fwd"), ("bwd_dq", "dq"), ("bwd_dkv", "dkv"))),
        TunableKernel(
            "parallel_based_fwd", ParallelBasedFwdConfig, smem_parallel_based("fwd"),
            {"BS": (32, 64), "BV": (64, 128), "num_stages": (1, 2), "threads": (128, 256)},
            parallel_based_heuristic("fwd"), "fla_tl.kernels.based.parallel:parallel_based_fwd_kernel", gate="none",
            launches=parallel_based_launches,
        ),
        *(TunableKernel(
            f"parallel_based_bwd_{stage}", ParallelBasedBwdConfig, smem_parallel_based(stage),
            {"BS": (32, 64), "num_stages": (1, 2), "threads": (128, 256)}, parallel_based_heuristic(stage),
            f"fla_tl.kernels.based.parallel:parallel_based_bwd_{stage}_kernel", gate="none",
            launches=parallel_based_launches,
        ) for stage in ("dq", "dkv")),
        TunableKernel(
            "rwkv6_fwd_bonus", BlockConfig, smem_rwkv6_bonus("fwd"), {"threads": (128, 256)}, _constant(BlockConfig()),
            "fla_tl.kernels.rwkv6.bonus:rwkv6_fwd_bonus_kernel", gate="none",
        ),
        TunableKernel(
            "rwkv6_bwd_bonus", BlockConfig, smem_rwkv6_bonus("bwd"), {"threads": (128, 256)},
            _constant(BlockConfig(threads=256)), "fla_tl.kernels.rwkv6.bonus:rwkv6_bwd_bonus_kernel", gate="none",
            launches=lambda K, V, dtype: smem_rwkv6_bonus("bwd")(K, V, dtype, BlockConfig()) <= SMEM_BUDGET,
        ),
        TunableKernel(
            "wy_fwd", WyConfig, smem_wy_fwd, {"BD": (32, 64, 128), "threads": (128, 256)}, wy_fwd_heuristic,
            "fla_tl.kernels.common.wy:wy_fwd_kernel", rule=wy_rule, launches=delta_pass_launches("fwd_h"),
        ),
        TunableKernel(
            "wy_bwd", WyConfig, smem_wy_bwd, {"BD": (64,), "threads": (128, 256)},
            _constant(WyConfig(threads=256)),
            "fla_tl.kernels.common.wy:wy_bwd_kernel", rule=wy_rule, launches=delta_pass_launches("fwd_h"),
        ),
        TunableKernel(
            "chunk_delta_bwd_dqkw", ChunkBwdDqkConfig, smem_chunk_delta_bwd_dqkw,
            {"BK": (64, 128), "BV": (32, 64, 128), "num_stages": (1, 2), "threads": (128, 256)},
            delta_dqkw_heuristic, "fla_tl.kernels.common.chunk_delta_h:chunk_delta_bwd_dqkw_kernel",
            launches=delta_pass_launches("fwd_h"),
        ),
        TunableKernel(
            "linear_attn_key_scan", KeyScanConfig, smem_normalize("scan"),
            {"BK": (32, 64, 128), "threads": (64, 128, 256)}, _constant(KeyScanConfig()),
            "fla_tl.kernels.linear_attn.normalize:chunk_scan_kernel", gate="none", rule=key_scan_rule,
        ),
        *(TunableKernel(
            f"linear_attn_normalize_{kind}", BlockConfig, smem_normalize(kind), {"threads": threads},
            _constant(BlockConfig()), f"fla_tl.kernels.linear_attn.normalize:normalize_{kind}_kernel", gate="none",
        ) for kind, threads in (("fwd", (128, 256)), ("bwd_c", (64, 128, 256)), ("bwd_dqk", (64, 128, 256)))),
        *(TunableKernel(
            f"titans_{kind}_chunk", BlockConfig, smem_titans(kind), {"threads": (128, 256)},
            _constant(BlockConfig(threads=256)), f"fla_tl.kernels.titans.chunk:titans_{kind}_chunk_kernel",
            gate="none", launches=titans_launches(kind),
        ) for kind in ("fwd", "bwd")),
        TunableKernel(
            "fused_recurrent_delta_fwd", DeltaRecurrentFwdConfig, smem_delta_recurrent("fwd"),
            {"TB": (8, 16, 32), "BV": (16, 32, 64), "KT": (2, 4, 8), "min_blocks": (2, 4)},
            delta_recurrent_fwd_heuristic,
            "fla_tl.kernels.common.fused_recurrent_delta:fused_recurrent_delta_rule_fwd_kernel",
            rule=delta_recurrent_fwd_rule,
        ),
        TunableKernel(
            "fused_recurrent_delta_bwd", DeltaRecurrentBwdConfig, smem_delta_recurrent("bwd"),
            {"TB": (4, 8, 16), "BV": (32, 64, 128), "threads": (64, 128, 256)}, delta_recurrent_bwd_heuristic,
            "fla_tl.kernels.common.fused_recurrent_delta:fused_recurrent_delta_rule_bwd_dkv_kernel",
            rule=delta_recurrent_bwd_rule,
            companions=("fla_tl.kernels.common.fused_recurrent_delta:fused_recurrent_delta_rule_bwd_dqk_kernel",),
        ),
        *(TunableKernel(
            name, ChannelScanConfig, smem_channel_scan(tiles),
            # (three pipeline stages do not lower: the slot normaliser's forward fails in TileLang's pipeliner)
            {"TB": (16, 32, 64, 128), "BD": (32, 64, 128, 256), "num_stages": (1, 2)},
            _constant(ChannelScanConfig(TB=TB)), factory, gate="none", head_dims=False,
        ) for name, tiles, TB, factory in (
            # HGRN: x and the gates (fp32 or x's dtype); the backward also o and do
            ("hgrn_fwd", (0, 4), 64, "fla_tl.kernels.hgrn.fused_recurrent:fused_recurrent_hgrn_fwd_kernel"),
            ("hgrn_bwd", (0, 4, 0, 0), 32, "fla_tl.kernels.hgrn.fused_recurrent:fused_recurrent_hgrn_bwd_kernel"),
            # GSA's slot normaliser: the slot logits; the backward also z, dsn and dg (fp32)
            ("slot_normaliser_fwd", (0,), 64, "fla_tl.kernels.gsa.normaliser:slot_normaliser_fwd_kernel"),
            ("slot_normaliser_bwd", (0, 4, 4, 4), 32, "fla_tl.kernels.gsa.normaliser:slot_normaliser_bwd_kernel"),
        )),
        *(TunableKernel(
            name, ColumnScanConfig, smem_column_scan, {"BH": (32, 64, 128, 256)}, _constant(ColumnScanConfig(BH=BH)),
            f"fla_tl.kernels.common.cumsum:{factory}", gate="none", head_dims=False, dtype="float32",
        ) for name, BH, factory in (
            ("gate_cumsum", 64, "chunk_gate_cumsum_kernel"),
            ("gate_grad_scan", 32, "sequence_cumsum_kernel"),
            ("gate_grad_chunk_scan", 32, "chunk_reverse_cumsum_kernel"),
        )),
        TunableKernel(
            "combine_states", CombineConfig, smem_combine,
            {"BV": (16, 32, 64), "BK": (16, 32, 64), "threads": (128, 256)}, _constant(CombineConfig()),
            "fla_tl.kernels.common.ranges:combine_states_kernel", gate="none", dtype="float32",
        ),
        # the gate gradients' row and state reductions (r = q . dq - k . dk per row, <S, dh> per chunk)
        TunableKernel(
            "gate_dot", BlockConfig, smem_none, {"threads": (64, 128, 256)}, _constant(BlockConfig()),
            "fla_tl.kernels.common.cumsum:gate_dot_kernel", gate="none",
        ),
        TunableKernel(
            "chunk_state_dot", BlockConfig, smem_none, {"threads": (64, 128, 256)}, _constant(BlockConfig()),
            "fla_tl.kernels.common.cumsum:chunk_state_dot_kernel", gate="none",
        ),
    )
}


def key_dims(name: str, kwargs: dict) -> tuple[int, int]:
    """(K, V) the table keys of kernel `name` take for a launch built with factory keywords `kwargs`: (0, 0) for a
    kernel without head dims; a factory over one head dim (K, V or D) takes it for both."""
    if not KERNELS[name].head_dims:
        return 0, 0
    K = kwargs.get("K", kwargs.get("D", kwargs.get("V")))
    return K, kwargs.get("V", K)


def n_tiles(V: int, config) -> int:
    """V tiles a config splits V into (the grid's first extent for the kernels that tile V)."""
    return cdiv(V, config.BV)
