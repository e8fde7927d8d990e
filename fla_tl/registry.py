"""The op registry and the one path every op runs through.

An op is an :class:`OpSpec`: name, variant, mode, the signature of its kernel-level call (`schema`), its reference,
and its :class:`Backend` entries, preferred first. Each backend declares what it supports as data
(:class:`Capabilities`); its verifier returns every reason it refuses an input. :func:`register` decorates the op's
public function: it records the op and defines two `torch.library` custom ops, `fla_tl::<op>_fwd` and
`fla_tl::<op>_bwd`, with fake implementations and autograd, so every op runs inside `torch.compile(fullgraph=True)`.

The kernel-level call, `spec.run(backend, **args)`:

- under `torch.compile` it calls the custom ops, which choose the backend at run time;
- in eager mode it chooses the backend first: a backend with a differentiable PyTorch form runs it directly, the
  others run the custom ops' bodies through a plain `autograd.Function` (the custom-op dispatcher costs about 100 us
  of host time per call, which dominates at small shapes).

The choice (:func:`select_backend`): `backend="name"` (or `FLA_TL_BACKEND=name`) forces one, and if it refuses,
:class:`BackendError` lists why; otherwise the first backend that accepts runs (an `opt_in` backend runs only when
forced), and falling back past the preferred one warns once per op and reason (:class:`FallbackWarning`); if none
accepts, one :class:`BackendError` lists every candidate and its reasons.

A backend's `fwd(**args, requires_grad)` returns the op's outputs, then any residuals its backward needs (an absent
output is None); `bwd(args, outputs, grads)` returns `{name: gradient}` for the arguments in `spec.grads`. A torch
backend gives only `differentiable(**args)`, its outputs: the backward is its vector-Jacobian product.
"""

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

import torch

from .autotune.table import mode as autotune_mode
from .utils import check_cu_seqlens_values, warn_once

ENV_BACKEND = "FLA_TL_BACKEND"
AUTO = "auto"
MAX_HEAD_DIM = 256
DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


class BackendError(RuntimeError):
    """no backend can run an input: the forced one refused it, or every candidate did."""


class FallbackWarning(UserWarning):
    """an automatic choice ran a backend other than the preferred one (e.g. the PyTorch path for CPU tensors): warned
    once per process for each op and set of reasons; silence it with `warnings.filterwarnings("ignore",
    category=FallbackWarning)`."""


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
    # sequences x heads: the state passes put them in a grid dimension other than the first (at most 65535 blocks)
    max_sequences_x_heads: int | None = None

    def describe(self) -> dict[str, str]:
        def flag(x: bool) -> str:
            return "yes" if x else "no"

        return {
            "device": ",".join(self.devices) if self.devices else "any",
            "dtypes": ",".join(DTYPE_NAMES.get(d, str(d)) for d in self.dtypes),
            "max K,V": str(self.max_head_dim) if self.max_head_dim else "-",
            "min cc": ".".join(map(str, self.min_compute_capability)) if self.min_compute_capability else "-",
            "varlen": flag(self.varlen),
            "h0": flag(self.initial_state),
            "bwd": flag(self.backward),
            "reverse": flag(self.reverse),
            "v-first": flag(self.state_v_first),
            "g": flag(self.gate),
        }


def tilelang_capabilities(**fields) -> Capabilities:
    """the TileLang kernels' usual capabilities (CUDA sm_90+, bf16 / fp16 / fp32, head dims up to 256), with `fields`
    changed."""
    base = Capabilities(devices=("cuda",), dtypes=(torch.bfloat16, torch.float16, torch.float32),
                        max_head_dim=MAX_HEAD_DIM, min_compute_capability=(9, 0), max_sequences_x_heads=65535)
    return dataclasses.replace(base, **fields)


def torch_capabilities(**fields) -> Capabilities:
    """the pure-PyTorch forms' capabilities (any device, every float dtype), with `fields` changed."""
    base = Capabilities(devices=None, dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64))
    return dataclasses.replace(base, **fields)


