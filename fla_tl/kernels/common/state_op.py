"""The public-op plumbing shared by the (q, k, v, initial state) ops of retention, simple GLA, linear attention,
lightning attention and GLA: one kernel-level call, its backends, validation and the argument handling fla's
signatures share. Imports no kernels: the TileLang launchers load on first use.

The kernel-level call (`STATE_SCHEMA`): q, k `[B, T, H, K]`, v `[B, T, H, V]`, an optional log gate `g` (`[B, T, H]`,
or `[B, T, H, K]` for GLA; it gets a gradient), an optional per-head log decay `g_gamma` `[H]` (no gradient, as in
fla), the initial state, cu_seqlens and the options; it returns (o `[B, T, H, V]` in q's dtype, the final state in
fp32, fp64 for fp64 inputs, or None).
"""

import importlib
import inspect
import itertools
import warnings
from collections.abc import Callable

import torch

from ...autotune.configs import BT
from ...reference.simple_gla import chunk_simple_gla_torch
from ...registry import (
    AUTO,
    Backend,
    KernelSpec,
    OpSpec,
    check_backend_name,
    describe_inputs,
    select_backend,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import reference_dtype, state_case
from ...utils import join_graph, validate_linear_attention_inputs

STATE_SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? g_gamma, Tensor? initial_state, Tensor? cu_seqlens, "
                "float scale, bool output_final_state, bool reverse, bool state_v_first")


def _describe(args: dict, backward: bool):
    return describe_inputs(args["q"], args["v"], args["initial_state"], args["cu_seqlens"], backward, args["reverse"],
                           args["state_v_first"], args["g"])


def _fake(args: dict) -> list:
    q, v, h0, cu = args["q"], args["v"], args["initial_state"], args["cu_seqlens"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = h0.shape[0] if h0 is not None else (cu.shape[0] - 1 if cu is not None else B)
    o = q.new_empty(B, T, H, V)
    if not args["output_final_state"]:
        return [o, None]
    return [o, q.new_empty((N, H, V, K) if args["state_v_first"] else (N, H, K, V), dtype=reference_dtype(q.dtype))]


def _transpose(x):
    return x.transpose(-1, -2).contiguous() if x is not None else None


def tilelang_state_backend(module: str, name: str, *, recurrent: bool, state_v_first: bool, gate: bool = True,
                           decay: Callable | None = None) -> Backend:
    """the tilelang backend on the launchers `<name>_fwd` / `<name>_bwd` of `module` (the contract of
    `fla_tl.kernels.simple_gla`); `decay(H, device)` gives the per-head log decay of an op that has a fixed one
    (retention). The chunk modes keep states `[K, V]` in the kernels and transpose a `state_v_first` state on the way
    in and out."""

    def launchers():
        mod = importlib.import_module(module)
        return getattr(mod, f"{name}_fwd"), getattr(mod, f"{name}_bwd")

    def gates(args):
        q, g = args["q"], args["g"]
        g_gamma = decay(q.shape[2], q.device) if decay is not None else args["g_gamma"]
        return {"g_gamma": g_gamma} if g is None else {"g_gamma": g_gamma, "g": g.contiguous()}

    def options(args):
        return {"reverse": args["reverse"], "state_v_first": args["state_v_first"]} if recurrent else {}

    def states(args, *xs):
        transpose = args["state_v_first"] and not recurrent
        return [_transpose(x) if transpose else x for x in xs]

    def fwd(q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, output_final_state, reverse, state_v_first,
            requires_grad):
        args = locals()
        launch, _ = launchers()
        (h0,) = states(args, initial_state.contiguous() if initial_state is not None else None)
        o, ht = launch(q.contiguous(), k.contiguous(), v.contiguous(), scale=float(scale), initial_state=h0,
                       output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens.to(torch.int64).contiguous() if cu_seqlens is not None else None,
                       **gates(args), **options(args))
        (ht,) = states(args, ht)
        return o, ht

    def bwd(args, outputs, grads):
        _, launch = launchers()
        do, dht = grads
        q = args["q"]
        do = torch.zeros(q.shape[:3] + args["v"].shape[-1:], dtype=q.dtype, device=q.device) if do is None else do
        h0, dht, ht = states(args, args["initial_state"], dht, outputs[1] if outputs[1].numel() else None)
        extra = options(args)
        if args["g"] is not None:
            # the gate's gradient needs <ht, dht>, both in the kernels' [K, V] layout
            extra["ht"] = ht
        cu = args["cu_seqlens"]
        found = launch(q.contiguous(), args["k"].contiguous(), args["v"].contiguous(), do.contiguous(),
                       dht.contiguous() if dht is not None else None, scale=float(args["scale"]),
                       initial_state=h0.contiguous() if h0 is not None else None,
                       cu_seqlens=cu.to(torch.int64).contiguous() if cu is not None else None,
                       **gates(args), **extra)
        dq, dk, dv, dh0 = found[:4]
        (dh0,) = states(args, dh0)
        return {"q": dq, "k": dk, "v": dv, "g": found[4] if len(found) > 4 else None, "initial_state": dh0}

    caps = tilelang_capabilities(reverse=recurrent, state_v_first=state_v_first, gate=gate)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, module=module,
                   description="the TileLang kernels")


