"""`python -m fla_tl list` prints the op registry; `check` runs every op against its reference; `compile` builds
kernels ahead into TileLang's cache; `cache show | clear` lists or removes the user's tuning tables."""

import argparse
import itertools
import sys
import time

import torch

from . import ops  # noqa: F401 - registers the ops
from .registry import format_table, list_ops, registered_ops
from .utils import compare


def _cases(spec):
    """small dense and varlen cases with an initial state; the recurrent options where the op has them."""
    caps = spec.backends[-1].capabilities
    options = [{}]
    if caps.reverse:
        options.append({"reverse": True})
    if caps.state_v_first:
        options.append({"state_v_first": True})
    if caps.reverse and caps.state_v_first:
        options.append({"reverse": True, "state_v_first": True})
    for opts in options:
        yield "dense", 2, (100,), 2, 32, 48, opts
        yield "varlen", 1, (30, 0, 100, 1), 2, 32, 48, opts


def _run_case(spec, backend, device, dtype, B, lens, H, K, V, opts, extra):
    T = sum(lens) if B == 1 else lens[0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device) if B == 1 else None
    N = len(lens) if B == 1 else B
    q = torch.randn(B, T, H, K, device=device)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v = torch.randn(B, T, H, V, device=device)
    state_shape = (N, H, V, K) if opts.get("state_v_first") else (N, H, K, V)
    h0 = torch.randn(state_shape, device=device)
    inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, h0)]
    grad_names = [name for name, x in extra.items() if isinstance(x, torch.Tensor) and name != "g_gamma"]
    extra = {name: (x.detach().to(dtype).requires_grad_() if name in grad_names else x) for name, x in extra.items()}
    o, ht = spec.fn(*inputs[:3], initial_state=inputs[3], output_final_state=True, cu_seqlens=cu, backend=backend,
                    **extra, **opts)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    wrt = inputs + [extra[name] for name in grad_names]
    grads = torch.autograd.grad((o, ht), wrt, (do, dht))
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref_inputs = [x.detach().to(ref_dtype).requires_grad_() for x in inputs]
    ref_extra = {name: (x.detach().to(ref_dtype).requires_grad_() if name in grad_names else x)
                 for name, x in extra.items()}
    ref_o, ref_ht = spec.reference(*ref_inputs[:3], initial_state=ref_inputs[3], output_final_state=True,
                                   cu_seqlens=cu, **ref_extra, **opts)
    ref_wrt = ref_inputs + [ref_extra[name] for name in grad_names]
    ref_grads = torch.autograd.grad((ref_o, ref_ht), ref_wrt, (do.to(ref_dtype), dht.to(ref_dtype)))
    names = ["o", "ht", "dq", "dk", "dv", "dh0"] + [f"d{name}" for name in grad_names]
    return [(name, *compare(a, b, dtype)) for name, a, b in zip(names, (o, ht, *grads), (ref_o, ref_ht, *ref_grads))]


def _check_ops(device: torch.device, backend: str, dtypes) -> list[dict]:
    from .registry import describe_inputs

    rows = []
    for spec in registered_ops():
        chosen = spec.backend(backend)
        if spec.self_check is not None:
            rows += _self_check_rows(spec, chosen, backend, device, dtypes)
            continue
        for dtype in dtypes:
            for kind, B, lens, H, K, V, opts in _cases(spec):
                torch.manual_seed(0)
                T = sum(lens) if B == 1 else lens[0]
                variants = spec.check_cases(B, T, H, device) if spec.check_cases else [("", {})]
                for extra_label, extra in variants:
                    label = " ".join(x for x in (kind, extra_label, *opts) if x)
                    row = {"op": spec.name, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
                           "case": label}
                    probe = torch.empty(B, T, H, K, device=device, dtype=dtype)
                    refusal = chosen.verifier(describe_inputs(
                        probe, torch.empty(B, T, H, V, device=device), probe, probe if kind == "varlen" else None,
                        True, opts.get("reverse", False), opts.get("state_v_first", False), extra.get("g")))
                    if refusal:
                        rows.append({**row, "result": "skip", "s": "-", "detail": "; ".join(refusal)})
                        continue
                    start = time.perf_counter()
                    try:
                        results = _run_case(spec, backend, device, dtype, B, lens, H, K, V, opts, extra)
                        ok = all(r[1] for r in results)
                        failed = [f"{name}: {detail}" for name, passed, detail in results if not passed]
                        worst = max(results, key=lambda r: float(r[2].split("ratio ")[1].split()[0]))
                        message = "; ".join(failed) if failed else f"worst {worst[0]}: {worst[2]}"
                    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
                        ok, message = False, f"{type(e).__name__}: {e}".splitlines()[0]
                    rows.append({**row, "result": "pass" if ok else "FAIL", "s": f"{time.perf_counter() - start:.2f}",
                                 "detail": message})
    return rows


