"""The one check harness: an op against its fp32 / fp64 reference on the same inputs, comparing every output (the
final states too) and the gradient of every input, with one per-dtype tolerance table.

Used by the tests, by `python -m fla_tl check` and by the benchmarks' correctness gate. A comparison passes when
`rms(actual - expected) <= ratio * rms(expected) + floor` (`TOLERANCES[dtype] = (ratio, floor)`) and `actual` has no
NaN or inf; outputs are allocated after :func:`poison_allocator` on a GPU, so an element a kernel never writes shows
up as NaN.
"""

import dataclasses
from collections.abc import Callable, Sequence

import torch

# fp32 inputs run their chunk matmuls on tensor cores in TF32 (10-bit mantissa), as fla's Triton kernels do by default
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (5e-3, 1e-5),
    torch.float16: (5e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """the dtype a reference runs in for inputs of `dtype`: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms(x: torch.Tensor) -> float:
    """root mean square in float64 (0 for an empty tensor)."""
    return x.double().pow(2).mean().sqrt().item() if x.numel() else 0.0


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """rms(actual - expected) / rms(expected), NaN when `actual` has a non-finite element."""
    if not torch.isfinite(actual).all():
        return float("nan")
    return rms(actual.double() - expected.double()) / max(rms(expected), 1e-30)


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[bool, str]:
    """(passed, detail) of the relative-RMS check of `actual` against `expected` at the tolerance of `dtype`."""
    if actual.shape != expected.shape:
        return False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = (~torch.isfinite(actual)).sum().item()
    if bad:
        return False, f"{bad} non-finite elements"
    if not torch.isfinite(expected).all():
        return False, "the reference has non-finite elements"
    ratio, floor = TOLERANCES[dtype]
    err, ref = rms(actual.double() - expected.double()), rms(expected)
    detail = f"rms err {err:.3e}, rms ref {ref:.3e}, ratio {err / max(ref, 1e-30):.3e} (tol {ratio:.0e} + {floor:.0e})"
    return err <= ratio * ref + floor, detail


def poison_allocator(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> None:
    """fill cached device memory with NaN and free it, so outputs a kernel allocates but never writes hold NaN."""
    nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 2)
    torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)


@dataclasses.dataclass
class Result:
    name: str
    passed: bool
    detail: str


@dataclasses.dataclass
class Case:
    """one check of an op: its arguments (tensors in the dtype under test, and options), the tensor arguments that
    get gradients (an argument holding a tuple of tensors: each of them), the reference called with the same
    arguments in fp32 / fp64 (`backend` is not passed to it), and names for the flattened outputs."""

    label: str
    args: dict
    grad: tuple[str, ...]
    reference: Callable
    outputs: tuple[str, ...] = ("o", "ht")
    dtype: torch.dtype | None = None
    out_dtypes: dict = dataclasses.field(default_factory=dict)


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [x for item in out for x in _flatten(item)]
    return []


def _leaves(args: dict, names: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    leaves = []
    for name in names:
        value = args[name]
        if isinstance(value, (tuple, list)):
            leaves += [(f"{name}[{i}]", x) for i, x in enumerate(value) if x is not None]
        elif value is not None:
            leaves.append((name, value))
    return leaves


def _with_grad(args: dict, names: Sequence[str], dtype: torch.dtype | None = None) -> dict:
    """a copy of `args`: floating tensors cast to `dtype` (when given) and detached, those in `names` requiring
    gradients; other values as they are."""

    def convert(x, grad: bool):
        if isinstance(x, (tuple, list)):
            return type(x)(convert(item, grad) for item in x)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        x = x.detach().to(dtype) if dtype is not None else x.detach()
        return x.requires_grad_() if grad else x

    return {name: convert(value, name in names) for name, value in args.items()}


def run_check(fn: Callable, case: Case, backend: str | None = None) -> list[Result]:
    """run `fn(**case.args, backend=backend)` and `case.reference` on copies in fp32 / fp64; compare every output and
    the gradient of every `case.grad` argument (random cotangents for every output)."""
    dtype = case.dtype or _leaves(case.args, case.grad)[0][1].dtype
    args = _with_grad(case.args, case.grad)
    kwargs = {"backend": backend} if backend is not None else {}
    outs = _flatten(fn(**args, **kwargs))
    cotangents = [torch.randn_like(x) for x in outs]
    leaves = _leaves(args, case.grad)
    grads = torch.autograd.grad(outs, [x for _, x in leaves], cotangents)

    ref_dtype = reference_dtype(dtype)
    ref_args = _with_grad(case.args, case.grad, ref_dtype)
    ref_outs = _flatten(case.reference(**ref_args))
    ref_leaves = _leaves(ref_args, case.grad)
    ref_grads = torch.autograd.grad(ref_outs, [x for _, x in ref_leaves], [c.to(ref_dtype) for c in cotangents])

    names = list(case.outputs) if len(case.outputs) == len(outs) else [f"out{i}" for i in range(len(outs))]
    results = []
    if len(ref_outs) != len(outs):
        results.append(Result("outputs", False, f"{len(outs)} outputs, the reference has {len(ref_outs)}"))
    for name, x, ref in zip(names, outs, ref_outs):
        want = case.out_dtypes.get(name)
        if want is not None and x.dtype != want:
            results.append(Result(name, False, f"dtype {x.dtype} != {want}"))
        else:
            results.append(Result(name, *compare(x, ref, dtype)))
    for (name, x), g, ref in zip(leaves, grads, ref_grads):
        if g.dtype != x.dtype:
            results.append(Result(f"d{name}", False, f"dtype {g.dtype} != {x.dtype}"))
        else:
            results.append(Result(f"d{name}", *compare(g, ref, dtype)))
    return results


def assert_matches(fn: Callable, case: Case, backend: str | None = None) -> None:
    """:func:`run_check`, raising `AssertionError` with every comparison that failed."""
    failed = [f"{r.name}: {r.detail}" for r in run_check(fn, case, backend) if not r.passed]
    assert not failed, f"{case.label}: " + "; ".join(failed)


def check_states(fn: Callable, reference: Callable, q, k, v, h0, *, cu_seqlens=None, backend=None, grad_kwargs=None,
                 **kwargs) -> None:
    """the (q, k, v, initial state) ops: `fn` against `reference` with the final state returned; o in q's dtype, the
    final state in fp32 (fp64 for fp64 inputs), the gradients of q, k, v, h0 and of every tensor in `grad_kwargs` in
    their inputs' dtypes; `kwargs` go to both unchanged."""
    grad_kwargs = grad_kwargs or {}
    args = {"q": q, "k": k, "v": v, "initial_state": h0, "output_final_state": True, "cu_seqlens": cu_seqlens,
            **grad_kwargs, **kwargs}
    case = Case(label=getattr(fn, "__name__", "op"), args=args,
                grad=("q", "k", "v", "initial_state", *grad_kwargs), reference=reference, dtype=q.dtype,
                out_dtypes={"o": q.dtype, "ht": reference_dtype(q.dtype)})
    assert_matches(fn, case, backend)


def state_case(label: str, reference: Callable, *, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype,
               device, lens: Sequence[int] | None = None, state_v_first: bool = False, grad_kwargs=None,
               **kwargs) -> Case:
    """a check of a (q, k, v, initial state) op: random q, v, L2-normalised k, an initial state; packed sequences of
    `lens` (B = 1) when given; `grad_kwargs` are extra tensors that get gradients (a gate), `kwargs` options."""
    if lens is not None:
        B, T = 1, sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
    N = len(lens) if lens is not None else B
    q = torch.randn(B, T, H, K, device=device).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    h0 = torch.randn((N, H, V, K) if state_v_first else (N, H, K, V), device=device).to(dtype)
    grad_kwargs = grad_kwargs or {}
    args = {"q": q, "k": k, "v": v, "initial_state": h0, "output_final_state": True,
            "cu_seqlens": cu if lens is not None else None, **grad_kwargs, **kwargs}
    if state_v_first:
        args["state_v_first"] = True
    return Case(label=label, args=args, grad=("q", "k", "v", "initial_state", *grad_kwargs), reference=reference,
                dtype=dtype, out_dtypes={"o": dtype, "ht": reference_dtype(dtype)})
