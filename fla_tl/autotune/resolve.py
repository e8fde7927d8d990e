"""Which tile config a launcher runs: explicit keywords, else the tuning table, else the heuristic default.

Every TileLang launcher calls `tile_config(name, ref, ...)` once per launch. The answer is cached in memory per
(kernel, K, V, dtype, gate, sequence-length bucket, device, autotune mode, cache dir), so after the first call a
lookup is one tuple and one dict access; the table files are read once per process. Modes (`FLA_TL_AUTOTUNE`):

- `off`: the heuristic default of `configs.KERNELS[name]`;
- `lookup` (default): the user table, then the table shipped for this GPU, else the heuristic;
- `tune`: as `lookup`, and a miss goes to the handler installed with `set_miss_handler` (importing
  `fla_tl.autotune.tuner` installs one that tunes the kernel on the spot at the call's shape); its entry is recorded
  in the user table, so the next process finds it. Without a handler a miss takes the heuristic, with one warning.

A table entry whose config does not fit the kernel (other fields, shared memory over the budget) is ignored with one
warning; the op never fails because of a table.

This module sits below the kernels: it imports nothing from `fla_tl.kernels` nor from the tuner. A kernel's module is
named by `configs.KERNELS[name].factory` ("module:function"); its source hash keys the table.
"""

import collections
import dataclasses
import functools
import logging
import os
from collections.abc import Callable

from ..utils import log_once
from .configs import KERNELS, TORCH_TO_TL
from .table import ENV_CACHE, ENV_MODE, device_info, lookup, make_key, mode, record, seqlen_bucket, source_hash

_resolved: dict = {}
# the sources of the configs resolved in this process (`resolution_counts`)
_sources: collections.Counter = collections.Counter()
# kernels being tuned in this process: their own launches inside the tuner take the heuristic
_tuning: set = set()
# `fn(name, ref, *, K, V, gate, N, T) -> table entry` for a miss in `tune` mode (see `set_miss_handler`)
_miss_handler: Callable | None = None


def set_miss_handler(fn: Callable | None) -> Callable | None:
    """install `fn(name, ref, *, K, V, gate, N, T) -> entry` (a table entry: a dict with at least "config") as what a
    miss runs in `tune` mode; None removes it. Returns the previous handler. `fla_tl.autotune.tuner` installs its own
    when imported."""
    global _miss_handler
    previous, _miss_handler = _miss_handler, fn
    return previous


def heuristic_config(name: str, K: int, V: int, dtype: str, gate: str | None = None,
                     grid: tuple[int, int] | None = None) -> dict:
    """the heuristic default of kernel `name` as factory keywords; for a kernel whose default depends on the launch
    (`TunableKernel.grid`), at gate option `gate` and `grid` (sequences x heads, multiprocessors) where given."""
    kernel = KERNELS[name]
    if kernel.grid and grid is not None:
        blocks, sms = grid
        return dataclasses.asdict(kernel.heuristic(K, V, dtype, gate=gate, blocks=blocks, sms=sms))
    return dataclasses.asdict(kernel.heuristic(K, V, dtype, gate=gate))


def launch_grid(name: str, ref, N: int) -> tuple[int, int] | None:
    """(sequences x heads, the GPU's multiprocessors) of a launch of kernel `name` on `ref` (`[Ttot, H, *]`) over N
    sequences, for a kernel whose default depends on it; None otherwise or off a CUDA device."""
    if not KERNELS[name].grid or ref.device.type != "cuda":
        return None
    return N * ref.shape[1], _sm_count(ref.device)


@functools.lru_cache(maxsize=16)
def _sm_count(device) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def table_key(name: str, K: int, V: int, dtype: str, T: int, device=None, gate: str = "gamma") -> str:
    """the tuning-table key of kernel `name` at head dims K, V, input dtype `dtype` (a TileLang name), gate option
    `gate` and T tokens per sequence on `device`'s GPU (the current one by default)."""
    gpu, capability = device_info(device)
    return make_key(
        gpu=gpu,
        capability=capability,
        kernel=name,
        source=source_hash(KERNELS[name].factory),
        dims={"K": K, "V": V},
        dtypes={"dtype": dtype},
        flags={"gate": gate},
        bucket=seqlen_bucket(T),
    )