def _self_check_rows(spec, chosen, backend, device, dtypes) -> list[dict]:
    """rows for an op with its own check (outside the (q, k, v, state) pattern), or a skip with the backend's reason."""
    from .registry import OpInputs

    rows = []
    for dtype in dtypes:
        row = {"op": spec.name, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "case": "dense"}
        cc = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
        refusal = chosen.verifier(OpInputs(device_type=device.type, dtype=dtype, K=16, V=16, compute_capability=cc,
                                           backward=True))
        if refusal:
            rows.append({**row, "result": "skip", "s": "-", "detail": "; ".join(refusal)})
            continue
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            results = spec.self_check(device, dtype)
            failed = [f"{name}: {detail}" for name, passed, detail in results if not passed]
            worst = max(results, key=lambda r: float(r[2].split("ratio ")[1].split()[0]))
            ok, message = not failed, "; ".join(failed) if failed else f"worst {worst[0]}: {worst[2]}"
        except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
            ok, message = False, f"{type(e).__name__}: {e}".splitlines()[0]
        rows.append({**row, "result": "pass" if ok else "FAIL", "s": f"{time.perf_counter() - start:.2f}",
                     "detail": message})
    return rows


def _check_compile() -> list[dict]:
    try:
        from .kernels.build import compile_check
    except ImportError as e:
        return [{"kernel": "(all)", "result": "skipped", "s": "-", "detail": f"no compile check: {e}"}]
    rows = []
    try:
        results = compile_check()
    except Exception as e:  # noqa: BLE001 - a crash of the whole check is one failed row
        return [{"kernel": "(all)", "result": "FAIL", "s": "-", "detail": f"{type(e).__name__}: {e}"}]
    for name, ok, seconds, message in results:
        rows.append({
            "kernel": name,
            "result": "pass" if ok else "FAIL",
            "s": f"{seconds:.1f}",
            "detail": str(message).splitlines()[0] if message else "",
        })
    return rows


def check(compile_kernels: bool = True) -> int:
    """run every registered op against its reference on this machine; return the number of failures."""
    on_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    if on_gpu:
        device, backend, dtypes = torch.device("cuda"), "tilelang", (torch.bfloat16, torch.float32)
    else:
        device, backend, dtypes = torch.device("cpu"), "torch", (torch.float64, torch.float32)
    print(f"fla_tl check: {backend} backend on {device} (torch {torch.__version__})")
    rows = _check_ops(device, backend, dtypes)
    print(format_table(rows))
    failures = sum(r["result"] == "FAIL" for r in rows)
    if compile_kernels and not on_gpu:
        print("\ncompile checks (fla_tl.kernels.build.compile_check):")
        compile_rows = _check_compile()
        print(format_table(compile_rows))
        failures += sum(r["result"] == "FAIL" for r in compile_rows)
    ran = [r for r in rows if r["result"] != "skip"]
    skipped = len(rows) - len(ran)
    print(f"\n{len(ran) - sum(r['result'] == 'FAIL' for r in ran)}/{len(ran)} op checks passed"
          f"{f', {skipped} skipped (the backend refuses them, reason in the table)' if skipped else ''}; "
          f"{failures} failure(s)")
    return failures


def _table_specs(arch: str, kernels: set[str]) -> list:
    """(name, factory, kwargs) of every tuned config in the shipped and user tables made on GPUs of `arch`."""
    import pathlib

    from .autotune import TuningTable, parse_key
    from .autotune.table import _cache_dir, _shipped_dir
    from .autotune.tuner import launch_spec

    capability = f"{arch[3]}.{arch[4:].rstrip('a')}" if arch.startswith("sm_") else arch
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
            name = fields["kernel"]
            specs.append((name, *launch_spec(name, int(dims["K"]), int(dims["V"]), dtype, gate,
                                             table.get(key)["config"])))
    return specs