@dataclasses.dataclass(frozen=True)
class OpInputs:
    """what a verifier looks at: a light description of one call (tests build it by hand to fake a GPU); `options`
    holds an op's own arguments that decide a backend (e.g. a chunk size)."""

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
    sequences_x_heads: int = 0  # 0: not described
    options: dict = dataclasses.field(default_factory=dict, compare=False)


def compute_capability(x: torch.Tensor) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(x.device)) if x.device.type == "cuda" else None


def describe_inputs(
    q: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backward: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    g: torch.Tensor | None = None,
    **options,
) -> OpInputs:
    """the :class:`OpInputs` of a call on real tensors (K from `q`, V from `v`)."""
    sequences = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
    return OpInputs(
        device_type=q.device.type,
        dtype=q.dtype,
        K=q.shape[-1],
        V=v.shape[-1],
        compute_capability=compute_capability(q),
        varlen=cu_seqlens is not None,
        initial_state=initial_state is not None,
        backward=backward,
        reverse=reverse,
        state_v_first=state_v_first,
        gate=g is not None,
        # [B, T, H, K] inputs; HGRN's [B, T, D] has no heads
        sequences_x_heads=sequences * (max(q.shape[-2], v.shape[-2]) if q.dim() == 4 else 1),
        options=options,
    )


def capability_reasons(caps: Capabilities, inputs: OpInputs) -> list[str]:
    """every reason the declared capabilities rule an input out (empty when they allow it)."""
    reasons = []
    if caps.devices is not None and inputs.device_type not in caps.devices:
        reasons.append(f"needs a {' or '.join(caps.devices)} tensor, got {inputs.device_type}")
    if inputs.dtype not in caps.dtypes:
        names = ", ".join(DTYPE_NAMES.get(d, str(d)) for d in caps.dtypes)
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
    if caps.max_sequences_x_heads is not None and inputs.sequences_x_heads > caps.max_sequences_x_heads:
        reasons.append(f"sequences x heads = {inputs.sequences_x_heads} exceeds {caps.max_sequences_x_heads} (the "
                       "blocks a CUDA grid dimension of its state passes holds)")
    return reasons


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


@dataclasses.dataclass
class Backend:
    """one implementation of an op (see the module docstring for `fwd`, `bwd` and `differentiable`).

    `module` names the kernels a TileLang backend imports on first use (an import failure is a refusal);
    `extra_reasons(inputs)` adds the backend's own refusals to its capabilities'; `residuals(args, requires_grad)`
    gives empty tensors shaped like the residuals `fwd` returns (the custom op's fake); `note` makes an entry that
    refuses every input (an op dropped by fla), shown by `list`. `verifier(inputs)` returns every reason it refuses.
    """

    name: str
    capabilities: Capabilities
    fwd: Callable | None = None
    bwd: Callable | None = None
    differentiable: Callable | None = None
    residuals: Callable | None = None
    module: str | None = None
    extra_reasons: Callable[[OpInputs], list[str]] | None = None
    description: str = ""
    note: str = ""
    # why the automatic choice passes this backend over (it runs only when asked for by name); empty: it takes part
    opt_in: str = ""
    verifier: Callable[[OpInputs], list[str]] | None = None

    def __post_init__(self):
        if self.verifier is None:
            self.verifier = self._reasons

    def _reasons(self, inputs: OpInputs) -> list[str]:
        reasons = capability_reasons(self.capabilities, inputs)
        if self.note:
            return reasons + [self.note]
        if self.extra_reasons is not None:
            reasons += self.extra_reasons(inputs)
        if self.module is not None:
            if module_missing("tilelang"):
                reasons.append("tilelang is not installed")
            elif not reasons:
                # the kernels are imported only for an input they would run
                reason = import_reason(self.module)
                if reason is not None:
                    reasons.append(reason)
        return reasons


