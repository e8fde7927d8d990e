"""The op registry: ops, their backends' capabilities and verifiers, backend choice, and the torch custom ops.

Every public op is registered as an :class:`OpSpec` (name, variant, mode, reference, public function) with an
ordered list of :class:`Backend` entries, preferred first. A backend declares what it supports as data
(:class:`Capabilities`) and a verifier that returns every reason it refuses an input. The choice:

- `backend="name"` (or `FLA_TL_BACKEND=name`) forces one; if it refuses, :class:`BackendError` lists why;
- otherwise the first backend that accepts runs; falling back past the preferred one is logged once;
- if none accepts, one :class:`BackendError` lists every candidate and its reasons.

The forward and backward of every op are `torch.library` custom ops (`fla_tl::<op>_fwd`, `fla_tl::<op>_bwd`)
with fake implementations and autograd, so the public functions run inside `torch.compile(fullgraph=True)`.
The backend is resolved inside the custom op, at run time; backend modules are imported on first use.
"""

import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence

import torch

from .utils import log_once

ENV_BACKEND = "FLA_TL_BACKEND"
AUTO = "auto"

_DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


class BackendError(RuntimeError):
    """no backend can run an input: the forced one refused it, or every candidate did."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """what a backend supports, as data; `None` means no restriction."""

    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None = None
    min_compute_capability: tuple[int, int] | None = None
    varlen: bool = True
    initial_state: bool = True
    backward: bool = True
    reverse: bool = False
    state_v_first: bool = False
    gate: bool = False  # a per-token log gate `g`

    def describe(self) -> dict[str, str]:
        def flag(x: bool) -> str:
            return "yes" if x else "no"

        return {
            "device": ",".join(self.devices) if self.devices else "any",
            "dtypes": ",".join(_DTYPE_NAMES.get(d, str(d)) for d in self.dtypes),
            "max K,V": str(self.max_head_dim) if self.max_head_dim else "-",
            "min cc": ".".join(map(str, self.min_compute_capability)) if self.min_compute_capability else "-",
            "varlen": flag(self.varlen),
            "h0": flag(self.initial_state),
            "bwd": flag(self.backward),
            "reverse": flag(self.reverse),
            "v-first": flag(self.state_v_first),
            "g": flag(self.gate),
        }


@dataclasses.dataclass(frozen=True)
class OpInputs:
    """what a verifier looks at: a light description of one call (tests build it by hand to fake a GPU)."""

    device_type: str
    dtype: torch.dtype
    K: int
    V: int
    compute_capability: tuple[int, int] | None = None
    varlen: bool = False
    initial_state: bool = False
    backward: bool = False
    reverse: bool = False
    state_v_first: bool = False
    gate: bool = False


def describe_inputs(
    q: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backward: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    g: torch.Tensor | None = None,
) -> OpInputs:
    """the :class:`OpInputs` of a call on real tensors."""
    cc = None
    if q.device.type == "cuda":
        cc = tuple(torch.cuda.get_device_capability(q.device))
    return OpInputs(
        device_type=q.device.type,
        dtype=q.dtype,
        K=q.shape[-1],
        V=v.shape[-1],
        compute_capability=cc,
        varlen=cu_seqlens is not None,
        initial_state=initial_state is not None,
        backward=backward,
        reverse=reverse,
        state_v_first=state_v_first,
        gate=g is not None,
    )


def capability_reasons(caps: Capabilities, inputs: OpInputs) -> list[str]:
    """every reason the declared capabilities rule an input out (empty when they allow it)."""
    reasons = []
    if caps.devices is not None and inputs.device_type not in caps.devices:
        reasons.append(f"needs a {' or '.join(caps.devices)} tensor, got {inputs.device_type}")
    if inputs.dtype not in caps.dtypes:
        names = ", ".join(_DTYPE_NAMES.get(d, str(d)) for d in caps.dtypes)
        reasons.append(f"dtype {inputs.dtype} is not one of {names}")
    if caps.max_head_dim is not None:
        for name, d in (("K", inputs.K), ("V", inputs.V)):
            if d > caps.max_head_dim:
                reasons.append(f"head dim {name} = {d} exceeds {caps.max_head_dim}")
    if caps.min_compute_capability is not None and inputs.device_type == "cuda":
        cc = inputs.compute_capability
        if cc is None or tuple(cc) < caps.min_compute_capability:
            want = ".".join(map(str, caps.min_compute_capability))
            got = ".".join(map(str, cc)) if cc else "unknown"
            reasons.append(f"needs compute capability >= {want}, got {got}")
    for field, what in (
        ("varlen", "variable-length inputs (cu_seqlens)"),
        ("initial_state", "an initial state"),
        ("backward", "a backward pass"),
        ("reverse", "reverse=True"),
        ("state_v_first", "state_v_first=True"),
        ("gate", "a per-token gate `g`"),
    ):
        if getattr(inputs, field) and not getattr(caps, field):
            reasons.append(f"does not support {what}")
    return reasons


@dataclasses.dataclass
class Backend:
    """one implementation of an op.

    `fwd(q, k, v, g, g_gamma, initial_state, cu_seqlens, *, scale, output_final_state, reverse, state_v_first) ->
    (o, ht | None)` and `bwd(q, k, v, g, g_gamma, do, dht, initial_state, cu_seqlens, *, scale, reverse,
    state_v_first, ht) -> (dq, dk, dv, dg | None, dh0 | None)`; both import their heavy modules on first call. `verifier(inputs) -> list[str]` returns every reason it
    refuses (its capability reasons included).
    """

    name: str
    capabilities: Capabilities
    verifier: Callable[[OpInputs], list[str]]
    fwd: Callable
    bwd: Callable
    description: str = ""
    # set for an entry that refuses every input (not built yet, or dropped by fla): why, shown by `list`
    note: str = ""


@dataclasses.dataclass
class OpSpec:
    """one public op: its variant, mode (chunk | fused_chunk | fused_recurrent | parallel), reference and backends."""

    name: str
    variant: str
    mode: str
    reference: Callable
    fn: Callable | None = None
    backends: list[Backend] = dataclasses.field(default_factory=list)
    # `(B, T, H, device) -> [(label, kwargs)]`: the op's own arguments (gates, layer index, ...) for `check`, passed
    # to `fn` and `reference` alike; tensors among them that are floating point get a gradient
    check_cases: Callable | None = None
    # for ops outside the (q, k, v, state) pattern: `(device, dtype) -> [(name, passed, detail)]`, run by `check`
    self_check: Callable | None = None

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(
            f"`backend` must be one of {[b.name for b in self.backends]} or {AUTO!r} for {self.name}, got {name!r}"
        )


_OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """add an op to the registry (its backends may follow through :func:`register_backend`)."""
    if spec.name in _OPS:
        raise ValueError(f"op {spec.name!r} is already registered")
    _OPS[spec.name] = spec
    return spec


def register_backend(op: str, backend: Backend) -> None:
    """append a backend to an op; earlier registrations are preferred in the automatic choice."""
    spec = get_op(op)
    if any(b.name == backend.name for b in spec.backends):
        raise ValueError(f"backend {backend.name!r} is already registered for {op!r}")
    spec.backends.append(backend)


def get_op(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered: {sorted(_OPS)}") from None


def registered_ops() -> list[OpSpec]:
    return list(_OPS.values())


def requested_backend(backend: str | None) -> str:
    """the backend asked for: the argument, else `FLA_TL_BACKEND`, else `auto`."""
    if backend:
        return backend
    return os.environ.get(ENV_BACKEND, "").strip() or AUTO


def check_backend_name(spec: OpSpec, backend: str | None) -> None:
    """raise `ValueError` for a `backend=` argument that names no backend of the op."""
    if backend is not None and backend != AUTO:
        spec.backend(backend)


def select_backend(spec: OpSpec, inputs: OpInputs, backend: str | None = None) -> Backend:
    """the backend that runs `inputs`: the forced one (argument or env var) or the first that accepts."""
    requested = requested_backend(backend)
    if requested != AUTO:
        chosen = spec.backend(requested)
        reasons = chosen.verifier(inputs)
        if reasons:
            source = "backend=" if backend else f"{ENV_BACKEND}="
            raise BackendError(
                f"{spec.name}: the requested backend ({source}{requested!r}) cannot run this input: "
                + "; ".join(reasons)
            )
        return chosen
    refusals = []
    for candidate in spec.backends:
        reasons = candidate.verifier(inputs)
        if not reasons:
            if refusals:
                _log_fallback(spec, candidate, inputs, refusals)
            return candidate
        refusals.append((candidate.name, reasons))
    lines = "\n".join(f"  - {name}: {'; '.join(reasons)}" for name, reasons in refusals)
    raise BackendError(f"{spec.name}: no backend can run this input:\n{lines}")


def _log_fallback(spec: OpSpec, chosen: Backend, inputs: OpInputs, refusals) -> None:
    why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in refusals)
    what = chosen.description or f"the {chosen.name} backend"
    # a fallback on a GPU is a surprise worth a warning; on a CPU it is the plan
    level = logging.WARNING if inputs.device_type == "cuda" else logging.INFO
    log_once(
        ("fallback", spec.name, chosen.name, inputs.device_type, why),
        f"fla_tl: {spec.name} runs {what} on {inputs.device_type}: {why}",
        level=level,
    )


_IMPORT_ERRORS: dict[str, str | None] = {}


def import_reason(module: str) -> str | None:
    """why `module` cannot be imported (once per process), or None when it imports."""
    if module not in _IMPORT_ERRORS:
        try:
            importlib.import_module(module)
            _IMPORT_ERRORS[module] = None
        except Exception as e:  # noqa: BLE001 - any import failure is a refusal reason
            _IMPORT_ERRORS[module] = f"cannot import {module}: {type(e).__name__}: {e}"
    return _IMPORT_ERRORS[module]


def module_missing(module: str) -> bool:
    """whether a top-level module is absent, without importing it."""
    return importlib.util.find_spec(module) is None


def format_table(rows: Sequence[dict[str, str]]) -> str:
    """a plain-text table with a header row from the keys of `rows`."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys).rstrip()]
    lines.append("  ".join("-" * widths[k] for k in keys))
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys).rstrip() for r in rows]
    return "\n".join(lines)