NO_ATTENTION = "does not materialise the attention matrix (output_attentions=True); the torch backend does"


def parallel_tilelang_backend(decay: Callable | None = None) -> Backend:
    """chunk_simple_gla's TileLang backend on the arguments of the attention forms (`parallel_simple_gla`,
    `parallel_retention`: q, k, v, optional g, cu_seqlens, scale, output_attentions): no states, and a refusal of
    `output_attentions` (the torch backend materialises the matrix)."""
    inner = tilelang_state_backend(SIMPLE_GLA_MODULES["chunk"], "chunk_simple_gla", recurrent=False,
                                   state_v_first=False, gate=decay is None, decay=decay)

    def state_args(args):
        return dict(q=args["q"], k=args["k"], v=args["v"], g=args.get("g"), g_gamma=None, initial_state=None,
                    cu_seqlens=args["cu_seqlens"], scale=args["scale"], output_final_state=False, reverse=False,
                    state_v_first=False)

    def fwd(requires_grad, **args):
        o, _ = inner.fwd(**state_args(args), requires_grad=requires_grad)
        return o, None

    def bwd(args, outputs, grads):
        return inner.bwd(state_args(args), [outputs[0], outputs[1]], [grads[0], None])

    def attention_reason(inputs):
        return [NO_ATTENTION] if inputs.options.get("output_attentions") else []

    caps = tilelang_capabilities(initial_state=False, gate=decay is None)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, module=SIMPLE_GLA_MODULES["chunk"],
                   extra_reasons=attention_reason,
                   description="chunk_simple_gla's TileLang kernels" + (" with a fixed decay" if decay else ""))

def torch_state_backend(form: Callable, *, recurrent: bool, state_v_first: bool, gate: bool) -> Backend:
    """the torch backend on a chunked PyTorch form `form(q, k, v, g, g_gamma, **options) -> (o, ht)`."""

    def run(q, k, v, g, g_gamma, initial_state, cu_seqlens, scale, output_final_state, reverse, state_v_first):
        o, ht = form(q, k, v, g, g_gamma, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                     cu_seqlens=cu_seqlens)
        return o.to(q.dtype), (ht.to(reference_dtype(q.dtype)) if ht is not None else None)

    caps = torch_capabilities(reverse=recurrent, state_v_first=state_v_first, gate=gate)
    return torch_backend(run, caps)


def state_op(name: str, variant: str, mode: str, reference: Callable, backends: list[Backend],
             kernels: Callable | None = None, cases: Callable | None = None) -> OpSpec:
    """the spec of a (q, k, v, state) op on the shared kernel-level call."""
    return OpSpec(name=name, variant=variant, mode=mode, reference=reference, backends=backends, schema=STATE_SCHEMA,
                  outputs=2, grads=("q", "k", "v", "g", "initial_state"), saved_outputs=(1,), describe=_describe,
                  fake=_fake, kernels=kernels, cases=cases)


