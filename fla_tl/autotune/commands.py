"""The autotune commands of `python -m fla_tl`: `compile` (kernels ahead into TileLang's cache) and `tune` (tile
configs on this GPU into a tuning table), and the kernel builds with a progress bar that `check --compile` shares.

Both read what an op launches from its registration (the caller imports `fla_tl.ops`, which registers every op):
`OpSpec.kernels(D, dtype)` lists every TileLang kernel with its keywords; the tunable ones are those named in
`configs.KERNELS`. This module sits above the kernels.
"""

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys

import torch

from ..registry import KernelSpec, get_op
from ..utils import log_once
from .configs import KERNELS

# where TileLang looks for the CUDA toolkit after $CUDA_HOME / $CUDA_PATH and nvcc on PATH
CUDA_DEFAULT_HOMES = ("/usr/local/cuda",)


def find_nvcc() -> tuple[str | None, str]:
    """(the nvcc TileLang would build with, "") or (None, why there is none): $CUDA_HOME or $CUDA_PATH, else PATH,
    else the default install folders."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            path = pathlib.Path(home, "bin", "nvcc")
            if path.is_file():
                return str(path), ""
            return None, f"no nvcc in ${var} ({home})"
    found = shutil.which("nvcc")
    if found:
        return found, ""
    for home in CUDA_DEFAULT_HOMES:
        path = pathlib.Path(home, "bin", "nvcc")
        if path.is_file():
            return str(path), ""
    return None, f"no nvcc on PATH, in $CUDA_HOME{''.join(f' or {home}' for home in CUDA_DEFAULT_HOMES)}"


def quiet_tilelang() -> None:
    """keep only the warnings of TileLang's and TVM's loggers (TileLang logs every kernel compile at INFO level and
    sets that level when imported, so it is imported first)."""
    # a missing or broken install is reported by the builds themselves
    with contextlib.suppress(Exception):
        import tilelang  # noqa: F401
    for name in ("tilelang", "tvm"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _failed_build(spec: KernelSpec, e: BaseException) -> list[tuple[str, bool, float, str]]:
    return [(spec.name, False, 0.0, f"{type(e).__name__}: {e}")]


def build_kernels(specs: list[KernelSpec], arch: str, workers: int = 2, verbose: bool = False,
                  ) -> list[tuple[str, bool, float, str]]:
    """compile `specs` for `arch` into TileLang's cache (`build.build`, one spec at a time, in `workers` spawned
    processes) with a progress bar on stderr; TileLang's INFO logs only with `verbose`. Returns `(label, ok, seconds,
    message)` per spec, in order."""
    from ..cli import progress
    from . import build as build_module

    target = {"kind": "cuda", "arch": arch}
    if not verbose:
        quiet_tilelang()
    done = [[] for _ in specs]
    with progress(len(specs)) as bar:
        bar.set_description_str(f"build {arch}")
        if workers <= 1 or len(specs) <= 1:
            for i, spec in enumerate(specs):
                bar.set_description_str(f"build {arch} {spec.name}")
                try:
                    done[i] = build_module.build([spec], target, 1)
                except Exception as e:  # noqa: BLE001 - reported per kernel
                    done[i] = _failed_build(spec, e)
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")
            initializer = None if verbose else quiet_tilelang
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(specs)), mp_context=context,
                                                        initializer=initializer) as pool:
                futures = {pool.submit(build_module.build, [spec], target, 1): i for i, spec in enumerate(specs)}
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    try:
                        done[i] = future.result()
                    except Exception as e:  # noqa: BLE001 - reported per kernel
                        done[i] = _failed_build(specs[i], e)
                    bar.set_description_str(f"build {arch}: built {specs[i].name}", refresh=False)
                    bar.update()
    return [result for results in done for result in results]


def _capability(arch: str) -> str:
    """the compute capability ("9.0") of a CUDA arch name ("sm_90a")."""
    if not arch.startswith("sm_"):
        return arch
    digits = arch[3:].rstrip("af")
    return f"{digits[:-1]}.{digits[-1]}"


def _table_specs(arch: str, kernels: set[str]) -> list[KernelSpec]:
    """the kernels of every tuned config the shipped and user tables hold for GPUs of `arch`, for the tunable kernels
    named in `kernels` (at the entries' dims, dtype and gate option). A malformed key is skipped, with one warning per
    table."""
    from ..kernels.common.state_op import stage_spec
    from .table import TuningTable, _cache_dir, _shipped_dir, key_fields

    capability = _capability(arch)
    specs = []
    paths = sorted(_shipped_dir().glob("*.json")) + sorted(pathlib.Path(_cache_dir(), "tables").glob("*.json"))
    for path in paths:
        table = TuningTable.load(path)
        malformed = []
        for key in table.keys():
            fields = key_fields(key)
            if fields is None:
                malformed.append(key)
                continue
            if fields["cc"] != capability or fields["kernel"] not in kernels:
                continue
            try:
                K, V = int(fields["dims"]["K"]), int(fields["dims"]["V"])
                dtype, gate = fields["dtypes"]["dtype"], fields["flags"].get("gate", "gamma")
            except (KeyError, ValueError):
                malformed.append(key)
                continue
            specs.append(stage_spec(fields["kernel"], K, V, dtype, gate, table.get(key)["config"]))
        if malformed:
            log_once(("autotune.keys", str(path)), f"tuning table {path}: ignoring {len(malformed)} malformed "
                     f"key(s), e.g. {malformed[0]!r}", logging.WARNING)
    return specs


def _space(spec: KernelSpec, dtype: str) -> list[KernelSpec]:
    """a tunable kernel at every config of its search space that fits (its other keywords kept)."""
    kernel = KERNELS[spec.name]
    K, V = spec.kwargs["K"], spec.kwargs["V"]
    return [KernelSpec(spec.name, spec.factory, {**spec.kwargs, **dataclasses.asdict(config)})
            for config in kernel.candidates(K, V, spec.kwargs.get("dtype", dtype))]


def compile_ahead(arch: str, ops: list[str], dims: list[int], dtypes: list[str], workers: int,
                  space: bool = False, verbose: bool = False) -> int:
    """compile the kernels of `ops` at head dims `dims` and `dtypes` into TileLang's cache: every kernel of each op's
    `kernels(D, dtype)` (every gate option and flag combination it launches, at the launchers' configs), every config
    the tuning tables (shipped and user) hold for GPUs of `arch` for the op's tunable kernels, and with `space` every
    config of their search spaces that fits; print the failures (every kernel with `verbose`) and return their
    number."""
    from ..cli import format_table
    from .build import unique

    specs, unlisted, broken, tunable = [], set(), [], set()
    for d, dtype in itertools.product(dims, dtypes):
        for op in ops:
            spec = get_op(op)
            if spec.kernels is None:
                unlisted.add(op)
                continue
            try:
                listed = list(spec.kernels(d, dtype))
            except Exception as e:  # noqa: BLE001 - one op's broken list is a failure, not a crash
                broken.append(f"{op} (D={d}, {dtype}): {type(e).__name__}: {e}")
                continue
            specs += listed
            for kernel in listed:
                if kernel.name in KERNELS:
                    tunable.add(kernel.name)
                    if space:
                        specs += _space(kernel, dtype)
    specs = unique(specs + _table_specs(arch, tunable))
    if unlisted:
        print(f"no ahead-of-time kernel list for {', '.join(sorted(unlisted))}: their kernels compile on first use",
              flush=True)
    for line in broken:
        print(f"FAIL kernel list of {line}", flush=True)
    print(f"compiling {len(specs)} kernels for {arch} ({', '.join(ops)}; D = {dims}; {', '.join(dtypes)}"
          f"{'; every config of the search spaces' if space else ''}) in {workers} processes", flush=True)
    results = build_kernels(specs, arch, workers, verbose)
    if verbose:
        print(format_table([{"kernel": name, "result": "ok" if ok else "FAIL", "s": f"{seconds:.1f}",
                             "detail": message} for name, ok, seconds, message in results]))
    for name, ok, _, message in results:
        if not ok:
            print(f"FAIL {name}: {message}")
    failures = sum(not r[1] for r in results) + len(broken)
    print(f"{len(results) - sum(not r[1] for r in results)} built, {failures} failed")
    return failures


def tune(ops: list[str], shapes: list[tuple[int, int, int, int]], out: str | None,
         gates: tuple[str, ...] = ("gamma",)) -> int:
    """tune the tunable kernels of `ops` (those of each op's kernel list named in `configs.KERNELS`, at the head dims
    and gate options the op launches them with) at each (B, T, H, D) shape in bf16 on this GPU, for the gate options
    among `gates`; store the entries in the user table (or in the table file `out`) and print the default vs tuned
    times."""
    from ..cli import format_table
    from .resolve import table_key
    from .table import TuningTable, device_info, record
    from .tuner import make_runner, op_kernels, tune_kernel

    if not torch.cuda.is_available():
        print("python -m fla_tl tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gpu, _ = device_info(device)
    table = TuningTable.load(out) if out else None
    rows, done, untuned = [], set(), set()
    for B, T, H, D in shapes:
        for op in ops:
            stages = [s for s in op_kernels(op, D, "bfloat16") or () if s[3] in gates]
            if not stages:
                untuned.add(op)
            for name, K, V, gate in stages:
                if (name, B, T, H, K, V, gate) in done:
                    continue
                done.add((name, B, T, H, K, V, gate))
                runner = make_runner(name, N=B, T=T, H=H, K=K, V=V, dtype=torch.bfloat16, device=device, gate=gate)
                entry = tune_kernel(name, runner, K=K, V=V, dtype=torch.bfloat16, gate=gate)
                entry["shape"] = {"B": B, "T": T, "H": H, "D": D}
                key = table_key(name, K, V, "bfloat16", T, device, gate)
                if table is not None:
                    table.put(key, entry)
                    table.save()
                else:
                    record(key, gpu, entry)
                rows.append({
                    "kernel": name,
                    "gate": gate,
                    "shape": f"{B}x{T}x{H}x{D}" + (f" (K={K}, V={V})" if (K, V) != (D, D) else ""),
                    "default_ms": f"{entry['default_ms']:.4f}",
                    "tuned_ms": f"{entry['time_ms']:.4f}",
                    "speedup": f"{entry['default_ms'] / entry['time_ms']:.2f}",
                    "config": ", ".join(f"{k}={v}" for k, v in entry["config"].items()),
                })
    if untuned:
        print(f"no tunable kernels with gate options {', '.join(gates)} for {', '.join(sorted(untuned))}",
              flush=True)
    print(format_table(rows))
    return 0
