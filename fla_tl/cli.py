"""The command line, `python -m fla_tl <command>`: `list`, `check`, `compile`, `tune` and `cache show | clear`.

Importing this module, and every `--help`, imports neither torch nor TileLang: each command imports what it needs.
"""

import argparse
import collections
import sys
import time

WIDTH = 100
ARCH = "sm_90a"
# `check --compile` builds these ops' kernels at D = 64 in bf16
CHECK_BUILD_OPS = ("chunk_retention", "fused_recurrent_retention")
# the capability flags `list` shows, with their short names
FLAGS = (("varlen", "varlen"), ("initial_state", "h0"), ("reverse", "reverse"), ("state_v_first", "v-first"),
         ("gate", "gate"))

DESCRIPTION = "flash-linear-attention's ops in TileLang: list them, check them on this machine, build and tune kernels."

CHECK_HELP = f"""\
Run each op on this machine against its reference (token-by-token recurrences): the TileLang backend on a GPU with
compute capability >= 9.0 in bf16, else the torch backend in fp64. By default the smallest case of each op in one
dtype (seconds); --full runs every case in two dtypes (bf16 and fp32 on a GPU, fp64 and fp32 on a CPU) and builds
the retention kernels for {ARCH}. Prints one line per op; exit code 1 on a failure."""


# `tune`'s shape without --shapes or --all
TUNE_SHAPE = "8x4096x16x128"

TUNE_HELP = """\
Tune the tunable kernels' tile configs on this GPU (bf16) and store the winners in the user table or FILE, saved
after each key (kernel, dims, gate option, sequence-length bucket). A key the table already holds for the current
kernel source and versions is skipped, so a run that is cut off continues where it stopped when run again. --all
tunes the whole table (fla_tl.autotune.commands.TUNE_SHAPES at D = 64, 128, 256). Prints the keys to tune and a
time estimate first; a key that fails is reported and skipped, and the exit code is 1."""


def format_table(rows, width: int | None = None) -> str:
    """a plain-text table with a header from the keys of `rows`; with `width`, the last column is cut to fit."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[str(row[k]) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    if width is not None:
        room = width - sum(widths[:-1]) - 2 * (len(keys) - 1)
        widths[-1] = max(min(widths[-1], room), len(keys[-1]))

    def line(values) -> str:
        return "  ".join(_cut(v, w).ljust(w) for v, w in zip(values, widths)).rstrip()

    return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- list


def _registered_ops():
    from . import ops  # noqa: F401 - registers the ops
    from .registry import registered_ops

    return registered_ops()


def _usable(spec) -> list:
    """the backends of `spec` that run some input (not an entry that refuses every input)."""
    return [b for b in spec.backends if not b.note]


def _common(values):
    return collections.Counter(values).most_common(1)[0][0] if values else None


def _limits(caps) -> dict[str, str]:
    """what a legend or a cell says about a backend beyond its flags."""
    from .registry import DTYPE_NAMES

    return {
        "device": ", ".join(caps.devices) if caps.devices else "any device",
        "cc": f"compute capability >= {'.'.join(map(str, caps.min_compute_capability))}"
        if caps.min_compute_capability else "any compute capability",
        "dtypes": "/".join(DTYPE_NAMES.get(d, str(d)) for d in caps.dtypes),
        "D": f"K,V<={caps.max_head_dim}" if caps.max_head_dim else "any K,V",
        "backward": "backward" if caps.backward else "no backward",
    }


def list_table(verbose: bool = False) -> str:
    """`list`: one line per op (mode, backends, what the TileLang backend supports) with a legend; `verbose`: every
    backend's capabilities, one line each."""
    from .registry import registry_rows

    if verbose:
        return format_table(registry_rows())
    specs = _registered_ops()
    tilelang = [b for s in specs for b in _usable(s) if b.name == "tilelang"]
    common = {k: _common([_limits(b.capabilities)[k] for b in tilelang]) for k in ("device", "cc", "dtypes", "D",
                                                                                   "backward")}
    rows, notes = [], []
    for spec in specs:
        usable = _usable(spec)
        tl = next((b.capabilities for b in usable if b.name == "tilelang"), None)
        if not usable:
            supports = "not provided (below)"
            notes.append(spec.backends[0].note)
        elif tl is None:
            supports = "-"
        else:
            words = [short for field, short in FLAGS if getattr(tl, field)]
            supports = " ".join(words + [v for k, v in _limits(tl).items() if v != common[k]])
        rows.append({"op": spec.name, "mode": spec.mode, "backends": ", ".join(b.name for b in usable) or "none",
                     "tilelang supports": supports})
    legend = [
        (f"tilelang: {common['device']}, {common['cc']}, {common['dtypes']}, {common['D']}, {common['backward']} "
         "unless its line says otherwise; torch: any device and float dtype, the fallback."),
        ("varlen: cu_seqlens; h0: initial_state; reverse: reverse=True; v-first: state_v_first=True; gate: a "
         "per-token gate g. Each backend's capabilities: python -m fla_tl list -v"),
    ]
    return "\n".join([format_table(rows, WIDTH), *_wrap(notes), "", *_wrap(legend)])


