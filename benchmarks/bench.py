"""Time fla_tl against fla (Triton), FlashQLA and causal SDPA at fla's benchmark shapes.

Modes: `fwd` (forward only, inputs without grad) and `fwdbwd` (forward + `o.backward(do)`).
For each (op, shape) a correctness gate runs first: fla_tl against fla (or, when fla is missing or refuses,
against an fp32 PyTorch reference where the op has one). A row whose gate fails gets no speed-up.

Writes one CSV row per (op, provider, mode, shape) as each finishes, and a PNG; prints a compact table last.
Ops, shapes and models live in benchmarks/specs.py; see benchmarks/README.md for the columns and the formulas.

    python benchmarks/bench.py --ops chunk_retention --shapes main --modes fwd,fwdbwd
    python benchmarks/bench.py --ops chunk --shapes fla --providers fla_tl,fla --resume --time-budget 480 --out X.csv
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# `python benchmarks/bench.py` puts benchmarks/ on the path, not the repo: make fla_tl importable uninstalled, and
# specs / plan where bench.py is loaded from elsewhere (the tests)
for _path in (REPO, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(1, str(_path))

from plan import (  # noqa: E402
    Budget,
    Case,
    done_keys,
    export_autotune,
    plan,
    read_csv,
    row_key,
    row_shape,
    write_csv,
)
from specs import (  # noqa: E402
    BWD_FLOP_FACTOR,
    NAMED_SHAPES,
    OP_SETS,
    OPS,
    REGISTRY_MODES,
    SHAPE_SYNTAX,
    Shape,
    op_consts,
    op_inputs,
    ops_of_mode,
    parse_shapes,
    registry_modes,
    sdpa_call,
    sdpa_flops,
    sdpa_inputs,
    takes_argument,
)

# the shared check harness
from fla_tl.testing import compare, rel_rms  # noqa: E402

START = time.monotonic()
# measured device-to-device copy ceiling (bytes read + bytes written) on the H100, GB/s
COPY_CEILING_GBPS = 3000.0
# a failed gate against fla: relative RMS of fla_tl against fla above this, or NaN. Both sides round (fla_tl and fla
# in the input dtype), so the bound is looser than the harness's table (fla_tl.testing.TOLERANCES), which applies
# when the gate compares against the fp32 reference instead
GATE_TOL = 5e-2
# L2 flush buffer, larger than any L2 (50 MB on H100)
FLUSH_BYTES = 256 * 1024 * 1024

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# where the inputs live (the tests run the loop on the CPU with a stand-in timer)
DEVICE = "cuda"
PROVIDERS = ("fla_tl", "fla", "flashqla", "sdpa")
MODES = ("fwd", "fwdbwd")


# ---------------------------------------------------------------------------------------------------------------------
# byte model, timing


def io_bytes(inputs: dict[str, torch.Tensor], out_numel: int, elem: int, mode: str) -> int:
    # fwd: read every input once (q, k, v) + write o; fwdbwd adds: read the inputs and do again + write a grad per input
    read_in = sum(x.numel() * x.element_size() for x in inputs.values())
    fwd = read_in + out_numel * elem
    if mode == "fwd":
        return fwd
    return fwd + read_in + out_numel * elem + read_in


def out_shape(op: str, shape: Shape, inputs: dict) -> tuple[int, ...]:
    B, T, H, D = shape.B, shape.T, shape.H, shape.D
    if op == "sdpa":
        return B, H, T, D
    # hgrn (inputs with "x") returns [B, T, H * D]
    return (B, T, H * D) if "x" in inputs else (B, T, shape.value_heads, D)


def case_flops(op: str, shape: Shape, mode: str) -> float:
    fn = sdpa_flops if op == "sdpa" else OPS[op].flops
    return fn(shape.B, shape.T, shape.value_heads, shape.D, shape.D) * (1 + BWD_FLOP_FACTOR if mode == "fwdbwd" else 1)


def quantile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    pos = p * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Timer:
    def __init__(self, warmup_ms: float, rep: int, max_case_ms: float, sleep_us: float = 0.0):
        self.warmup_ms = warmup_ms
        self.rep = rep
        self.max_case_ms = max_case_ms
        # gpu clock cycles to spin before each timed call, so the host enqueues ahead (0: launch overhead counts)
        self.sleep_cycles = int(sleep_us * 1980)
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def run(self, step: Callable[[], None], reset: Callable[[], None]) -> list[float]:
        """Warm up (>= 3 calls and warmup_ms), then time `step` with CUDA events; `reset` and the L2 flush run
        outside the timed region."""
        t0 = time.perf_counter()
        n = 0
        while n < 3 or (time.perf_counter() - t0) * 1e3 < self.warmup_ms:
            reset()
            step()
            torch.cuda.synchronize()
            n += 1
        # estimate one call, to fit the reps into max_case_ms (at least 5)
        reset()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        est = max(s.elapsed_time(e), 1e-3)
        reps = max(5, min(self.rep, int(self.max_case_ms / est)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            reset()
            self.flush.zero_()
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def capture_graph(step: Callable[[], None], reset: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`step` captured in a CUDA graph after three eager calls on a side stream. A host synchronisation inside the op
    (a `.item()`, a `.tolist()`, a copy to the host) or a launch on another stream breaks the capture: the error
    raised names the first exception of the chain, the op's own."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            reset()
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    # gradients allocated inside the capture live in the graph's pool and are rewritten by each replay
    reset()
    graph = torch.cuda.CUDAGraph()
    try:
        # the outer context puts the current stream back where a failed capture leaves the capture stream current
        with torch.cuda.stream(torch.cuda.current_stream()), torch.cuda.graph(graph):
            step()
    except Exception as e:
        cause = e
        while cause.__context__ is not None:
            cause = cause.__context__
        msg = str(cause).splitlines()[0][:160] if str(cause) else ""
        raise RuntimeError(f"CUDA graph capture failed: {type(cause).__name__}: {msg}") from e
    return graph


def peak_memory_mb(step: Callable[[], None], reset: Callable[[], None]) -> float:
    """the peak memory of one eager call above what is held before it (inputs, do, flush buffer), MiB."""
    reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    reset()
    return peak


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------------------------------
# the run


def resolve(path: str) -> Callable:
    mod, attr = path.split(":")
    return getattr(importlib.import_module(mod), attr)


def version(dist: str, module: str | None = None) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module:
        # a package may raise anything on import (FlashQLA refuses GPUs it has no kernels for)
        try:
            return getattr(importlib.import_module(module), "__version__", "?")
        except Exception:  # noqa: BLE001
            return ""
    return ""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def gpu_tag(name: str) -> str:
    """the GPU's short name for file names: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200"."""
    m = re.search(r"\b([a-z]*\d{3,}[a-z]*)\b", name.lower())
    return m.group(1) if m else slug(name)


