"""Ahead-of-time builds: TileLang kernels compiled for an explicit target, no GPU needed.

A spec is a `fla_tl.registry.KernelSpec` (name, factory, keywords exactly as the launcher builds it: an op's
`kernels(D, dtype)` lists them), so a build here fills TileLang's disk cache (`TILELANG_CACHE_DIR`) with the kernels
a GPU machine of the same architecture will load. This module sits above the kernels; nothing below imports it.
"""

import concurrent.futures
import multiprocessing
import time

from ..registry import KernelSpec


def _label(spec: KernelSpec) -> str:
    return f"{spec.name}({', '.join(f'{k}={v}' for k, v in spec.kwargs.items() if k != 'gate')})"


def _build_one(spec: KernelSpec, target: dict) -> tuple[str, bool, float, str]:
    from ..kernels.common.utils import get_kernel

    label = _label(spec)
    start = time.perf_counter()
    try:
        get_kernel(spec.factory, target, **spec.kwargs)
        return label, True, time.perf_counter() - start, ""
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return label, False, time.perf_counter() - start, f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"


def build(specs, target: dict, workers: int = 2) -> list[tuple[str, bool, float, str]]:
    """compile every `KernelSpec` of `specs` into TileLang's disk cache; returns `(label, ok, seconds, message)` per
    spec. With `workers` > 1 the compiles run in that many spawned processes, each with its own interpreter
    (TileLang's lowering is Python-driven); the calling process then loads the kernels from the disk cache on first
    use."""
    specs = list(specs)
    if workers <= 1 or len(specs) <= 1:
        return [_build_one(spec, target) for spec in specs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(specs)), mp_context=context) as pool:
        return list(pool.map(_build_one, specs, [target] * len(specs)))


def unique(specs) -> list[KernelSpec]:
    """`specs` without repeats (the same factory and keywords), first occurrence kept."""
    found = {}
    for spec in specs:
        found.setdefault((spec.factory, tuple(sorted(spec.kwargs.items()))), spec)
    return list(found.values())