def registry_rows() -> list[dict[str, str]]:
    """one row per (op, backend), preferred backend first."""
    rows = []
    for spec in _OPS.values():
        for i, b in enumerate(spec.backends):
            rows.append({
                "op": spec.name,
                "variant": spec.variant,
                "mode": spec.mode,
                "backend": b.name + (" (preferred)" if i == 0 else ""),
                **b.capabilities.describe(),
                "note": b.note,
            })
    return rows


def list_ops(file=None, quiet: bool = False) -> list[OpSpec]:
    """print the registry table (op, variant, mode, backends with their capabilities) to `file` (default stdout)
    unless `quiet`; return the ops."""
    if not quiet:
        print(format_table(registry_rows()), file=file or sys.stdout)
    return registered_ops()


def _ht_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def define_linear_attention_ops(name: str) -> tuple:
    """define `fla_tl::<name>_fwd` and `fla_tl::<name>_bwd` with fake kernels and autograd; return the forward entry
    point and the backward op.

    fwd: `(q, k, v, g?, g_gamma?, initial_state?, cu_seqlens?, scale, output_final_state, reverse, state_v_first,
    requires_grad, backend) -> (o, ht)`; bwd: `(q, k, v, g?, g_gamma?, do, dht?, ht?, initial_state?, cu_seqlens?,
    scale, reverse, state_v_first, backend) -> (dq, dk, dv, dg, dh0)` (`ht`, the forward's final state, is passed
    when there is a per-token gate and a final state). `g` is a per-token log gate `[B, T, H]` (it gets a
    gradient), `g_gamma` a per-head constant log decay `[H]` (no gradient, as in fla); ops without them pass None.
    Custom ops cannot return None: a missing `ht`, `dg` or `dh0` is an empty tensor. The returned forward entry
    point runs the custom op under `torch.compile`, and in eager mode the same bodies through a plain
    `autograd.Function` (the custom-op dispatcher costs about 100 us of host time per call, which dominates at small
    shapes).
    """

    def fwd_impl(q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, output_final_state, reverse, state_v_first,
                 requires_grad, backend):
        spec = get_op(name)
        inputs = describe_inputs(q, v, initial_state, cu_seqlens, requires_grad, reverse, state_v_first, g)
        chosen = select_backend(spec, inputs, backend or None)
        o, ht = chosen.fwd(
            q,
            k,
            v,
            g,
            g_gamma,
            initial_state,
            cu_seqlens,
            scale=scale,
            output_final_state=output_final_state,
            reverse=reverse,
            state_v_first=state_v_first,
        )
        if ht is None:
            ht = q.new_empty(0, dtype=_ht_dtype(q.dtype))
        return o.to(q.dtype), ht.to(_ht_dtype(q.dtype))

    def bwd_impl(q, k, v, g, g_gamma, do, dht, ht, initial_state, cu_seqlens, scale, reverse, state_v_first, backend):
        spec = get_op(name)
        inputs = describe_inputs(q, v, initial_state, cu_seqlens, True, reverse, state_v_first, g)
        chosen = select_backend(spec, inputs, backend or None)
        dq, dk, dv, dg, dh0 = chosen.bwd(
            q,
            k,
            v,
            g,
            g_gamma,
            do,
            dht,
            initial_state,
            cu_seqlens,
            scale=scale,
            reverse=reverse,
            state_v_first=state_v_first,
            ht=ht,
        )
        dg = q.new_empty(0) if g is None or dg is None else dg.to(g.dtype)
        dh0 = q.new_empty(0) if initial_state is None or dh0 is None else dh0.to(initial_state.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0

    @torch.library.custom_op(f"fla_tl::{name}_fwd", mutates_args=())
    def fwd_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None,
        g_gamma: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        scale: float,
        output_final_state: bool,
        reverse: bool,
        state_v_first: bool,
        requires_grad: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fwd_impl(
            q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, output_final_state, reverse, state_v_first,
            requires_grad, backend,
        )

    @fwd_op.register_fake
    def _(q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, output_final_state, reverse, state_v_first,
          requires_grad, backend):
        B, T, H, K = q.shape
        V = v.shape[-1]
        if initial_state is not None:
            N = initial_state.shape[0]
        elif cu_seqlens is not None:
            N = cu_seqlens.shape[0] - 1
        else:
            N = B
        o = q.new_empty(B, T, H, V)
        if not output_final_state:
            return o, q.new_empty(0, dtype=_ht_dtype(q.dtype))
        shape = (N, H, V, K) if state_v_first else (N, H, K, V)
        return o, q.new_empty(shape, dtype=_ht_dtype(q.dtype))

    @torch.library.custom_op(f"fla_tl::{name}_bwd", mutates_args=())
    def bwd_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None,
        g_gamma: torch.Tensor | None,
        do: torch.Tensor,
        dht: torch.Tensor | None,
        ht: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        scale: float,
        reverse: bool,
        state_v_first: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return bwd_impl(q, k, v, g, g_gamma, do, dht, ht, initial_state, cu_seqlens, scale, reverse, state_v_first,
                        backend)

    @bwd_op.register_fake
    def _(q, k, v, g, g_gamma, do, dht, ht, initial_state, cu_seqlens, scale, reverse, state_v_first, backend):
        dg = torch.empty_like(g) if g is not None else q.new_empty(0)
        dh0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty(0)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, dh0

    def save_context(ctx, inputs, output):
        (q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, output_final_state, reverse, state_v_first, _,
         backend) = inputs
        # a per-token gate's gradient needs <ht, dht>: keep the final state (an output, no copy)
        ht = output[1] if g is not None and output_final_state else None
        ctx.save_for_backward(q, k, v, g, g_gamma, initial_state, cu_seqlens, ht)
        ctx.scale = scale
        ctx.output_final_state = output_final_state
        ctx.reverse = reverse
        ctx.state_v_first = state_v_first
        ctx.backend = backend

    def make_backward(run_bwd):
        def backward(ctx, do, dht):
            q, k, v, g, g_gamma, initial_state, cu_seqlens, ht = ctx.saved_tensors
            if do is None:
                do = torch.zeros(q.shape[:3] + v.shape[-1:], dtype=q.dtype, device=q.device)
            if not ctx.output_final_state:
                dht = None
            dq, dk, dv, dg, dh0 = run_bwd(
                q,
                k,
                v,
                g,
                g_gamma,
                do.contiguous(),
                dht.contiguous() if dht is not None else None,
                ht,
                initial_state,
                cu_seqlens,
                ctx.scale,
                ctx.reverse,
                ctx.state_v_first,
                ctx.backend,
            )
            dg = dg if g is not None else None
            dh0 = dh0 if initial_state is not None else None
            return dq, dk, dv, dg, None, dh0, None, None, None, None, None, None, None

        return backward

    fwd_op.register_autograd(make_backward(bwd_op), setup_context=save_context)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return fwd_impl(*inputs)

        setup_context = staticmethod(save_context)
        backward = staticmethod(make_backward(bwd_impl))

    def forward(*inputs):
        if torch.compiler.is_compiling():
            return fwd_op(*inputs)
        return EagerFunction.apply(*inputs)

    return forward, bwd_op
