"""Tile configs as data: for every TileLang kernel, a frozen dataclass of its factory's tile keywords, the heuristic
default, the search space, and the shared-memory arithmetic that filters out configs that cannot launch.

`factory(**dims, **asdict(config))` builds the kernel. The chunk length BT is fixed at 64 (every stage of a chunk op
must agree on it), so it is not a field. Sizes below are bytes; `es` is the input element size, KP the key dim padded
to the kernel's tile (64 for the chunk kernels, 16 for the recurrent ones).
"""

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from ..kernels.common.utils import cdiv, pad_dim

BT = 64
# sm_90 gives a block at most 227 KB of dynamic shared memory; 2 KB stay for barriers and alignment
SMEM_BUDGET = 225 * 1024
ELEMENT_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


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
    # pipeline keeps one buffer each (fp32, K = V = 128 with the defaults ran on an H100, where a per-stage copy
    # would not have fit)
    BK = min(c.BK, pad_dim(K))
    return ELEMENT_SIZE[dtype] * (2 * BT * BK + 2 * BT * c.BV + 2 * BK * c.BV + BT * BT)


def smem_fused_chunk(kind: str) -> Callable:
    def smem(K, V, dtype, c: FusedChunkConfig) -> int:
        from ..kernels.common.fused_chunk import fused_chunk_smem

        return fused_chunk_smem(K, V, dtype, kind, BV=c.BV, num_stages=c.num_stages, smem_store=c.smem_store)

    return smem


def smem_fused_recurrent(kind: str) -> Callable:
    def smem(K, V, dtype, c: FusedRecurrentConfig) -> int:
        # staged in fp32: fwd q, k [TB, KP] + v, o [TB, BV]; bwd a, k, ak [TB, KP] + v, do, av [TB, BV]
        KP = pad_dim(K, 16)
        n = 2 if kind == "fwd" else 3
        return 4 * n * (c.TB * KP + c.TB * c.BV)

    return smem


# ---------------------------------------------------------------- registry of tunable kernels


@dataclass(frozen=True)
class TunableKernel:
    name: str
    config_cls: type
    smem: Callable
    space: dict  # field -> candidate values
    heuristic: Callable  # (K, V, dtype) -> config

    def fits(self, K: int, V: int, dtype: str, config) -> bool:
        """whether the config launches: shared memory within the budget, tiles no wider than the padded dims."""
        if getattr(config, "BV", 0) > pad_dim(V):
            return False
        return self.smem(K, V, dtype, config) <= SMEM_BUDGET

    def candidates(self, K: int, V: int, dtype: str) -> list:
        """every config of the search space that fits, the heuristic default first."""
        default = self.heuristic(K, V, dtype)
        out = [default]
        fields = list(self.space)
        for values in itertools.product(*(self.space[f] for f in fields)):
            config = dataclasses.replace(default, **dict(zip(fields, values)))
            if config not in out and self.fits(K, V, dtype, config):
                out.append(config)
        return out


def _fused_heuristic(kind: str) -> Callable:
    def heuristic(K, V, dtype) -> FusedChunkConfig:
        from ..kernels.common.fused_chunk import fused_chunk_config

        return FusedChunkConfig(**fused_chunk_config(K, V, dtype, kind))

    return heuristic


def _recurrent_bwd_heuristic(K, V, dtype) -> FusedRecurrentConfig:
    from ..kernels.common.fused_recurrent import fused_recurrent_bwd_config

    return FusedRecurrentConfig(**fused_recurrent_bwd_config(K, V))


def _constant(config) -> Callable:
    return lambda K, V, dtype: config


KERNELS = {
    k.name: k
    for k in (
        TunableKernel(
            "chunk_fwd_h", ChunkFwdHConfig, smem_chunk_fwd_h,
            {"BK": (64, 128), "BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256)},
            _constant(ChunkFwdHConfig()),
        ),
        TunableKernel(
            "chunk_fwd_o", ChunkFwdOConfig, smem_chunk_fwd_o,
            {"BV": (32, 64, 128), "threads": (128, 256)}, _constant(ChunkFwdOConfig()),
        ),
        TunableKernel(
            "chunk_bwd_dh", ChunkBwdDhConfig, smem_chunk_bwd_dh,
            {"BK": (64, 128), "BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256)},
            _constant(ChunkBwdDhConfig()),
        ),
        TunableKernel(
            "chunk_bwd_dv", ChunkBwdDvConfig, smem_chunk_bwd_dv,
            {"BV": (32, 64, 128), "threads": (128, 256)}, _constant(ChunkBwdDvConfig()),
        ),
        TunableKernel(
            "chunk_bwd_dqk", ChunkBwdDqkConfig, smem_chunk_bwd_dqk,
            {"BK": (64, 128), "BV": (32, 64, 128), "num_stages": (1, 2), "threads": (128, 256)},
            _constant(ChunkBwdDqkConfig()),
        ),
        TunableKernel(
            "fused_chunk_fwd", FusedChunkConfig, smem_fused_chunk("fwd"),
            {"BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256), "smem_store": (True, False)},
            _fused_heuristic("fwd"),
        ),
        TunableKernel(
            "fused_chunk_bwd_dkv", FusedChunkConfig, smem_fused_chunk("dkv"),
            {"BV": (32, 64, 128), "num_stages": (1, 2, 3), "threads": (128, 256), "smem_store": (True, False)},
            _fused_heuristic("dkv"),
        ),
        TunableKernel(
            "fused_recurrent_fwd", FusedRecurrentConfig, smem_fused_recurrent("fwd"),
            {"TB": (8, 16, 32), "BV": (16, 32, 64), "threads": (128, 256)}, _constant(FusedRecurrentConfig()),
        ),
        TunableKernel(
            "fused_recurrent_bwd", FusedRecurrentConfig, smem_fused_recurrent("bwd"),
            {"TB": (8, 16, 32), "BV": (32, 64, 128), "threads": (128, 256)}, _recurrent_bwd_heuristic,
        ),
    )
}


def n_tiles(V: int, config) -> int:
    """V tiles a config splits V into (the grid's first extent for the kernels that tile V)."""
    return cdiv(V, config.BV)