def torch_backend(fn: Callable, caps: Capabilities, description: str = "the pure-PyTorch path") -> Backend:
    """the `torch` backend of a differentiable PyTorch form `fn(**args) -> outputs`."""
    return Backend(name="torch", capabilities=caps, differentiable=fn, description=description)


def refusing_backend(name: str, caps: Capabilities, reason: str) -> Backend:
    """an entry that refuses every input with `reason` (an op dropped by fla); `list` shows it and errors name it."""
    return Backend(name=name, capabilities=caps, description=reason, note=reason)


@dataclasses.dataclass
class KernelSpec:
    """one TileLang kernel an op launches: the factory and its keywords exactly as the launcher builds it."""

    name: str
    factory: Callable
    kwargs: dict


@dataclasses.dataclass
class OpSpec:
    """one public op.

    `schema` is the kernel-level call as a `torch.library` argument list (tensors and the options the backends take);
    `outputs` how many tensors it returns (an absent one is None); `grads` the tensor arguments that get gradients;
    `saved_outputs` the outputs the backward reads; `describe(args, backward)` the :class:`OpInputs` of a call;
    `fake(args)` empty tensors shaped like the outputs. An op without `schema` runs no kernel-level call (it raises,
    as fla's does). `kernels(D, dtype)` lists the TileLang kernels the op launches at head dim D and dtype `dtype`
    (a TileLang name), for compiling ahead, tuning and the compile tests; `cases(device, dtype)` the
    `fla_tl.testing.Case`s of `python -m fla_tl check`.
    """

    name: str
    variant: str
    mode: str
    reference: Callable
    backends: list[Backend] = dataclasses.field(default_factory=list)
    schema: str = ""
    outputs: int = 2
    grads: tuple[str, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    describe: Callable | None = None
    fake: Callable | None = None
    kernels: Callable | None = None
    cases: Callable | None = None
    fn: Callable | None = None
    _call: Callable | None = dataclasses.field(default=None, repr=False)

    def backend(self, name: str, source: str = "`backend`") -> Backend:
        """the backend called `name`; `ValueError` naming `source` (where the name came from) if there is none."""
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(
            f"{source} must be one of {[b.name for b in self.backends]} or {AUTO!r} for {self.name}, got {name!r}"
        )

    def run(self, backend: str | None = None, **args) -> list:
        """the kernel-level call: the op's outputs (None where absent) from the chosen backend, differentiable."""
        check_backend_name(self, backend)
        return self._call(args, backend if backend not in (None, AUTO) else "")


_OPS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> Callable:
    """decorate an op's public function: record `spec` with it and define its custom ops."""

    def decorate(fn: Callable) -> Callable:
        if spec.name in _OPS:
            raise ValueError(f"op {spec.name!r} is already registered")
        spec.fn = fn
        if spec.schema:
            spec._call = _define(spec)
        _OPS[spec.name] = spec
        return fn

    return decorate


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
        chosen = spec.backend(requested, "`backend`" if backend else f"the environment variable {ENV_BACKEND}")
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
        if candidate.opt_in:
            refusals.append((candidate.name, [candidate.opt_in]))
            continue
        reasons = candidate.verifier(inputs)
        if not reasons:
            if refusals:
                _warn_fallback(spec, candidate, inputs, refusals)
            return candidate
        refusals.append((candidate.name, reasons))
    lines = "\n".join(f"  - {name}: {'; '.join(reasons)}" for name, reasons in refusals)
    raise BackendError(f"{spec.name}: no backend can run this input:\n{lines}")


def _warn_fallback(spec: OpSpec, chosen: Backend, inputs: OpInputs, refusals) -> None:
    why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in refusals)
    what = chosen.description or f"the {chosen.name} backend"
    warn_once(
        ("fallback", spec.name, chosen.name, inputs.device_type, why),
        f"fla_tl: {spec.name} runs {what} on {inputs.device_type}: {why}",
        FallbackWarning,
    )


# ---------------------------------------------------------------------------------------------- the custom ops


