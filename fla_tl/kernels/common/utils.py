"""Compile cache, targets and sequence metadata shared by every TileLang launcher.

Global-memory offsets: a factory declares its extents as int32 dynamic dims (`T.dynamic("Ttot")`), and tensors past
2^31 elements (q at T * H * K, the chunk states at NT * H * K * V) still index correctly: TileLang's FlattenBuffer
computes each flattened global index whose bound can pass int32 in 64-bit arithmetic, while loop counters,
shared-memory and fragment indices stay 32-bit. Declaring the extents int64 only widens the bounds checks, and the pass
option `tl.config_index_bitwidth=64` widens every integer (it breaks the packed API in 0.1.15). What a kernel must do:
keep every dimension below 2^31 and index tensors by their dimensions, never through an element offset computed into a
scalar (`T.alloc_var`, a local) first. A grid's second and third dimensions stop at 65535 blocks, so the chunk count
(65536 chunks of 64 tokens: 4.2M tokens) goes in the first one. tests/test_large_offsets.py checks every kernel's
generated code and runs a sequence past element 2^31 through each family of stages.
"""

import functools
import os
import weakref

import torch

# the tile arithmetic and dtype names live with the tile configs (below the kernels); re-exported here
from ...autotune.configs import TORCH_TO_TL, cdiv, pad_dim  # noqa: F401

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    """the multiprocessor count of a CUDA device (cached: the launchers ask on every call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=16)
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")


def target_for(device: torch.device | None = None) -> dict:
    """the explicit compile target for a CUDA device, or for `FLA_TL_ARCH` (default sm_90a) without one."""
    if device is not None and device.type == "cuda":
        arch = _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    else:
        arch = os.environ.get("FLA_TL_ARCH", "sm_90a")
    return {"kind": "cuda", "arch": arch}


# compiled kernels of this process, by (factory, target, keywords); TileLang keeps them on disk across processes
_kernels: dict = {}


def _compile(factory, target: dict, kwargs: dict):
    import tilelang

    func = factory(**kwargs)
    # a factory may ask for TileLang pass options (e.g. no warp specialization) through a `pass_configs` attribute
    pass_configs = getattr(factory, "pass_configs", None)
    return tilelang.compile(func, target=dict(target), execution_backend="tvm_ffi", pass_configs=pass_configs)


def get_kernel(factory, target: dict, **kwargs):
    """the compiled kernel for `factory(**kwargs)` on `target`, built once per process (and cached on disk by TileLang);
    a hit costs one dict lookup."""
    key = (factory, target["kind"], target["arch"], tuple(sorted(kwargs.items())))
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = _compile(factory, target, kwargs)
    return kernel


class SeqMeta:
    """per-launch sequence layout: int32 `cu_seqlens`, per-sequence chunk offsets and the (seq, chunk) of each chunk."""

    __slots__ = ("cu", "chunk_offsets", "chunk_indices", "N", "NT", "host", "ranges", "_rows")

    def __init__(self, cu, chunk_offsets, chunk_indices, N, NT, host=None):
        self.cu = cu
        self.chunk_offsets = chunk_offsets
        self.chunk_indices = chunk_indices
        self.N = N
        self.NT = NT
        # (cu, chunk offsets) as host lists, read back with NT by a varlen batch's one sync (None for a dense batch)
        self.host = host
        # chunk ranges over these sequences by range length (`common.ranges.range_meta`)
        self.ranges = {}
        self._rows = None

    def chunk_rows(self, BT: int) -> torch.Tensor:
        """`[NT, BT]` int64: the token row of every slot of every chunk, past a sequence's end its last token; built
        once per metadata (a dense batch's is cached), so a chunk-major gather is a single indexing kernel."""
        if self._rows is None or self._rows.shape[1] != BT:
            n, c = self.chunk_indices[:, 0].long(), self.chunk_indices[:, 1].long()
            cu = self.cu.long()
            t0 = cu[n] + c * BT
            self._rows = torch.minimum(t0[:, None] + torch.arange(BT, device=cu.device), cu[n + 1][:, None] - 1)
        return self._rows


@functools.lru_cache(maxsize=64)
def _dense_meta(B: int, T: int, BT: int, device: torch.device) -> SeqMeta:
    nc = cdiv(T, BT)
    cu = torch.arange(0, B + 1, dtype=torch.int32, device=device) * T
    offsets = torch.arange(0, B + 1, dtype=torch.int32, device=device) * nc
    n = torch.arange(B, dtype=torch.int32, device=device).repeat_interleave(nc)
    c = torch.arange(nc, dtype=torch.int32, device=device).repeat(B)
    return SeqMeta(cu, offsets, torch.stack([n, c], 1).contiguous(), B, B * nc)


# varlen metadata by cu_seqlens tensor: id -> (weak reference, version, BT, meta)
_varlen_metas: dict = {}


def seq_meta(B: int, T: int, cu_seqlens: torch.Tensor | None, BT: int, device: torch.device) -> SeqMeta:
    """sequence metadata for a dense batch (cached by shape) or a varlen batch (one host sync, like fla; cached by
    `cu_seqlens` tensor and its in-place version, so the ops of every layer of one packed batch reuse it without a
    sync, and a CUDA graph captured after a first call replays without one)."""
    if cu_seqlens is None:
        return _dense_meta(B, T, BT, device)
    hit = _varlen_metas.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1:3] == (cu_seqlens._version, BT):
        return hit[3]
    meta = _varlen_meta(cu_seqlens, BT, device)
    if len(_varlen_metas) >= 64:
        _varlen_metas.clear()
    _varlen_metas[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, BT, meta)
    return meta


def _varlen_meta(cu_seqlens: torch.Tensor, BT: int, device: torch.device) -> SeqMeta:
    from ...utils import host_bounds

    # the bounds on the host (read back once per tensor, shared with the op's value checks)
    cu_host = host_bounds(cu_seqlens)
    off_host = [0]
    for a, b in zip(cu_host[:-1], cu_host[1:]):
        off_host.append(off_host[-1] + cdiv(b - a, BT))
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    nc = (lens + BT - 1) // BT
    offsets = torch.cat([nc.new_zeros(1), nc.cumsum(0)])
    host = (cu_host, off_host)
    N, NT = lens.numel(), off_host[-1]
    n = torch.repeat_interleave(torch.arange(N, device=device), nc, output_size=NT)
    c = torch.arange(NT, device=device) - offsets[n]
    indices = torch.stack([n, c], 1).to(torch.int32).contiguous()
    return SeqMeta(cu_seqlens.to(torch.int32), offsets.to(torch.int32), indices, N, NT, host)


def state_or_dummy(state: torch.Tensor | None, like: torch.Tensor, shape_tail: tuple) -> tuple[torch.Tensor, int]:
    """an fp32 `[N*H, *shape_tail]` view of a state, or a one-element dummy, with the use flag."""
    if state is None:
        return like.new_empty((1, *shape_tail), dtype=torch.float32), 0
    return state.reshape(-1, *shape_tail).float().contiguous(), 1


@functools.lru_cache(maxsize=64)
def placeholder(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """a cached zero tensor: the placeholder of an absent kernel argument (the kernels never write it), so a launch
    allocates nothing beyond its outputs."""
    return torch.zeros(shape, dtype=dtype, device=device)