SIMPLE_GLA_MODULES = {
    "chunk": "fla_tl.kernels.simple_gla.chunk",
    "fused_chunk": "fla_tl.kernels.simple_gla.fused_chunk",
    "fused_recurrent": "fla_tl.kernels.simple_gla.fused_recurrent",
}


def simple_gla_form(q, k, v, g, g_gamma, **options):
    """the chunked PyTorch form with simple GLA's gates (the torch backend of this family)."""
    return chunk_simple_gla_torch(q, k, v, g=g, g_gamma=g_gamma, **options)


def simple_gla_spec(name: str, variant: str, mode: str, reference, *, gate: bool = True, state_v_first: bool = False,
                    decay=None, cases=None) -> OpSpec:
    """the spec of a simple-GLA-family op of `mode`: the TileLang launchers of this folder (with the per-head decay
    `decay(H, device)` of an op that has a fixed one) and the chunked PyTorch form."""
    recurrent = mode == "fused_recurrent"

    def form(q, k, v, g, g_gamma, **options):
        if decay is not None:
            g_gamma = decay(q.shape[2], q.device)
        return simple_gla_form(q, k, v, g, g_gamma, **options)

    def kernels(D, dtype):
        return state_kernels(D, dtype, (mode,), ("gamma", "g") if gate else ("gamma",))

    backends = [
        tilelang_state_backend(SIMPLE_GLA_MODULES[mode], f"{mode}_simple_gla", recurrent=recurrent,
                               state_v_first=state_v_first, gate=gate, decay=decay),
        torch_state_backend(form, recurrent=recurrent, state_v_first=state_v_first, gate=gate),
    ]
    return state_op(name, variant, mode, reference, backends, kernels=kernels, cases=cases)


def run_state_op(
    spec: OpSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    reverse: bool,
    state_v_first: bool,
    cu_seqlens: torch.Tensor | None,
    backend: str | None,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    g_per_key: bool = False,
    g_name: str = "g",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """validate, default the scale, handle T = 0 (no kernel runs; the outputs still reach the autograd graph of the
    inputs), and run the op's kernel-level call."""
    N = validate_linear_attention_inputs(q, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                         state_v_first=state_v_first, g=g, g_gamma=g_gamma, g_per_key=g_per_key,
                                         g_name=g_name)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if T == 0:
        check_backend_name(spec, backend)
        o, ht = v.new_empty(B, 0, H, V), None
        if output_final_state and initial_state is not None:
            ht = initial_state.to(reference_dtype(q.dtype), copy=True)
        elif output_final_state:
            ht = q.new_zeros((N, H, V, K) if state_v_first else (N, H, K, V), dtype=reference_dtype(q.dtype))
        o, ht = join_graph([o, ht], (q, k, v, g, initial_state))
        return o, ht
    o, ht = spec.run(backend, q=q, k=k, v=v, g=g, g_gamma=g_gamma, initial_state=initial_state,
                     cu_seqlens=cu_seqlens, scale=float(scale), output_final_state=bool(output_final_state),
                     reverse=bool(reverse), state_v_first=bool(state_v_first))
    return o, (ht if output_final_state else None)


def empty_run(spec, args: dict, tensors, backend, state_shape: tuple, output_final_state: bool):
    """the outputs of a call on no tokens (T = 0), without a kernel: a forced backend that refuses the input raises
    as for T > 0; o is empty like v, the final state a copy of the initial one (zeros `state_shape` without one) in
    the reference dtype; both join the autograd graph of `tensors` (zero gradients)."""
    check_backend_name(spec, backend)
    if not torch.compiler.is_compiling():
        backward = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)
        select_backend(spec, spec.describe(args, backward), backend if backend != AUTO else None)
    q, v, h0 = args["q"], args["v"], args["initial_state"]
    ht = None
    if output_final_state:
        ht_dtype = reference_dtype(q.dtype)
        ht = h0.to(ht_dtype, copy=True) if h0 is not None else q.new_zeros(state_shape, dtype=ht_dtype)
    o, ht = join_graph([v.new_empty(v.shape), ht], tensors)
    return o, ht