def default_out(gpu: str, ops: list[str]) -> Path:
    """results/<gpu>-<op set>.csv: the op set of the ops (`OP_SETS`), sets joined by "+" when they span several."""
    sets = [s for s, members in OP_SETS.items() if any(op in members for op in ops)]
    name = "all" if len(sets) == len(OP_SETS) else "+".join(sets) or "custom"
    return HERE / "results" / f"{gpu_tag(gpu)}-{name}.csv"


def parse_ops(text: str) -> list[str]:
    """a comma list of op names (`OPS`), registry modes (`chunk`, ...: the ops fla_tl registers in that mode) or all."""
    ops: list[str] = []
    modes = None
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item == "all":
            found = list(OPS)
        elif item in REGISTRY_MODES:
            modes = modes if modes is not None else registry_modes()
            found = ops_of_mode(item, modes)
        elif item in OPS:
            found = [item]
        else:
            raise ValueError(f"unknown op {item!r}; expected all, a mode ({', '.join(REGISTRY_MODES)}) or one of "
                             f"{', '.join(OPS)}")
        ops += [op for op in found if op not in ops]
    return ops


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="all",
                   help=f"comma list of ops, modes ({', '.join(REGISTRY_MODES)}: every op fla_tl registers in that "
                        f"mode) or 'all' (default); ops: {', '.join(OPS)}")
    sets = "; ".join(f"{name}: {', '.join(s.name for s in shapes)}" for name, shapes in NAMED_SHAPES.items())
    p.add_argument("--shapes", default="fla",
                   help=f"comma list of set names and shapes ({SHAPE_SYNTAX}); default fla. Sets: {sets}")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd (default both)")
    p.add_argument("--providers", default="fla_tl,fla,sdpa",
                   help="comma list of fla_tl, fla, flashqla, sdpa (default fla_tl,fla,sdpa)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<gpu>-<op set>.csv)")
    p.add_argument("--plot", default=None, help="PNG path (default beside the CSV, same stem)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--append", action="store_true", help="keep the CSV's rows and add this run's (every case runs)")
    p.add_argument("--resume", action="store_true",
                   help="keep the CSV's rows and run only the cases it lacks (skipped rows are decided again)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no (op, shape) group that would end past SECONDS from the start; exit 0 with the "
                        "count of cases left")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time the replay of a CUDA graph of the call (fwd, or fwd + bwd); a failed capture is the "
                        "row's error")
    p.add_argument("--cache-dir", default=None,
                   help="Triton's cache (TRITON_CACHE_DIR: compiled kernels and fla's autotune results); default "
                        "$TRITON_CACHE_DIR, else benchmarks/results/cache/<gpu>")
    p.add_argument("--cache-export", default=None, metavar="FILE",
                   help="write the autotune results of --cache-dir (*.autotune.json) to FILE (.tar.gz) after each "
                        "group; unpack it into the next run's --cache-dir")
    p.add_argument("--warmup-ms", type=float, default=200.0, help="warm-up time per case after 3 calls (default 200)")
    p.add_argument("--rep", type=int, default=50, help="timed repetitions per case, at most (default 50)")
    p.add_argument(
        "--max-case-ms",
        type=float,
        default=3000.0,
        help="cap on timed GPU time per case: reps shrink to fit, never under 5 (default 3000)",
    )
    p.add_argument(
        "--sleep-us",
        type=float,
        default=0.0,
        help="spin the GPU this long before each timed call so host launch overhead is hidden (default 0: counted)",
    )
    p.add_argument("--skip-slow", action="store_true",
                   help="skip the slow cases (fused_recurrent ops, fla's titans reference) at large B*T*H")
    p.add_argument("--gate-tol", type=float, default=GATE_TOL,
                   help=f"gate threshold on the rel RMS against fla (default {GATE_TOL})")
    p.add_argument("--no-gate", action="store_true", help="skip the correctness gate (speed-ups then unreported)")
    p.add_argument("--fla-dispatch", action="store_true", help="leave fla's backend dispatch on (default: Triton path)")
    p.add_argument("--copy-gbps", type=float, default=COPY_CEILING_GBPS, help="copy ceiling for pct_of_copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="list the cases and their models; needs no GPU")
    args = p.parse_args(argv)

    try:
        args.ops = parse_ops(args.ops)
    except ValueError as e:
        p.error(f"--ops: {e}")
    try:
        args.shapes = parse_shapes(args.shapes)
    except ValueError as e:
        p.error(f"--shapes: {e}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; expected among {MODES}")
    args.providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    for x in args.providers:
        if x not in PROVIDERS:
            p.error(f"--providers: unknown provider {x!r}; expected among {PROVIDERS}")
    if args.resume and args.append:
        p.error("--resume and --append: give one (--resume keeps the CSV's rows and runs only what it lacks)")
    if args.time_budget is not None and args.time_budget <= 0:
        p.error(f"--time-budget: expected seconds > 0, got {args.time_budget}")
    return args


def cu_seqlens_check(args) -> Callable[[str], bool]:
    """op -> whether fla_tl's function takes cu_seqlens; imports fla_tl only where a packed shape asks."""
    if not any(s.seqs for s in args.shapes):
        return lambda op: True
    return lambda op: takes_argument(resolve(OPS[op].fla_tl), "cu_seqlens")


def dry_run(args) -> None:
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    done = done_keys(read_csv(Path(args.out))) if args.resume and args.out else None
    groups = plan(args, cu_seqlens_check(args), done)
    shapes = ", ".join(s.name for s in args.shapes)
    print(f"dry run: shapes {shapes}; {len(args.ops)} ops {args.ops}; modes {args.modes}; providers {args.providers}")
    if args.resume and not args.out:
        print("note: --resume needs --out here (the GPU's name picks the default file): listing every case")
    print(f"{'op':<34}{'prov':<10}{'mode':<8}{'shape':<22}{'MB moved':>10}{'GFLOP':>10}  note")
    for g in groups:
        for c in g.cases:
            s = c.shape
            # meta tensors: the shapes without memory
            if c.op == "sdpa":
                inputs = sdpa_inputs(s.B, s.T, s.H, s.D, DTYPES[args.dtype], "meta")
            else:
                inputs = op_inputs(OPS[c.op], s, DTYPES[args.dtype], "meta")
            numel = math.prod(out_shape(c.op, s, inputs))
            nbytes = io_bytes(inputs, numel, elem, c.mode)
            fl = case_flops(c.op, s, c.mode)
            print(f"{c.op:<34}{c.provider:<10}{c.mode:<8}{s.name:<22}{nbytes / 1e6:>10.1f}{fl / 1e9:>10.1f}"
                  f"  {c.skip or ''}")
    runnable = sum(g.runnable() for g in groups)
    skipped = sum(len(g.cases) for g in groups) - runnable
    print(f"{runnable} cases to run in {sum(g.runnable() > 0 for g in groups)} (op, shape) groups, {skipped} skipped"
          + (f" ({len(done)} rows already in {args.out})" if done is not None else ""))
    print(f"gate: fla_tl vs fla, rel RMS <= {args.gate_tol} (fallback: fp32 reference, fla_tl.testing.TOLERANCES)")
    print(f"fla path: {'dispatch' if args.fla_dispatch else 'triton (FLA_DISABLE_BACKEND_DISPATCH=1)'}; "
          f"timing: {'CUDA graph replay' if args.cuda_graph else 'CUDA events'}")


def fmt(x, spec=".3f") -> str:
    return "" if x is None or x == "" else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return 0
    if not torch.cuda.is_available():
        print("bench.py: no CUDA GPU here; run it on a GPU machine (or use --dry-run to list the cases)")
        return 2

    # fla's Triton kernels, not whatever backend fla would dispatch to, unless asked
    if not args.fla_dispatch:
        os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    fla_path = "triton" if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH", "0") == "1" else "dispatch"

    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else default_out(gpu, args.ops)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    timing = "graph" if args.cuda_graph else "events"

    # fla 0.6.0 autotunes with Triton's cache_results (FLA_CACHE_RESULTS=1, its default): the results persist in
    # Triton's cache directory, set before fla (and Triton) first run a kernel
    cache_dir = Path(args.cache_dir or os.environ.get("TRITON_CACHE_DIR") or HERE / "results" / "cache" / gpu_tag(gpu))
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir.resolve())
    os.environ.setdefault("FLA_CACHE_RESULTS", "1")
    cached = len(list(cache_dir.rglob("*.autotune.json")))

    # resolve the callables once; a package that does not import skips its provider's rows
    fns: dict[tuple[str, str], Callable | str] = {}
    for op in args.ops:
        spec = OPS[op]
        for prov, target in (("fla_tl", spec.fla_tl), ("fla", spec.fla), ("flashqla", spec.flashqla)):
            if prov not in args.providers or (prov == "flashqla" and not target):
                continue
            if not target:
                fns[op, prov] = "skipped: no fla counterpart"
                continue
            try:
                fns[op, prov] = resolve(target)
            except Exception as e:  # noqa: BLE001
                msg = str(e).splitlines()[0][:120] if str(e) else ""
                fns[op, prov] = f"skipped: {target} not importable ({type(e).__name__}: {msg})"
    # one line per provider that does not import
    missing = {}
    for (op, prov), fn in fns.items():
        if isinstance(fn, str) and "not importable" in fn:
            missing.setdefault(prov, []).append(op)
    for prov, ops in missing.items():
        print(f"note: {prov}'s rows of {len(ops)} op(s) skipped: {fns[ops[0], prov].removeprefix('skipped: ')}",
              file=sys.stderr)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": version("triton", "triton"),
        "tilelang": version("tilelang"),
        "fla_version": version("fla-core") or version("flash-linear-attention"),
        "fla_tl_version": version("fla-tl", "fla_tl"),
        "dtype": args.dtype,
        "fla_path": fla_path,
        "timing": timing,
    }
    print(
        f"{gpu} | torch {meta['torch']} triton {meta['triton']} tilelang {meta['tilelang']} "
        f"fla {meta['fla_version'] or '-'} ({fla_path}) fla_tl {meta['fla_tl_version'] or '-'} "
        f"flash_qla {version('flash-qla', 'flash_qla') or '-'} | timing: {timing}"
    )
    print(f"Triton cache: {cache_dir} ({cached} autotune results)")

    previous = read_csv(out) if args.append or args.resume else []
    done = done_keys(previous) if args.resume else None
    unavailable = {key: fn for key, fn in fns.items() if isinstance(fn, str)}
    groups = plan(args, cu_seqlens_check(args), done, unavailable)
    total = sum(g.runnable() for g in groups)
    if args.resume:
        print(f"resume: {len(done)} rows in {out}; {total} cases to run")
    torch.manual_seed(args.seed)
    timer = Timer(args.warmup_ms, args.rep, args.max_case_ms, args.sleep_us)
    budget = Budget(args.time_budget, START)
    rows: list[dict] = []
    # fla median per (op, shape, mode), for the ratio: this run's, else the CSV's newest on this GPU
    fla_ms: dict[tuple, float] = {}
    for r in sorted(previous, key=lambda r: r.get("date", "")):
        if r["provider"] == "fla" and r.get("median_ms") and r.get("gpu") == gpu and row_key(r)[4] == timing:
            fla_ms[r["op"], row_shape(r), r["mode"]] = float(r["median_ms"])
    data: dict[tuple, tuple] = {}

    def get_inputs(op: str, shape: Shape) -> tuple[dict, torch.Tensor]:
        make = sdpa_inputs if op == "sdpa" else OPS[op].inputs
        key = (make, shape)
        if key not in data:
            data.clear()
            torch.cuda.empty_cache()
            if op == "sdpa":
                inputs = sdpa_inputs(shape.B, shape.T, shape.H, shape.D, dtype, DEVICE)
            else:
                inputs = op_inputs(OPS[op], shape, dtype, DEVICE)
            do = torch.randn(out_shape(op, shape, inputs), dtype=dtype, device=DEVICE)
            data[key] = (inputs, do)
        return data[key]

    def get_consts(op: str, shape: Shape) -> dict:
        return {} if op == "sdpa" else op_consts(OPS[op], shape, DEVICE)

    def gate(case: Case, fla_skip: str | None) -> tuple[float | None, str]:
        if args.no_gate:
            return None, "n/a (--no-gate)"
        op, shape, mode = case.op, case.shape, case.mode
        spec = OPS[op]
        f_tl = fns.get((op, "fla_tl"))
        if not callable(f_tl):
            return None, "n/a (no fla_tl)"
        inputs, do = get_inputs(op, shape)
        consts = get_consts(op, shape)
        # a slow fla (titans' pure-PyTorch reference) is not called by the gate either
        refs = [("fla", None if fla_skip else fns.get((op, "fla"))), ("reference", spec.reference)]
        reasons = []

        def run(fn, cast=None, **kw):
            xs = {n: (t.detach().clone() if cast is None else t.detach().to(cast)).requires_grad_(mode == "fwdbwd")
                  for n, t in inputs.items()}
            with torch.set_grad_enabled(mode == "fwdbwd"):
                o = first(fn(**xs, **consts, **kw))
                if mode == "fwdbwd":
                    o.backward(do.to(o.dtype))
            return [o.detach()] + ([xs[n].grad for n in xs] if mode == "fwdbwd" else [])

        def max_err(a, b):
            return max(rel_rms(x, y) for x, y in zip(a, b))

        for ref_name, ref_fn in refs:
            if not callable(ref_fn):
                continue
            try:
                results = [run(f_tl), run(ref_fn)]
                err = max_err(*results)
                if ref_name == "fla":
                    ok = not math.isnan(err) and err <= args.gate_tol
                else:
                    # the fp32 reference: the check harness's tolerance for the input dtype, per output and gradient
                    ok = not math.isnan(err) and all(compare(x, y, dtype)[0] for x, y in zip(*results))
                if not ok and ref_name == "fla" and not math.isnan(err):
                    # fla_tl and fla differ: which of them is the closer to fla_tl's fp32 torch backend on the same
                    # inputs in fp32? fla_tl passes when its error is no larger than fla's
                    truth = run(f_tl, cast=torch.float32, backend="torch")
                    e_tl, e_fla = max_err(results[0], truth), max_err(results[1], truth)
                    del truth
                    if e_tl <= e_fla:
                        return err, f"PASS (vs fp32 torch: fla_tl {e_tl:.2e} <= fla {e_fla:.2e})"
                    return err, f"FAIL (vs fp32 torch: fla_tl {e_tl:.2e} > fla {e_fla:.2e})"
                del results
                label = "PASS" if ok else "FAIL"
                return err, label if ref_name == "fla" else f"{label} (vs reference)"
            except Exception as e:  # noqa: BLE001
                reasons.append(f"{ref_name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
                torch.cuda.empty_cache()
        return None, "n/a (" + ("; ".join(reasons) or "no reference") + ")"

    def measure(fn: Callable, inputs: dict, do: torch.Tensor, mode: str, consts: dict) -> tuple[list[float], float]:
        grad = mode == "fwdbwd"
        xs = {n: t.detach().clone().requires_grad_(grad) for n, t in inputs.items()}

        def step():
            with torch.set_grad_enabled(grad):
                o = first(fn(**xs, **consts))
                if grad:
                    o.backward(do.to(o.dtype))

        def reset():
            for x in xs.values():
                x.grad = None

        if args.cuda_graph:
            graph = capture_graph(step, reset)
            try:
                times = timer.run(graph.replay, lambda: None)
            finally:
                del graph
        else:
            times = timer.run(step, reset)
        return times, peak_memory_mb(step, reset)

    def tile_configs() -> str:
        """where this process's fla_tl launches took their tile configs so far (`FLA_TL_AUTOTUNE` mode, then counts of
        resolved (kernel, dims, dtype, gate, length bucket) keys from the tuning tables, the heuristics, and tuned
        here): a timed process shows `tuned 0`."""
        from fla_tl.autotune.resolve import resolution_counts
        from fla_tl.autotune.table import mode

        counts = resolution_counts()
        return f"{mode()}: table {counts['table']}, heuristic {counts['heuristic']}, tuned {counts['tuned']}"

    def run_case(case: Case, fla_skip: str | None) -> dict:
        op, shape, mode, prov = case.op, case.shape, case.mode, case.provider
        row = dict(meta, op=op, provider=prov, mode=mode, B=shape.B, T=shape.T, H=shape.H, D=shape.D,
                   HV=shape.HV or "", seqs=shape.seqs or "")
        key = (op, shape.name, mode)
        fn = sdpa_call if op == "sdpa" else fns.get((op, prov))
        skip = case.skip
        if skip is None and shape.seqs and not takes_argument(fn, "cu_seqlens"):
            skip = f"skipped: {prov}'s {op} takes no cu_seqlens (packed sequences)"
        if skip is None and prov == "fla_tl" and op != "sdpa":
            err, label = gate(case, fla_skip)
            row["gate_rel_rms"] = fmt(err, ".3e")
            row["gate"] = label
        if skip:
            row["status"] = skip
            return row
        try:
            inputs, do = get_inputs(op, shape)
            times, peak_mb = measure(fn, inputs, do, mode, get_consts(op, shape))
            med = statistics.median(times)
            nbytes = io_bytes(inputs, do.numel(), elem, mode)
            gbps = nbytes / (med * 1e-3) / 1e9
            row.update(
                median_ms=fmt(med, ".4f"),
                p20_ms=fmt(quantile(times, 0.2), ".4f"),
                p80_ms=fmt(quantile(times, 0.8), ".4f"),
                gbps=fmt(gbps, ".1f"),
                pct_of_copy=fmt(100 * gbps / args.copy_gbps, ".1f"),
                tflops=fmt(case_flops(op, shape, mode) / (med * 1e-3) / 1e12, ".2f"),
                peak_mem_mb=fmt(peak_mb, ".1f"),
                status=f"ok ({len(times)} reps)",
            )
            if prov == "fla_tl":
                row["tile_configs"] = tile_configs()
            if prov == "fla":
                fla_ms[key] = med
            if prov == "fla_tl" and key in fla_ms and row.get("gate", "").startswith("PASS"):
                row["ratio_to_fla"] = fmt(med / fla_ms[key], ".3f")
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            row["status"] = f"error: {type(e).__name__}: {msg}"
            print(f"[{op} {prov} {mode} {shape}] {row['status']}", file=sys.stderr)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            # a failed launch or capture can leave an error on the stream: surface it here, not in the next case
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return row

    stopped = None
    for i, group in enumerate(groups):
        if not budget.allows(group.runnable()):
            left = groups[i:]
            stopped = (sum(g.runnable() for g in left), sum(g.runnable() > 0 for g in left))
            break
        # the fla case's skip reason, for the gate of the fla_tl cases
        fla_skip = {c.mode: c.skip for c in group.cases if c.provider == "fla"}
        for case in group.cases:
            t0 = time.monotonic()
            row = run_case(case, fla_skip.get(case.mode))
            if case.skip is None:
                budget.record(time.monotonic() - t0)
            # a new row of a key replaces the CSV's skipped rows of that key
            previous = [r for r in previous
                        if not (row_key(r) == row_key(row) and r.get("status", "").startswith("skipped"))]
            rows.append(row)
            print(
                f"{case.op:<26} {case.provider:<9} {case.mode:<7} {case.shape.name:<20} "
                f"{row.get('median_ms', '') or '-':>10} ms  {row.get('gbps', '') or '-':>7} GB/s  "
                f"{row.get('gate', '')} {row['status']}",
                flush=True,
            )
            # rewrite after each row, so a run cut short keeps what it measured
            write_csv(out, previous + rows)
        if args.cache_export:
            export_autotune(cache_dir, Path(args.cache_export))

    print(f"\nCSV: {out}")
    if args.cache_export:
        n = export_autotune(cache_dir, Path(args.cache_export))
        print(f"autotune results: {n} files in {args.cache_export} (unpack into the next run's --cache-dir)")
    if not args.no_plot:
        plot(previous + rows if args.append or args.resume else rows, plot_path)
    summary(rows)
    if stopped:
        est = budget.estimate()
        print(f"\ntime budget: stopped after {time.monotonic() - START:.0f} s of {args.time_budget:.0f} s "
              f"(~{est or 0:.0f} s per case); {stopped[0]} cases in {stopped[1]} (op, shape) groups left: "
              f"run again with --resume")
    else:
        print("\nall cases done")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing, no plot written")
        return
    ok = [r for r in rows if r.get("median_ms")]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    if not modes:
        print("note: nothing measured, no plot written")
        return
    fig, axes = plt.subplots(len(modes), 1, figsize=(16, 5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mr = [r for r in ok if r["mode"] == mode]
        shapes = list(dict.fromkeys(row_shape(r) for r in mr))
        series = list(dict.fromkeys((r["op"], r["provider"]) for r in mr))
        width = 0.8 / max(len(series), 1)
        for i, (op, prov) in enumerate(series):
            vals = {row_shape(r): float(r["median_ms"]) for r in mr if (r["op"], r["provider"]) == (op, prov)}
            xs = [j + (i - (len(series) - 1) / 2) * width for j, s in enumerate(shapes) if s in vals]
            ys = [vals[s] for s in shapes if s in vals]
            label = "sdpa (causal flash)" if op == "sdpa" else f"{op} / {prov}"
            ax.bar(xs, ys, width, label=label, hatch="//" if prov == "fla" else None)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_xlabel("B x T x H x D")
        ax.set_title(f"{mode}, {mr[0]['dtype']}, {mr[0]['gpu']}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"PNG: {path}")


def summary(rows: list[dict]) -> None:
    by = {(r["op"], r["mode"], row_shape(r), r["provider"]): r for r in rows}
    qla = any(r["provider"] == "flashqla" for r in rows)
    print(f"\n{'op':<26} {'mode':<7} {'shape':<20} {'fla_tl ms':>10} {'fla ms':>10} {'ratio':>7}  {'gate':<6} "
          f"{'rel_rms':<10}" + (f" {'flashqla ms':>11}" if qla else ""))
    seen = set()
    for r in rows:
        shape = row_shape(r)
        k = (r["op"], r["mode"], shape)
        if k in seen:
            continue
        seen.add(k)
        if r["op"] == "sdpa":
            s = by.get(k + ("sdpa",), {})
            print(f"{'sdpa':<26} {r['mode']:<7} {shape:<20} {s.get('median_ms') or s.get('status', '')[:30]:>10}")
            continue
        tl, fl, fq = (by.get(k + (p,), {}) for p in ("fla_tl", "fla", "flashqla"))
        gate = (tl.get("gate") or "-").split()[0]
        print(f"{r['op']:<26} {r['mode']:<7} {shape:<20} {tl.get('median_ms') or '-':>10} "
              f"{fl.get('median_ms') or '-':>10} {tl.get('ratio_to_fla') or '-':>7}  {gate:<6} "
              f"{tl.get('gate_rel_rms') or '':<10}" + (f" {fq.get('median_ms') or '-':>11}" if qla else ""))
    noisy = [r for r in rows if r.get("p20_ms") and float(r["p80_ms"]) > 1.5 * float(r["p20_ms"])]
    if noisy:
        print(f"\n{len(noisy)} rows with p80 > 1.5x p20 (host-bound or noisy; try --sleep-us 2000):")
        for r in noisy:
            print(f"  {r['op']} {r['provider']} {r['mode']} {row_shape(r)}: {r['p20_ms']}..{r['p80_ms']}")
    errs = [r for r in rows if r.get("status", "").startswith("error")]
    if errs:
        print(f"\n{len(errs)} error rows:")
        for r in errs:
            print(f"  {r['op']} {r['provider']} {r['mode']} {row_shape(r)}: {r['status'][:150]}")


if __name__ == "__main__":
    sys.exit(main())
