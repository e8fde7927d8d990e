"""Autotuning: the per-GPU tuning table of kernel configs, shipped with the package and in the user cache.

Layering: `configs` (tile constants, config dataclasses, heuristics, search spaces, shared-memory arithmetic),
`table` and `resolve` (lookups) sit below the kernels and import nothing from `fla_tl.kernels`; `tuner`, `build` and
`commands` sit above them (they launch or compile kernels) and are imported only on demand, never from here.
"""

from .table import (
    ENV_CACHE,
    ENV_MODE,
    FORMAT,
    KEY_FIELDS,
    TuningTable,
    cache_clear,
    cache_show,
    clear_memory,
    device_info,
    gpu_slug,
    key_fields,
    lookup,
    make_key,
    mode,
    parse_key,
    record,
    seqlen_bucket,
    shipped_table_path,
    source_hash,
    user_table_path,
)

__all__ = [
    "ENV_CACHE",
    "ENV_MODE",
    "FORMAT",
    "KEY_FIELDS",
    "TuningTable",
    "cache_clear",
    "cache_show",
    "clear_memory",
    "device_info",
    "gpu_slug",
    "key_fields",
    "lookup",
    "make_key",
    "mode",
    "parse_key",
    "record",
    "seqlen_bucket",
    "shipped_table_path",
    "source_hash",
    "user_table_path",
]
