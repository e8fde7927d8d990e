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
import time

import torch

from ..registry import KernelSpec, get_op
from ..utils import log_once
from .configs import KERNELS, key_dims
from .table import seqlen_bucket

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
            config = table.get(key)["config"]
            specs += [stage_spec(fields["kernel"], K, V, dtype, gate, config, factory=factory)
                      for factory in (None, *KERNELS[fields["kernel"]].companions)]
        if malformed:
            log_once(("autotune.keys", str(path)), f"tuning table {path}: ignoring {len(malformed)} malformed "
                     f"key(s), e.g. {malformed[0]!r}", logging.WARNING)
    return specs


def _space(spec: KernelSpec, dtype: str) -> list[KernelSpec]:
    """a tunable kernel at every config of its search space that fits (its other keywords kept)."""
    kernel = KERNELS[spec.name]
    K, V = key_dims(spec.name, spec.kwargs)
    gate = spec.kwargs.get("gate", kernel.gate)
    dtype = kernel.dtype or spec.kwargs.get("dtype", dtype)
    return [KernelSpec(spec.name, spec.factory, {**spec.kwargs, **dataclasses.asdict(config)})
            for config in kernel.candidates(K, V, dtype, gate)]


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


# `tune --all`: the head dims (K = V), D = 128 first (most of fla's benchmark shapes use it), so a short run tunes it
TUNE_DIMS = (128, 64, 256)
# `tune --all`: one (B, T, H) per sequence-length bucket, each tuned at every head dim of TUNE_DIMS. fla's benchmark
# shapes (1x8192x96x128, 2x16384x16x128, 4x2048x16x128, 4x4096x64x128, 8x1024x8x64, 8x2048x32x256) and T = 4096 fall
# in the five buckets 1024, 2048, 4096, 8192 and 16384; a tuning shape covers one bucket, so five is the smallest set.
# B and H are those of fla's benchmark shape in the bucket (for 2048, the larger of its two), so the tuned kernel sees
# the grid the benchmark launches: B x H sequence-heads for the state passes, chunks x heads for the chunk kernels.
TUNE_SHAPES = ((8, 1024, 8), (8, 2048, 32), (4, 4096, 64), (1, 8192, 96), (2, 16384, 16))
# the estimate's seconds per candidate config before any is measured (its compile in one of the tuner's compile
# processes, warm-up, correctness check and timed calls): a first guess, replaced by the measured average after
# MEASURED_AFTER keys
SECONDS_PER_CANDIDATE = 1.0
# keys tuned before the estimate switches to the measured seconds per candidate
MEASURED_AFTER = 3


def all_shapes() -> list[tuple[int, int, int, int]]:
    """the (B, T, H, D) shapes `tune --all` tunes at: TUNE_SHAPES at every head dim of TUNE_DIMS."""
    return [(B, T, H, D) for D in TUNE_DIMS for B, T, H in TUNE_SHAPES]


@dataclasses.dataclass(frozen=True)
class TuneKey:
    """one tuning-table entry to make: kernel `name` at K, V and gate option `gate`, tuned at shape (B, T, H, D)."""

    name: str
    K: int
    V: int
    gate: str
    shape: tuple[int, int, int, int]
    key: str

    @property
    def label(self) -> str:
        return f"{self.name} K={self.K} V={self.V} {self.gate} T<={seqlen_bucket(self.shape[1])}"


def plan_keys(ops: list[str], shapes: list[tuple[int, int, int, int]], gates: tuple[str, ...] | None,
              device) -> tuple[list[TuneKey], list[str]]:
    """the table keys `tune` makes for the tunable kernels of `ops` at each (B, T, H, D) shape in bf16 on `device`'s
    GPU, for the gate options among `gates` (None: every one the ops launch), each key once (the first shape of its
    bucket); and the ops that have none."""
    from .resolve import table_key
    from .tuner import op_kernels

    keys, tuned = {}, set()
    for B, T, H, D in shapes:
        for op in ops:
            for name, K, V, gate in op_kernels(op, D, "bfloat16") or ():
                if gates is None or gate in gates:
                    tuned.add(op)
                    key = table_key(name, K, V, KERNELS[name].dtype or "bfloat16", T, device, gate)
                    keys.setdefault(key, TuneKey(name, K, V, gate, (B, T, H, D), key))
    return list(keys.values()), [op for op in ops if op not in tuned]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _candidates(k: TuneKey) -> int:
    return len(KERNELS[k.name].candidates(k.K, k.V, KERNELS[k.name].dtype or "bfloat16", k.gate))


