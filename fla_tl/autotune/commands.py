"""The autotune commands of `python -m fla_tl`: `compile` (kernels ahead into TileLang's cache) and `tune` (tile
configs on this GPU into a tuning table).

Both read what an op launches from its registration (the caller imports `fla_tl.ops`, which registers every op):
`OpSpec.kernels(D, dtype)` lists every TileLang kernel with its keywords; the tunable ones are those named in
`configs.KERNELS`. This module sits above the kernels.
"""

import dataclasses
import itertools
import pathlib
import sys

import torch

from ..registry import KernelSpec, format_table, get_op
from .configs import KERNELS


def _capability(arch: str) -> str:
    """the compute capability ("9.0") of a CUDA arch name ("sm_90a")."""
    if not arch.startswith("sm_"):
        return arch
    digits = arch[3:].rstrip("af")
    return f"{digits[:-1]}.{digits[-1]}"


def _table_specs(arch: str, kernels: set[str]) -> list[KernelSpec]:
    """the kernels of every tuned config the shipped and user tables hold for GPUs of `arch`, for the tunable kernels
    named in `kernels` (at the entries' dims, dtype and gate option)."""
    from ..kernels.common.state_op import stage_spec
    from .table import TuningTable, _cache_dir, _shipped_dir, parse_key

    capability = _capability(arch)
    specs = []
    paths = sorted(_shipped_dir().glob("*.json")) + sorted(pathlib.Path(_cache_dir(), "tables").glob("*.json"))
    for path in paths:
        table = TuningTable.load(path)
        for key in table.keys():
            fields = parse_key(key)
            if fields.get("cc") != capability or fields.get("kernel") not in kernels:
                continue
            dims = dict(part.split("=") for part in fields["dims"].split(","))
            dtype = dict(part.split("=") for part in fields["dtypes"].split(","))["dtype"]
            gate = dict(part.split("=") for part in fields["flags"].split(",")).get("gate", "gamma")
            specs.append(stage_spec(fields["kernel"], int(dims["K"]), int(dims["V"]), dtype, gate,
                                    table.get(key)["config"]))
    return specs


def _space(spec: KernelSpec, dtype: str) -> list[KernelSpec]:
    """a tunable kernel at every config of its search space that fits (its other keywords kept)."""
    kernel = KERNELS[spec.name]
    K, V = spec.kwargs["K"], spec.kwargs["V"]
    return [KernelSpec(spec.name, spec.factory, {**spec.kwargs, **dataclasses.asdict(config)})
            for config in kernel.candidates(K, V, spec.kwargs.get("dtype", dtype))]


def compile_ahead(arch: str, ops: list[str], dims: list[int], dtypes: list[str], workers: int,
                  space: bool = False) -> int:
    """compile the kernels of `ops` at head dims `dims` and `dtypes` into TileLang's cache: every kernel of each op's
    `kernels(D, dtype)` (every gate option and flag combination it launches, at the launchers' configs), every config
    the tuning tables (shipped and user) hold for GPUs of `arch` for the op's tunable kernels, and with `space` every
    config of their search spaces that fits; return the number of failures."""
    from .build import build, unique

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
    results = build(specs, {"kind": "cuda", "arch": arch}, workers)
    rows = [
        {"kernel": name, "result": "ok" if ok else "FAIL", "s": f"{seconds:.1f}", "detail": message}
        for name, ok, seconds, message in results
    ]
    print(format_table(rows))
    failures = sum(not r[1] for r in results) + len(broken)
    print(f"{len(results) - sum(not r[1] for r in results)} built, {failures} failed")
    return failures


def tune(ops: list[str], shapes: list[tuple[int, int, int, int]], out: str | None,
         gates: tuple[str, ...] = ("gamma",)) -> int:
    """tune the tunable kernels of `ops` (those of each op's kernel list named in `configs.KERNELS`, at the head dims
    and gate options the op launches them with) at each (B, T, H, D) shape in bf16 on this GPU, for the gate options
    among `gates`; store the entries in the user table (or in the table file `out`) and print the default vs tuned
    times."""
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
