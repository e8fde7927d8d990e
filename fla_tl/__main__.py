"""`python -m fla_tl list` prints the op registry; `check` runs every op against its reference; `compile` builds
every op's kernels ahead into TileLang's cache; `tune` tunes tile configs on this GPU; `cache show | clear` lists or
removes the user's tuning tables."""

import argparse
import sys
import time

import torch

from . import ops  # noqa: F401 - registers the ops
from .registry import BackendError, format_table, list_ops, registered_ops
from .testing import run_check


def _check_ops(device: torch.device, backend: str, dtypes) -> list[dict]:
    """one row per (op, dtype): its `check` cases (`OpSpec.cases`) through the shared harness on `backend`."""
    rows = []
    for spec in registered_ops():
        if spec.cases is None:
            continue
        for dtype in dtypes:
            row = {"op": spec.name, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
            torch.manual_seed(0)
            start = time.perf_counter()
            passed, failed, skipped, worst = 0, [], [], (0.0, "")
            for case in spec.cases(device, dtype):
                try:
                    results = run_check(spec.fn, case, backend)
                except BackendError as e:
                    skipped.append(str(e).split(": ", 2)[-1])
                    continue
                except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
                    failed.append(f"{case.label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    continue
                bad = [f"{case.label} {r.name}: {r.detail}" for r in results if not r.passed]
                failed += bad
                passed += not bad
                for r in results:
                    ratio = float(r.detail.split("ratio ")[1].split()[0]) if "ratio " in r.detail else 0.0
                    worst = max(worst, (ratio, f"{case.label} {r.name}"))
            if skipped and not passed and not failed:
                rows.append({**row, "result": "skip", "cases": "-", "s": "-", "detail": skipped[0]})
                continue
            detail = "; ".join(failed) if failed else f"worst rel. error {worst[0]:.1e} ({worst[1]})"
            rows.append({**row, "result": "FAIL" if failed else "pass", "cases": f"{passed}/{passed + len(failed)}",
                         "s": f"{time.perf_counter() - start:.1f}", "detail": detail[:160]})
    return rows


def _check_compile() -> list[dict]:
    """compile the retention ops' kernels at D = 64 in bf16 for sm_90a (no GPU needed, nvcc is)."""
    try:
        from .autotune.build import build
        from .registry import get_op

        specs = [s for name in ("chunk_retention", "fused_recurrent_retention")
                 for s in get_op(name).kernels(64, "bfloat16")]
        results = build(specs, {"kind": "cuda", "arch": "sm_90a"})
    except Exception as e:  # noqa: BLE001 - a crash of the whole check is one failed row
        return [{"kernel": "(all)", "result": "FAIL", "s": "-", "detail": f"{type(e).__name__}: {e}"}]
    return [{"kernel": name, "result": "pass" if ok else "FAIL", "s": f"{seconds:.1f}",
             "detail": str(message).splitlines()[0] if message else ""} for name, ok, seconds, message in results]


def check(compile_kernels: bool = True) -> int:
    """run every registered op against its reference on this machine; return the number of failures."""
    on_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    if on_gpu:
        device, backend, dtypes = torch.device("cuda"), "tilelang", (torch.bfloat16, torch.float32)
    else:
        device, backend, dtypes = torch.device("cpu"), "torch", (torch.float64, torch.float32)
    print(f"fla_tl check: {backend} backend on {device} (torch {torch.__version__})", flush=True)
    rows = _check_ops(device, backend, dtypes)
    print(format_table(rows))
    failures = sum(r["result"] == "FAIL" for r in rows)
    if compile_kernels and not on_gpu:
        print("\ncompile checks (the retention kernels for sm_90a):", flush=True)
        compile_rows = _check_compile()
        print(format_table(compile_rows))
        failures += sum(r["result"] == "FAIL" for r in compile_rows)
    ran = [r for r in rows if r["result"] != "skip"]
    skipped = len(rows) - len(ran)
    print(f"\n{len(ran) - sum(r['result'] == 'FAIL' for r in ran)}/{len(ran)} op checks passed"
          f"{f', {skipped} skipped (the backend refuses them, reason in the table)' if skipped else ''}; "
          f"{failures} failure(s)")
    return failures


def registered_op_mode(op: str) -> str:
    """the kernel mode (chunk | fused_chunk | fused_recurrent) of a registered op; ValueError for an unknown op."""
    modes = {spec.name: spec.mode for spec in registered_ops()}
    if op not in modes:
        raise ValueError(f"--ops: unknown op {op!r}; registered: {', '.join(sorted(modes))}")
    return modes[op]


def _gates(parser, value: str) -> tuple[str, ...]:
    """the `--gates` option as a tuple; a parser error for an unknown gate option."""
    gates = tuple(value.split(","))
    if not set(gates) <= {"gamma", "g"}:
        parser.error(f"--gates: expected a comma list of gamma, g; got {value!r}")
    return gates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fla_tl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the op registry: op, variant, mode, backends and their capabilities")
    p_check = sub.add_parser("check", help="run every op against its reference; nonzero exit on any failure")
    p_check.add_argument("--no-compile", action="store_true", help="skip the TileLang compile checks")
    p_compile = sub.add_parser(
        "compile", help="compile kernels ahead into TileLang's cache (TILELANG_CACHE_DIR), no GPU needed"
    )
    p_compile.add_argument("--arch", default="sm_90a", help="CUDA arch, e.g. sm_90a (default)")
    p_compile.add_argument("--ops", default="all", help="comma list of registered ops, or all (default)")
    p_compile.add_argument("--dims", default="64,128,256", help="head dims D (K = V = D), comma list")
    p_compile.add_argument("--dtypes", default="bfloat16", help="comma list of bfloat16, float16, float32")
    p_compile.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    p_compile.add_argument("--space", action="store_true",
                           help="also every config of the tuning search spaces (default: heuristic and table configs)")
    p_tune = sub.add_parser("tune", help="tune the kernels' tile configs on this GPU and store them in a table")
    p_tune.add_argument("--ops", default="all", help="comma list of registered ops, or all (default)")
    p_tune.add_argument("--shapes", default="8x4096x16x128", help="comma list of BxTxHxD (bf16, K = V = D)")
    p_tune.add_argument("--out", default=None, help="table file to write (default: the user table of this GPU)")
    p_tune.add_argument("--gates", default="gamma,g", help="comma list of gate options: gamma (constant decay), "
                        "g (per-token gate); default both")
    p_cache = sub.add_parser("cache", help="show or clear the user's tuning tables")
    p_cache.add_argument("action", choices=("show", "clear"))
    args = parser.parse_args(argv)
    if args.command == "list":
        list_ops()
        return 0
    if args.command == "compile":
        ops = [spec.name for spec in registered_ops()] if args.ops == "all" else args.ops.split(",")
        try:
            for op in ops:
                registered_op_mode(op)
        except ValueError as e:
            parser.error(str(e))
        dims = [int(d) for d in args.dims.split(",")]
        from .autotune.commands import compile_ahead

        return 1 if compile_ahead(args.arch, ops, dims, args.dtypes.split(","), args.workers, args.space) else 0
    if args.command == "tune":
        ops = [spec.name for spec in registered_ops()] if args.ops == "all" else args.ops.split(",")
        try:
            for op in ops:
                registered_op_mode(op)
            shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
            if any(len(shape) != 4 for shape in shapes):
                raise ValueError(f"--shapes: expected BxTxHxD items, got {args.shapes!r}")
        except ValueError as e:
            parser.error(str(e))
        gates = _gates(parser, args.gates)
        from .autotune.commands import tune

        return tune(ops, shapes, args.out, gates)
    if args.command == "cache":
        from .autotune import cache_clear, cache_show

        if args.action == "show":
            print(cache_show())
        else:
            removed = cache_clear()
            print(f"removed {len(removed)} file(s)" + "".join(f"\n  {p}" for p in removed))
        return 0
    return 1 if check(compile_kernels=not args.no_compile) else 0


if __name__ == "__main__":
    sys.exit(main())