def tune(ops: list[str], shapes: list[tuple[int, int, int, int]], out: str | None,
         gates: tuple[str, ...] | None = None) -> int:
    """tune the tunable kernels of `ops` (those of each op's kernel list named in `configs.KERNELS`, at the head dims
    and gate options the op launches them with) at each (B, T, H, D) shape in bf16 on this GPU, for the gate options
    among `gates` (None: all); store the entries in the user table (or in the table file `out`), saved after each key,
    and print the default vs tuned times. A key the table already holds (same source hash and versions) is skipped,
    so a cut-off run continues where it stopped; a key whose tuning raises is reported and skipped. Returns 0, 1 when
    a key failed, 2 without a GPU."""
    from tqdm import tqdm

    from ..cli import format_table, progress
    from . import tuner
    from .table import TuningTable, device_info, user_table_path

    if not torch.cuda.is_available():
        print("python -m fla_tl tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gpu, _ = device_info(device)
    table = TuningTable.load(out or user_table_path(gpu))
    table.gpu = table.gpu or gpu
    keys, untuned = plan_keys(ops, shapes, gates, device)
    if untuned:
        among = f" with gate options {', '.join(gates)}" if gates else ""
        print(f"no tunable kernels{among} for {', '.join(untuned)}", flush=True)
    todo = [k for k in keys if table.get(k.key) is None]
    n_candidates = sum(_candidates(k) for k in todo)
    print(f"tune: {len(keys)} keys, {len(keys) - len(todo)} already in {table.path} (skipped), {len(todo)} to tune: "
          f"{n_candidates} candidate configs, about {_duration(n_candidates * SECONDS_PER_CANDIDATE)} at "
          f"{SECONDS_PER_CANDIDATE:g} s per candidate", flush=True)
    rows, failed, done_candidates = [], 0, 0
    start = time.perf_counter()
    with progress(len(keys)) as bar:
        bar.update(len(keys) - len(todo))
        for i, k in enumerate(todo):
            per_candidate = SECONDS_PER_CANDIDATE
            if i >= MEASURED_AFTER:
                per_candidate = (time.perf_counter() - start) / done_candidates
            left = (n_candidates - done_candidates) * per_candidate
            bar.set_description_str(f"{k.label} (~{_duration(left)} left)")
            B, T, H, D = k.shape
            try:
                # a channel scan's key has no head dims (K = V = 0): it runs over the shape's H x D channels
                runner = tuner.make_runner(k.name, N=B, T=T, H=H, K=k.K or D, V=k.V or D, dtype=torch.bfloat16,
                                           device=device, gate=k.gate)
                entry = tuner.tune_kernel(k.name, runner, K=k.K, V=k.V, dtype=torch.bfloat16, gate=k.gate,
                                          progress=False)
            except Exception as e:  # noqa: BLE001 - one key's failure is reported, the run goes on
                failed += 1
                text = str(e).strip()
                tqdm.write(f"FAIL {k.label} at {B}x{T}x{H}x{D}: {type(e).__name__}"
                           f"{': ' + text.splitlines()[0][:200] if text else ''}", file=sys.stdout)
            else:
                entry["shape"] = {"B": B, "T": T, "H": H, "D": D}
                table.put(k.key, entry)
                try:
                    table.save()
                except OSError as e:
                    print(f"python -m fla_tl tune: cannot write {table.path}: {e.strerror or e}", file=sys.stderr)
                    return 1
                rows.append({
                    "kernel": k.name,
                    "gate": k.gate,
                    "shape": f"{B}x{T}x{H}x{D}" + (f" (K={k.K}, V={k.V})" if (k.K, k.V) != (D, D) else ""),
                    "default_ms": f"{entry['default_ms']:.4f}",
                    "tuned_ms": f"{entry['time_ms']:.4f}",
                    "speedup": f"{entry['default_ms'] / entry['time_ms']:.2f}",
                    "config": ", ".join(f"{name}={v}" for name, v in entry["config"].items()),
                })
            done_candidates += _candidates(k)
            bar.update()
    if rows:
        print(format_table(rows))
    print(f"{len(rows)} tuned, {len(keys) - len(todo)} skipped (already in the table), {failed} failed "
          f"in {_duration(time.perf_counter() - start)}")
    return 1 if failed else 0