def _parse_schema(schema: str) -> tuple[list[str], set[str]]:
    """(argument names, the names of the tensor arguments) of a `torch.library` argument list."""
    names, tensors = [], set()
    for item in schema.split(","):
        kind, name = item.split()
        names.append(name)
        if kind.startswith("Tensor"):
            tensors.add(name)
    return names, tensors


def _placeholder(args: dict, tensors: list[str]) -> torch.Tensor:
    """an empty tensor on the device of the first tensor argument: an absent output or gradient."""
    for name in tensors:
        if args[name] is not None:
            return args[name].new_empty(0)
    raise ValueError("an op needs at least one tensor argument")


def _define(spec: OpSpec) -> Callable:
    """define `fla_tl::<op>_fwd` / `_bwd` (fake, autograd) and return the kernel-level call `(args, backend)`."""
    names, tensor_set = _parse_schema(spec.schema)
    tensors = [n for n in names if n in tensor_set]
    P = spec.outputs

    def choose(args: dict, backward: bool, backend: str) -> Backend:
        return select_backend(spec, spec.describe(args, backward), backend or None)

    def forward(chosen: Backend, args: dict, requires_grad: bool) -> list[torch.Tensor]:
        if chosen.module is not None and autotune_mode() == "tune":
            # `FLA_TL_AUTOTUNE=tune`: the tuner (above the kernels) installs itself as the tile-config miss handler
            importlib.import_module("fla_tl.autotune.tuner")
        if chosen.fwd is None:
            with torch.no_grad():
                outs = list(chosen.differentiable(**args))
        else:
            outs = list(chosen.fwd(**args, requires_grad=requires_grad))
        # a fresh placeholder per absent output: a custom op's outputs may not alias each other
        return [_placeholder(args, tensors) if x is None else x for x in outs]

    def backward(chosen: Backend, args: dict, outputs: list, grads: list) -> list[torch.Tensor]:
        if chosen.bwd is not None:
            found = chosen.bwd(args, outputs, grads)
        else:
            found = _vjp(chosen.differentiable, args, [n for n in spec.grads if args[n] is not None], grads)
        return [_placeholder(args, tensors) if args[n] is None or found.get(n) is None else found[n].to(args[n].dtype)
                for n in spec.grads]

    def fwd_impl(*values):
        args = dict(zip(names, values[:-2]))
        requires_grad, backend = values[-2:]
        if args.get("cu_seqlens") is not None:
            # the value checks that tracing cannot make (a compiled call; the eager path made them in validation)
            check_cu_seqlens_values(args["cu_seqlens"], args[tensors[0]].shape[1], tensors[0])
        return forward(choose(args, requires_grad, backend), args, requires_grad)

    def bwd_impl(*values):
        args = dict(zip(names, values[:-3]))
        outputs, grads, backend = values[-3:]
        return backward(choose(args, True, backend), args, list(outputs), list(grads))

    fwd_op = torch.library.custom_op(f"fla_tl::{spec.name}_fwd", fwd_impl, mutates_args=(),
                                     schema=f"({spec.schema}, bool requires_grad, str backend) -> Tensor[]")
    bwd_op = torch.library.custom_op(
        f"fla_tl::{spec.name}_bwd", bwd_impl, mutates_args=(),
        schema=f"({spec.schema}, Tensor[] outputs, Tensor?[] grads, str backend) -> Tensor[]")

    @fwd_op.register_fake
    def _(*values):
        args = dict(zip(names, values[:-2]))
        requires_grad, backend = values[-2:]
        outs = [_placeholder(args, tensors) if x is None else x for x in spec.fake(args)]
        chosen = choose(args, requires_grad, backend)
        return outs + (list(chosen.residuals(args, requires_grad)) if chosen.residuals is not None else [])

    @bwd_op.register_fake
    def _(*values):
        args = dict(zip(names, values[:-3]))
        return [torch.empty_like(args[n]) if args[n] is not None else _placeholder(args, tensors) for n in spec.grads]

    def save_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        args = inputs[:len(names)]
        keep = [output[i] for i in spec.saved_outputs]
        ctx.save_for_backward(*(args[i] for i, n in enumerate(names) if n in tensor_set), *keep, *output[P:])
        ctx.options = {n: a for n, a in zip(names, args) if n not in tensor_set}
        # an absent output (an empty placeholder) gets no gradient
        ctx.absent = [x.numel() == 0 for x in output[:P]]
        ctx.backend = inputs[-1]

    def unpack(ctx) -> tuple[dict, list]:
        saved = list(ctx.saved_tensors)
        args = {**dict(zip(tensors, saved)), **ctx.options}
        kept = iter(saved[len(tensors):])
        outputs = [None] * P
        for i in spec.saved_outputs:
            outputs[i] = next(kept)
        outputs = [x if x is not None else _placeholder(args, tensors) for x in outputs] + list(kept)
        return args, outputs

    def present(ctx, grads) -> list:
        return [None if absent else g for g, absent in zip(grads[:P], ctx.absent)]

    def input_grads(args: dict, found: list) -> tuple:
        by_name = dict(zip(spec.grads, found))
        return tuple(by_name[n] if n in by_name and args[n] is not None else None for n in names) + (None, None)

    def custom_backward(ctx, grads):
        args, outputs = unpack(ctx)
        values = [args[n] for n in names]
        found = bwd_op(*values, outputs, present(ctx, grads), ctx.backend)
        return input_grads(args, found)

    fwd_op.register_autograd(custom_backward, setup_context=save_context)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(chosen, requires_grad, *values):
            return tuple(forward(chosen, dict(zip(names, values)), requires_grad))

        @staticmethod
        def setup_context(ctx, inputs, output):
            chosen, requires_grad, *values = inputs
            save_context(ctx, (*values, requires_grad, ""), output)
            ctx.chosen = chosen

        @staticmethod
        def backward(ctx, *grads):
            args, outputs = unpack(ctx)
            found = backward(ctx.chosen, args, outputs, present(ctx, grads))
            return (None, None, *input_grads(args, found)[:-2])

    def call(args: dict, backend: str) -> list:
        values = [args[n] for n in names]
        requires_grad = torch.is_grad_enabled() and any(
            args[n] is not None and args[n].requires_grad for n in spec.grads)
        if torch.compiler.is_compiling():
            outs = fwd_op(*values, requires_grad, backend)
        else:
            chosen = choose(args, requires_grad, backend)
            if chosen.fwd is None:
                outs = list(chosen.differentiable(**args))
            else:
                outs = EagerFunction.apply(chosen, requires_grad, *values)
        return list(outs[:P])

    return call