def _wrap(paragraphs) -> list[str]:
    import textwrap

    return [line for p in paragraphs for line in textwrap.wrap(p, WIDTH)]


# ---------------------------------------------------------------------------------------------- check


def _size(case) -> int:
    """the number of tensor elements in a case's arguments."""
    import torch

    def count(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel()
        if isinstance(x, (tuple, list)):
            return sum(count(item) for item in x)
        return 0

    return sum(count(v) for v in case.args.values())


def _ratio(detail: str) -> float:
    """the relative error in a `testing.compare` detail ("... ratio 1.2e-07 (tol ...)"), 0 when it has none."""
    try:
        return float(detail.split("ratio ")[1].split()[0])
    except (IndexError, ValueError):
        return 0.0


def _gpu() -> tuple[bool, str]:
    """(whether the TileLang kernels can run here, why not)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    cc = torch.cuda.get_device_capability()
    if cc < (9, 0):
        return False, f"{torch.cuda.get_device_name()} has compute capability {cc[0]}.{cc[1]}, they need >= 9.0"
    return True, ""


def _plan(specs, device, dtypes, full: bool) -> tuple[list, list]:
    """([(spec, dtype, cases)], [(op, dtype, error)] for ops whose case list failed); the smallest case of each op
    unless `full`."""
    import torch

    plan, broken = [], []
    for spec in specs:
        if spec.cases is None:
            continue
        for dtype in dtypes:
            torch.manual_seed(0)
            try:
                cases = list(spec.cases(device, dtype))
            except Exception as e:  # noqa: BLE001 - a broken case list is a failed check of its op
                broken.append((spec.name, dtype, _first_line(e)))
                continue
            if not full and cases:
                cases = [min(cases, key=_size)]
            plan.append((spec, dtype, cases))
    return plan, broken


def _run_case(spec, case, backend: str) -> tuple[str, str]:
    """(result, detail) of one case: "pass" with its worst comparison, "FAIL" with every failed one, or "skip" with
    the backend's refusal."""
    from .registry import BackendError
    from .testing import run_check

    try:
        results = run_check(spec.fn, case, backend)
    except BackendError as e:
        return "skip", str(e).split(": ", 2)[-1]
    except Exception as e:  # noqa: BLE001 - a crash is a failed check
        return "FAIL", _first_line(e)
    failed = [f"{r.name}: {r.detail}" for r in results if not r.passed]
    if failed:
        return "FAIL", "; ".join(failed)
    worst = max(results, key=lambda r: _ratio(r.detail), default=None)
    return "pass", f"worst {worst.name}: rel. error {_ratio(worst.detail):.1e}" if worst else "nothing compared"


def progress(total: int):
    """a tqdm progress bar on stderr, drawn only on a terminal: what runs (its description), elapsed and remaining
    time."""
    import shutil

    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=None, leave=False,
                ncols=min(WIDTH, shutil.get_terminal_size().columns),
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")


def _summary(specs, rows: list[dict], dtypes: list[str]) -> list[dict]:
    """one line per op: result and passed/run cases per dtype, seconds, and the first failure or skip reason (or why
    the op has no cases)."""
    by_op = collections.defaultdict(list)
    for row in rows:
        by_op[row["op"]].append(row)
    lines = []
    for spec in specs:
        found = by_op.get(spec.name, [])
        line = {"op": spec.name}
        for dtype in dtypes:
            results = [r["result"] for r in found if r["dtype"] == dtype]
            ran = sum(r != "skip" for r in results)
            verdict = "FAIL" if "FAIL" in results else "pass" if ran else "skip" if results else "-"
            line[dtype] = f"{verdict} {results.count('pass')}/{ran}" if ran else verdict
        line["seconds"] = f"{sum(r['seconds'] for r in found):.1f}"
        notes = [f"{r['dtype']} {r['case']}: {r['detail']}" for r in found if r["result"] == "FAIL"]
        notes += [r["detail"] for r in found if r["result"] == "skip"]
        if spec.cases is None:
            notes.append("not provided (below)" if not _usable(spec) else "no check cases")
        line["note"] = notes[0] if notes else ""
        lines.append(line)
    return lines


def _build_rows(verbose: bool) -> list[dict]:
    """the builds of `check --compile`: the retention ops' kernels at D = 64 in bf16 for sm_90a."""
    try:
        from .autotune.commands import build_kernels
        from .registry import get_op

        specs = [s for name in CHECK_BUILD_OPS for s in get_op(name).kernels(64, "bfloat16")]
        results = build_kernels(specs, ARCH, workers=2, verbose=verbose)
    except Exception as e:  # noqa: BLE001 - a crash of the whole build is one failed row
        return [{"kernel": "(all)", "result": "FAIL", "seconds": "-", "detail": _first_line(e)}]
    return [{"kernel": label, "result": "ok" if ok else "FAIL", "seconds": f"{seconds:.1f}", "detail": message}
            for label, ok, seconds, message in results]


def _run_plan(plan, backend: str, threads: int | None) -> list[dict]:
    """one row per case of `plan` (op, dtype, case, result, seconds, detail), with a progress bar; torch runs on
    `threads` threads when given."""
    import torch

    rows = []
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with progress(sum(len(cases) for _, _, cases in plan)) as bar:
            for spec, dtype, cases in plan:
                name = _dtype_name(dtype)
                for case in cases:
                    bar.set_description_str(f"{spec.name} {name} {case.label}")
                    start = time.perf_counter()
                    result, detail = _run_case(spec, case, backend)
                    rows.append({"op": spec.name, "dtype": name, "case": case.label, "result": result,
                                 "seconds": time.perf_counter() - start, "detail": detail})
                    bar.update()
    finally:
        torch.set_num_threads(before)
    return rows


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _print_summary(specs, rows: list[dict], names: list[str], builds: list[dict], skipped: list[str]) -> None:
    """one line per op, the counts, the failed builds and one line for what was skipped."""
    summary = _summary(specs, rows, names)
    print(format_table(summary, WIDTH))
    for spec in specs:
        if spec.cases is None and not _usable(spec):
            print(*_wrap(b.note for b in spec.backends[:1]), sep="\n")
    failed_ops = sum(any(line[n].startswith("FAIL") for n in names) for line in summary)
    passed_ops = sum(all(line[n].startswith("pass") for n in names) for line in summary)
    no_cases = sum(spec.cases is None for spec in specs)
    counts = collections.Counter(r["result"] for r in rows)
    print(f"\n{passed_ops} ops passed, {failed_ops} failed" + (f", {no_cases} without cases" if no_cases else "")
          + f"; {counts['pass']} cases passed, {counts['FAIL']} failed, {counts['skip']} skipped")
    if builds:
        bad = [r for r in builds if r["result"] == "FAIL"]
        print(f"kernel builds for {ARCH}: {len(builds) - len(bad)} built, {len(bad)} failed")
        for r in bad:
            print(_cut(f"  FAIL {r['kernel']}: {r['detail']}", WIDTH))
    if skipped:
        print(f"skipped: {'; '.join(skipped)}")


def check(ops: list[str] | None = None, full: bool = False, build: bool = False, verbose: bool = False,
          out=None) -> int:
    """run the registered ops (or `ops`) against their references on this machine and print one line per op: the
    smallest case of each in one dtype, or with `full` every case in two dtypes. With `build` or `full`, compile the
    retention kernels for sm_90a where nvcc is found. `verbose` prints every case (and keeps TileLang's logs), `out`
    (a text file) gets every case. Returns the number of failures."""
    import torch

    from .autotune.commands import find_nvcc, quiet_tilelang

    start = time.perf_counter()
    specs = [s for s in _registered_ops() if ops is None or s.name in ops]
    on_gpu, no_gpu = _gpu()
    if on_gpu:
        device, backend, dtypes = torch.device("cuda"), "tilelang", (torch.bfloat16, torch.float32)
        if not verbose:
            quiet_tilelang()
    else:
        device, backend, dtypes = torch.device("cpu"), "torch", (torch.float64, torch.float32)
    dtypes = dtypes if full else dtypes[:1]
    names = [_dtype_name(d) for d in dtypes]
    what = "every case" if full else "the smallest case of each op"
    print(f"fla_tl check: {backend} backend on {device.type}, {', '.join(names)}, {what} (torch {torch.__version__})",
          flush=True)

    plan, broken = _plan(specs, device, dtypes, full)
    rows = [{"op": op, "dtype": _dtype_name(d), "case": "(case list)", "result": "FAIL", "seconds": 0.0,
             "detail": error} for op, d, error in broken]
    # on a CPU the cases are small: one thread runs them several times faster than threads that wait on each other
    rows += _run_plan(plan, backend, None if on_gpu else 1)
    nvcc, no_nvcc = find_nvcc()
    builds = _build_rows(verbose) if (build or full) and nvcc else []

    if verbose or out is not None:
        detail = format_table([{**r, "seconds": f"{r['seconds']:.2f}"} for r in rows])
        detail += f"\n\nkernel builds for {ARCH}:\n{format_table(builds)}" if builds else ""
        if verbose:
            print(detail + "\n")
        if out is not None:
            out.write(detail + "\n")
    skipped = [] if on_gpu else [f"TileLang kernel runs ({no_gpu})"]
    if not (build or full):
        skipped.append("kernel builds (add --compile or --full)")
    elif not nvcc:
        skipped.append(f"kernel builds ({no_nvcc})")
    _print_summary(specs, rows, names, builds, skipped)
    failures = sum(r["result"] == "FAIL" for r in rows + builds)
    print(f"{'FAILED' if failures else 'passed'} in {time.perf_counter() - start:.0f} s")
    return failures


# ---------------------------------------------------------------------------------------------- the parser


def _op_list(parser: argparse.ArgumentParser, value: str) -> list[str]:
    """the `--ops` option as a list of registered ops (all by default); a parser error for an unknown one."""
    names = [spec.name for spec in _registered_ops()]
    if value == "all":
        return names
    ops = value.split(",")
    unknown = [op for op in ops if op not in names]
    if unknown:
        parser.error(f"--ops: unknown op(s) {', '.join(unknown)}; registered: {', '.join(sorted(names))}")
    return ops


# the gate options of the tunable kernels: none, a constant decay, a per-token gate, a per-key gate
GATES = ("none", "gamma", "g", "gk")


def _gates(parser: argparse.ArgumentParser, value: str | None) -> tuple[str, ...] | None:
    """the `--gates` option as a tuple (None: every gate option); a parser error for an unknown one."""
    if value is None:
        return None
    gates = tuple(value.split(","))
    if not set(gates) <= set(GATES):
        parser.error(f"--gates: expected a comma list of {', '.join(GATES)}; got {value!r}")
    return gates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fla_tl", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p_list = sub.add_parser("list", help="the ops, their backends and what the TileLang path supports")
    p_list.add_argument("-v", "--verbose", action="store_true", help="every backend's capabilities, one line each")

    p_check = sub.add_parser("check", help="every op against its reference on this machine", description=CHECK_HELP)
    p_check.add_argument("--full", action="store_true",
                         help="every case in two dtypes, and the kernel builds of --compile (minutes)")
    p_check.add_argument("--compile", action="store_true",
                         help=f"also build the retention kernels for {ARCH} (needs nvcc, no GPU)")
    p_check.add_argument("--ops", default="all", help="comma list of registered ops, or all (default)")
    p_check.add_argument("-v", "--verbose", action="store_true", help="print every case; keep TileLang's logs")
    p_check.add_argument("--out", metavar="FILE", help="write every case's result to FILE")

    p_compile = sub.add_parser(
        "compile", help="build kernels ahead into TileLang's cache (TILELANG_CACHE_DIR), no GPU needed")
    p_compile.add_argument("--arch", default=ARCH, help=f"CUDA arch (default {ARCH})")
    p_compile.add_argument("--ops", default="all", help="comma list of registered ops, or all (default)")
    p_compile.add_argument("--dims", default="64,128,256", help="head dims D (K = V = D), comma list")
    p_compile.add_argument("--dtypes", default="bfloat16", help="comma list of bfloat16, float16, float32")
    p_compile.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    p_compile.add_argument("--space", action="store_true",
                           help="also every config of the tuning search spaces (default: heuristic and table configs)")
    p_compile.add_argument("-v", "--verbose", action="store_true", help="print every kernel; keep TileLang's logs")

    p_tune = sub.add_parser("tune", help="tune the kernels' tile configs on this GPU and store them in a table",
                            description=TUNE_HELP)
    p_tune.add_argument("--all", action="store_true", help="the whole table: every tunable kernel at D = 64, 128, "
                        "256 and one shape per sequence-length bucket of fla's benchmark shapes")
    p_tune.add_argument("--ops", default="all", help="comma list of registered ops, or all (default)")
    p_tune.add_argument("--shapes", default=None,
                        help=f"comma list of BxTxHxD (bf16, K = V = D; default {TUNE_SHAPE}; not with --all)")
    p_tune.add_argument("--out", default=None, help="table file to write (default: the user table of this GPU)")
    p_tune.add_argument("--gates", default=None, help=f"comma list of gate options ({', '.join(GATES)}): none, "
                        "constant decay, per-token gate, per-key gate; default every one the ops launch")

    p_cache = sub.add_parser("cache", help="show or clear the user's tuning tables")
    p_cache.add_argument("action", choices=("show", "clear"))
    return parser


def _cache(action: str) -> int:
    from .autotune import cache_clear, cache_show

    if action == "show":
        print(cache_show())
        return 0
    try:
        removed = cache_clear()
    except OSError as e:
        print(f"python -m fla_tl cache clear: cannot remove {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"removed {len(removed)} file(s)" + "".join(f"\n  {p}" for p in removed))
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        print(list_table(args.verbose))
        return 0
    if args.command == "cache":
        return _cache(args.action)
    ops = _op_list(parser, args.ops)
    if args.command == "check":
        try:
            out = open(args.out, "w") if args.out else None  # noqa: SIM115 - closed below
        except OSError as e:
            parser.error(f"--out: cannot write {args.out}: {e.strerror or e}")
        try:
            failures = check(
                ops=None if args.ops == "all" else ops,
                full=args.full,
                build=args.compile,
                verbose=args.verbose,
                out=out,
            )
        finally:
            if out is not None:
                out.close()
        return 1 if failures else 0
    if args.command == "compile":
        try:
            dims = [int(d) for d in args.dims.split(",")]
        except ValueError:
            parser.error(f"--dims: expected a comma list of integers, got {args.dims!r}")
        from .autotune.commands import compile_ahead, find_nvcc

        nvcc, why = find_nvcc()
        if nvcc is None:
            print(f"python -m fla_tl compile: {why}; install the CUDA toolkit or set CUDA_HOME", file=sys.stderr)
            return 1
        failures = compile_ahead(
            args.arch,
            ops,
            dims,
            args.dtypes.split(","),
            workers=args.workers,
            space=args.space,
            verbose=args.verbose,
        )
        return 1 if failures else 0
    if args.all and args.shapes is not None:
        parser.error("--shapes: not with --all, which tunes its own shape set")
    text = args.shapes or TUNE_SHAPE
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 4 for shape in shapes):
        parser.error(f"--shapes: expected a comma list of BxTxHxD, got {text!r}")
    gates = _gates(parser, args.gates)
    from .autotune.commands import all_shapes, tune

    return tune(ops, all_shapes() if args.all else shapes, args.out, gates)