def compile_ahead(arch: str, ops: list[str], dims: list[int], dtypes: list[str], workers: int,
                  space: bool = False, gates: tuple[str, ...] = ("gamma",)) -> int:
    """compile the kernels of `ops` at head dims `dims` (K = V) and `dtypes` into TileLang's cache: their heuristic
    configs, every config the tuning tables (shipped and user) hold for GPUs of `arch`, and with `space` every
    config of the search spaces that fits; return the number of failures."""
    import dataclasses

    from .autotune.configs import KERNELS
    from .autotune.tuner import OP_KERNELS, launch_spec
    from .kernels.build import build, op_kernel_specs

    registered = {spec.name: spec for spec in registered_ops()}
    kernels = {name for op in ops for name in OP_KERNELS.get(op, ())}
    specs, unlisted = [], set()
    for d in dims:
        for dtype in dtypes:
            for gate in gates:
                for op in ops:
                    found = op_kernel_specs(op, registered[op].variant, registered[op].mode, d, dtype, gate)
                    if found is None:
                        unlisted.add(op)
                    else:
                        specs += found
                if space:
                    for name in sorted(kernels):
                        for config in KERNELS[name].candidates(d, d, dtype):
                            specs.append((name, *launch_spec(name, d, d, dtype, gate, dataclasses.asdict(config))))
    specs += _table_specs(arch, kernels)
    unique = {}
    for spec in specs:
        unique.setdefault((spec[1], tuple(sorted(spec[2].items()))), spec)
    specs = list(unique.values())
    if unlisted:
        print(f"no ahead-of-time kernel list for {', '.join(sorted(unlisted))}: their kernels compile on first use",
              flush=True)
    print(f"compiling {len(specs)} kernels for {arch} ({', '.join(ops)}; D = {dims}; {', '.join(dtypes)}"
          f"{'; every config of the search spaces' if space else ''}) in {workers} processes", flush=True)
    results = build(specs, {"kind": "cuda", "arch": arch}, workers)
    rows = [
        {"kernel": name, "result": "ok" if ok else "FAIL", "s": f"{seconds:.1f}", "detail": message}
        for name, ok, seconds, message in results
    ]
    print(format_table(rows))
    failures = sum(not r[1] for r in results)
    print(f"{len(results) - failures} built, {failures} failed")
    return failures


def tune(ops: list[str], shapes: list[tuple[int, int, int, int]], out: str | None,
         gates: tuple[str, ...] = ("gamma",)) -> int:
    """tune every kernel of `ops` at each (B, T, H, D) shape in bf16 on this GPU, for each gate option of `gates`;
    store the entries in the user table (or in the table file `out`) and print the default vs tuned times."""
    from .autotune import TuningTable, device_info, record
    from .autotune.tuner import OP_KERNELS, make_runner, table_key, tune_kernel

    if not torch.cuda.is_available():
        print("python -m fla_tl tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gpu, _ = device_info(device)
    table = TuningTable.load(out) if out else None
    rows, done = [], set()
    for (B, T, H, D), gate in itertools.product(shapes, gates):
        for op in ops:
            for name in OP_KERNELS.get(op, ()):
                if (name, B, T, H, D, gate) in done:
                    continue
                done.add((name, B, T, H, D, gate))
                runner = make_runner(name, N=B, T=T, H=H, K=D, V=D, dtype=torch.bfloat16, device=device, gate=gate)
                entry = tune_kernel(name, runner, K=D, V=D, dtype=torch.bfloat16, gate=gate)
                entry["shape"] = {"B": B, "T": T, "H": H, "D": D}
                key = table_key(name, D, D, "bfloat16", T, device, gate)
                if table is not None:
                    table.put(key, entry)
                    table.save()
                else:
                    record(key, gpu, entry)
                rows.append({
                    "kernel": name,
                    "gate": gate,
                    "shape": f"{B}x{T}x{H}x{D}",
                    "default_ms": f"{entry['default_ms']:.4f}",
                    "tuned_ms": f"{entry['time_ms']:.4f}",
                    "speedup": f"{entry['default_ms'] / entry['time_ms']:.2f}",
                    "config": ", ".join(f"{k}={v}" for k, v in entry["config"].items()),
                })
    print(format_table(rows))
    return 0


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
    p_compile.add_argument("--gates", default="gamma", help="comma list of gate options: gamma (constant decay, "
                           "default), g (per-token gate)")
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
        gates = _gates(parser, args.gates)
        return 1 if compile_ahead(args.arch, ops, dims, args.dtypes.split(","), args.workers, args.space, gates) else 0
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