def tile_config(name: str, ref, *, K: int, V: int, gate: str, N: int, overrides: dict | None = None) -> dict:
    """the tile keywords of kernel `name` for a launch on `ref` (`[Ttot, H, *]`, its dtype and device decide) over
    N sequences. Non-empty `overrides` win over everything (tests and the tuner pass them). Do not mutate the result."""
    grid = launch_grid(name, ref, N)
    dtype = key_dtype(name, ref.dtype)
    if overrides:
        return {**heuristic_config(name, K, V, dtype, gate, grid), **overrides}
    T = ref.shape[0] // max(N, 1)
    key = (name, K, V, dtype, gate, seqlen_bucket(T), ref.device, os.environ.get(ENV_MODE),
           os.environ.get(ENV_CACHE), grid)
    config = _resolved.get(key)
    if config is None:
        config, source = _resolve(name, ref, K, V, gate, N, T, grid)
        _resolved[key] = config
        _sources[source] += 1
    return config


def resolution_counts() -> dict[str, int]:
    """how many (kernel, dims, dtype, gate, length bucket, device) launches this process resolved from each source:
    "table" (a tuning table's entry), "heuristic" (the default) and "tuned" (tuned here on a miss, `tune` mode); the
    benchmarks print it to show which configs a timed process ran and that none was tuned there."""
    return {source: _sources[source] for source in ("table", "heuristic", "tuned")}


def key_dtype(name: str, dtype) -> str:
    """the dtype (a TileLang name) kernel `name`'s configs are resolved and keyed for, launched on inputs of torch
    dtype `dtype`: the kernel's fixed one (`TunableKernel.dtype`: fp32 scans), else the inputs'."""
    return KERNELS[name].dtype or TORCH_TO_TL[dtype]


def clear_resolved() -> None:
    """forget the configs resolved in this process (after a table changed under it), and their counts."""
    _resolved.clear()
    _sources.clear()


def _checked(name: str, found: dict, K: int, V: int, dtype: str, where: str) -> dict | None:
    kernel = KERNELS[name]
    try:
        config = kernel.config_cls(**found)
    except TypeError as e:
        reason = f"its fields do not match {kernel.config_cls.__name__} ({e})"
    else:
        if kernel.fits(K, V, dtype, config):
            return dataclasses.asdict(config)
        reason = f"{config} does not fit K={K}, V={V}, {dtype} (shared memory or tile width)"
    log_once(("autotune.badconfig", name, K, V, dtype, reason), f"ignoring the tuned config of {name} from {where}: "
             f"{reason}; using the heuristic", logging.WARNING)
    return None


def _resolve(name: str, ref, K: int, V: int, gate: str, N: int, T: int,
             grid: tuple[int, int] | None) -> tuple[dict, str]:
    """(the config, its source: "table", "heuristic" or "tuned")."""
    dtype = key_dtype(name, ref.dtype)
    default = heuristic_config(name, K, V, dtype, gate, grid)
    current = mode()
    if current == "off" or ref.device.type != "cuda" or name in _tuning:
        return default, "heuristic"
    key = table_key(name, K, V, dtype, T, ref.device, gate=gate)
    gpu, _ = device_info(ref.device)
    found = lookup(key, gpu)
    if found is not None:
        config = _checked(name, found, K, V, dtype, "the tuning table")
        if config is not None:
            return config, "table"
    if current == "tune":
        return _tune(name, ref, K, V, gate, N, T, key, gpu, default)
    return default, "heuristic"


def _tune(name, ref, K, V, gate, N, T, key, gpu, default) -> dict:
    dtype = key_dtype(name, ref.dtype)
    if _miss_handler is None:
        log_once(("autotune.nohandler",), f"{ENV_MODE}=tune, but no tuner is installed (import "
                 "fla_tl.autotune.tuner): the kernels without a table entry take their heuristic configs",
                 logging.WARNING)
        return default, "heuristic"
    log_once(("autotune.tune", name, K, V, dtype, seqlen_bucket(T)),
             f"{ENV_MODE}=tune: tuning {name} (K={K}, V={V}, {dtype}, {N} x {T} tokens); the result goes to the user "
             "table", logging.WARNING)
    _tuning.add(name)
    try:
        entry = _miss_handler(name, ref, K=K, V=V, gate=gate, N=N, T=T)
    finally:
        _tuning.discard(name)
    entry["shape"] = {"N": N, "T": T, "H": ref.shape[1]}
    record(key, gpu, entry)
    return dataclasses.asdict(KERNELS[name].config_cls(**entry["config"])), "tuned"