def _vjp(fn: Callable, args: dict, wrt: list[str], grads: list) -> dict:
    """the gradients of `fn(**args)`'s outputs, with cotangents `grads` (None: zero), for the arguments `wrt`."""
    present = []

    def partial(*xs):
        outs = list(fn(**{**args, **dict(zip(wrt, xs))}))
        present[:] = [x is not None for x in outs]
        return tuple(x for x in outs if x is not None)

    outputs, vjp_fn = torch.func.vjp(partial, *(args[n] for n in wrt))
    given = [g for g, p in zip(grads, present) if p]
    cotangents = tuple(torch.zeros_like(x) if g is None else g.to(x.dtype) for x, g in zip(outputs, given))
    return {n: g.to(args[n].dtype) for n, g in zip(wrt, vjp_fn(cotangents))}


# ---------------------------------------------------------------------------------------------- listing


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
                "note": b.note or b.opt_in,
            })
    return rows


def list_ops(file=None, quiet: bool = False) -> list[OpSpec]:
    """print the table of `python -m fla_tl list` (op, mode, backends, what the TileLang backend supports) to `file`
    (default stdout) unless `quiet`; return the ops."""
    if not quiet:
        from .cli import list_table

        print(list_table(), file=file or sys.stdout)
    return registered_ops()