def pop_state_layout(name: str, state_v_first: bool, kwargs: dict) -> bool:
    """fla's deprecated `transpose_state_layout` (renamed `state_v_first`); any other leftover keyword raises."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
        warnings.warn(
            "`transpose_state_layout` is deprecated and renamed to `state_v_first`.", DeprecationWarning, stacklevel=3
        )
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    if kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(kwargs)}")
    return state_v_first


def pop_chunk_size(kwargs: dict) -> None:
    """fla's `chunk_size` (a power of two; the kernels pick their own) and the removed `head_first`."""
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", None)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0
                                   or chunk_size & (chunk_size - 1)):
        raise ValueError(f"`chunk_size` must be a power of 2, got {chunk_size}.")


def state_cases(reference: Callable, *, recurrent: bool = False, state_v_first: bool = False,
                extras: Callable | None = None) -> Callable:
    """the `check` cases of a (q, k, v, state) op: dense and varlen (with an empty and a one-token sequence), each
    recurrent option the op has, and each of the op's own argument sets `extras(B, T, H, device) -> [(label,
    grad kwargs, kwargs)]`."""

    def cases(device, dtype):
        options = [{}]
        if recurrent:
            options.append({"reverse": True})
        if state_v_first:
            options.append({"state_v_first": True})
        if recurrent and state_v_first:
            options.append({"reverse": True, "state_v_first": True})
        found = []
        for opts in options:
            for kind, B, lens in (("dense", 2, None), ("varlen", 1, (30, 0, 100, 1))):
                T = sum(lens) if lens else 100
                for label, grad, kw in (extras(B, T, 2, device) if extras else [("", {}, {})]):
                    grad = {n: x.to(dtype) for n, x in grad.items()}
                    found.append(state_case(" ".join(x for x in (kind, label, *opts) if x), reference, B=B, T=T,
                                            H=2, K=32, V=48, dtype=dtype, device=device, lens=lens, grad_kwargs=grad,
                                            **kw, **opts))
        return found

    return cases


# ---------------------------------------------------------------------------------------------- kernel lists


def stage_spec(name: str, K: int, V: int, dtype: str, gate: str, config: dict | None = None, *,
               factory: str | None = None, **flags) -> KernelSpec:
    """the tunable stage `name` (`fla_tl.autotune.configs.KERNELS`) as its launcher builds it for head dims K, V,
    input dtype `dtype`, gate option `gate` and tile `config` (default: the heuristic); `factory` one of the stage's
    companions ("module:function", launched with the same config) instead of its own; `flags` override keywords."""
    from ...autotune.configs import KERNELS, delta_pass_stages
    from ...autotune.resolve import heuristic_config

    assert factory is None or factory in KERNELS[name].companions, (name, factory)
    module, attr = (factory or KERNELS[name].factory).split(":")
    base = dict(K=K, V=V, gate=gate, dtype=dtype)
    if name in ("chunk_delta_fwd_h", "chunk_delta_bwd_dhu"):
        base.update(BT=BT, num_stages=delta_pass_stages(K, dtype))
    elif name in ("fused_chunk_delta_fwd", "chunk_delta_bwd_dqkw"):
        base.update(BT=BT)
    elif name.startswith("wy_"):
        # the betas as the delta rules pass them (fp32); the backward adds into a dk of the input dtype
        base.update(BT=BT, beta_dtype="float32", **({"pair": True} if name == "wy_fwd" else {"dk_dtype": dtype}))
    elif name.startswith("chunk_"):
        base.update(h_dtype=dtype, BT=BT)
    elif name.startswith("parallel_based"):
        base.update(based=True)  # ReBased's flag comes in `flags`
    elif name.startswith("rwkv6_"):
        base.update(reverse=False, BT=BT)
    elif name in ("gate_cumsum", "gate_grad_scan", "gate_grad_chunk_scan"):
        # fp32 gates and gradients (the others come in `flags`); the sequence scan of a forward recurrence
        base.update(g_dtype="float32", out_dtype="float32", reverse=True, BT=BT)
    elif name == "combine_states":
        base.update(reverse=False, diagonal=True)  # a decay's diagonal transition (the delta rules pass full ones)
    elif name == "gate_dot":
        base.update(BT=BT)
    elif name.startswith("hgrn_"):
        base.update(g_dtype=dtype)  # gates in the input dtype, as fla draws them (fp32 ones come in `flags`)
    elif name.startswith("slot_normaliser_"):
        base.update(out_dtype=dtype, dsn_dtype=dtype)
    elif name.startswith("titans_"):
        base.update(D=K)  # K = V = D
    elif name == "linear_attn_key_scan":
        base.update(weighted=False, reverse=False, with_init=False)  # the plain scan; the others come in `flags`
    if name.startswith("fused_recurrent"):
        # a forward recurrence, the key-major state layout, no state pool (the others come in `flags`)
        base.update(reverse=False, state_v_first=False, pool=False)
    factory = getattr(importlib.import_module(module), attr)
    # a factory without a gate keyword always runs its fixed gate; one over a single head dim takes only that one
    base = {key: value for key, value in base.items() if key in inspect.signature(factory).parameters}
    config = config if config is not None else heuristic_config(name, K, V, dtype, gate)
    return KernelSpec(name, factory, {**base, **config, **flags})


