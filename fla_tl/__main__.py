"""`python -m fla_tl list` prints the op registry; `python -m fla_tl check` runs every op against its reference."""

import argparse
import sys
import time

import torch

from . import ops  # noqa: F401 - registers the ops
from .registry import format_table, list_ops, registered_ops
from .utils import compare


def _cases(spec, device: torch.device, dtype: torch.dtype):
    """small dense and varlen cases with an initial state; the recurrent options where the op has them."""
    recurrent = spec.backends[0].capabilities.reverse
    options = [{}]
    if recurrent:
        options += [{"reverse": True}, {"state_v_first": True}, {"reverse": True, "state_v_first": True}]
    for opts in options:
        yield "dense", 2, (100,), 2, 32, 48, opts
        yield "varlen", 1, (30, 0, 100, 1), 2, 32, 48, opts


def _run_case(spec, backend, device, dtype, B, lens, H, K, V, opts):
    T = sum(lens) if B == 1 else lens[0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device) if B == 1 else None
    N = len(lens) if B == 1 else B
    q = torch.randn(B, T, H, K, device=device)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v = torch.randn(B, T, H, V, device=device)
    state_shape = (N, H, V, K) if opts.get("state_v_first") else (N, H, K, V)
    h0 = torch.randn(state_shape, device=device)
    inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, h0)]
    o, ht = spec.fn(*inputs[:3], initial_state=inputs[3], output_final_state=True, cu_seqlens=cu, backend=backend,
                    **opts)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o, ht), inputs, (do, dht))
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref_inputs = [x.detach().to(ref_dtype).requires_grad_() for x in inputs]
    ref_o, ref_ht = spec.reference(*ref_inputs[:3], initial_state=ref_inputs[3], output_final_state=True,
                                   cu_seqlens=cu, **opts)
    ref_grads = torch.autograd.grad((ref_o, ref_ht), ref_inputs, (do.to(ref_dtype), dht.to(ref_dtype)))
    results = []
    for name, a, b in zip(("o", "ht", "dq", "dk", "dv", "dh0"), (o, ht, *grads), (ref_o, ref_ht, *ref_grads)):
        results.append((name, *compare(a, b, dtype)))
    return results


def _check_ops(device: torch.device, backend: str, dtypes) -> list[dict]:
    rows = []
    for spec in registered_ops():
        for dtype in dtypes:
            for kind, B, lens, H, K, V, opts in _cases(spec, device, dtype):
                torch.manual_seed(0)
                label = kind + "".join(f" {key}" for key in opts)
                start = time.perf_counter()
                try:
                    results = _run_case(spec, backend, device, dtype, B, lens, H, K, V, opts)
                    ok = all(r[1] for r in results)
                    failed = [f"{name}: {detail}" for name, passed, detail in results if not passed]
                    worst = max(results, key=lambda r: float(r[2].split("ratio ")[1].split()[0]))
                    message = "; ".join(failed) if failed else f"worst {worst[0]}: {worst[2]}"
                except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
                    ok, message = False, f"{type(e).__name__}: {e}".splitlines()[0]
                rows.append({
                    "op": spec.name,
                    "backend": backend,
                    "dtype": str(dtype).replace("torch.", ""),
                    "case": label,
                    "result": "pass" if ok else "FAIL",
                    "s": f"{time.perf_counter() - start:.2f}",
                    "detail": message,
                })
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
    total = len(rows)
    print(f"\n{total - sum(r['result'] == 'FAIL' for r in rows)}/{total} op checks passed; {failures} failure(s)")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fla_tl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the op registry: op, variant, mode, backends and their capabilities")
    p_check = sub.add_parser("check", help="run every op against its reference; nonzero exit on any failure")
    p_check.add_argument("--no-compile", action="store_true", help="skip the TileLang compile checks")
    args = parser.parse_args(argv)
    if args.command == "list":
        list_ops()
        return 0
    return 1 if check(compile_kernels=not args.no_compile) else 0


if __name__ == "__main__":
    sys.exit(main())