def state_kernels(D: int, dtype: str, modes: tuple[str, ...], gates: tuple[str, ...] = ("gamma",)) -> list[KernelSpec]:
    """the kernels the simple-GLA launchers of `modes` launch at K = V = D for each gate option of `gates`
    ("gamma": a per-head constant decay or none; "g": a per-token gate), with the heuristic tile configs."""

    specs = []
    for gate in gates:
        if "chunk" in modes:
            specs += [stage_spec(name, D, D, dtype, gate)
                      for name in ("chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv", "chunk_bwd_dqk")]
        if "chunk" in modes or "fused_chunk" in modes:
            # the fused schedule: forward, dq (the forward kernel on (do, v, k)) and the dk/dv sweep
            specs += [stage_spec("fused_chunk_fwd", D, D, dtype, gate),
                      stage_spec("fused_chunk_bwd_dkv", D, D, dtype, gate)]
        if ("chunk" in modes or ("fused_chunk" in modes and "g" in gates)) and gate == gates[0]:
            # few long sequences: the combine of the chunk ranges' states (a diagonal decay), both directions (the
            # fused_chunk ops' backward with a per-token gate runs the chunk schedule)
            specs += [stage_spec("combine_states", D, D, dtype, "none", reverse=reverse, diagonal=True)
                      for reverse in (False, True)]
        if "fused_recurrent" in modes:
            for reverse, svf in itertools.product((False, True), (False, True)):
                specs += [stage_spec(name, D, D, dtype, gate, reverse=reverse, state_v_first=svf)
                          for name in ("fused_recurrent_fwd", "fused_recurrent_bwd")]
        if gate == "g":
            # the per-token gate's cumulative sum (g in fp32 or the input dtype) and its gradient
            for g_dtype in sorted({"float32", dtype}):
                specs += [stage_spec("gate_cumsum", 0, 0, dtype, "none", g_dtype=g_dtype, BT=BT),
                          stage_spec("gate_grad_chunk_scan", 0, 0, dtype, "none", out_dtype=g_dtype, BT=BT)]
                specs += [stage_spec("gate_grad_scan", 0, 0, dtype, "none", reverse=reverse, out_dtype=g_dtype, BT=BT)
                          for reverse in (False, True)]
            # the chunk kernels' dg reads dq, dk in the input dtype, fused_recurrent's in fp32
            specs += [stage_spec("gate_dot", D, D, dtype, "none", grad_dtype=grad_dtype, BT=BT)
                      for grad_dtype in sorted({"float32", dtype})]
            specs.append(stage_spec("chunk_state_dot", D, D, dtype, "none", h_dtype=dtype, BT=BT))
    return specs
