"""The public ops (fla 0.6.0 signatures plus `backend=`) and their registrations.

Backends, preferred first: `tilelang` (the TileLang kernels of `fla_tl.kernels`, CUDA, sm_90+) and `torch` (the
chunked pure-PyTorch form of `fla_tl.reference`, any device). Pick one with `backend=` or `FLA_TL_BACKEND`;
see `fla_tl.registry` for the rules and `python -m fla_tl list` for the table.
"""

import dataclasses
import functools
import warnings

import torch

from .reference.abc import chunk_abc_torch, recurrent_abc
from .reference.based import parallel_based_torch, parallel_rebased_torch, recurrent_based, recurrent_rebased
from .reference.delta_rule import chunk_gated_delta_rule_torch, recurrent_gated_delta_rule
from .reference.gla import chunk_gla_torch, recurrent_gla
from .reference.gsa import chunk_gsa_torch, recurrent_gsa
from .reference.hgrn import chunk_hgrn_torch, recurrent_hgrn
from .reference.lightning_attn import lightning_g_gamma, recurrent_lightning_attn
from .reference.linear_attn import normalize_with_key_sum, recurrent_linear_attn, split_state
from .reference.retention import recurrent_retention, retention_g_gamma
from .reference.rwkv6 import chunk_rwkv6_torch, recurrent_rwkv6
from .reference.simple_gla import parallel_simple_gla_torch, recurrent_simple_gla
from .reference.simple_gla import chunk_simple_gla_torch
from .reference.titans import chunk_titans_linear_torch, recurrent_titans_linear
from .registry import (
    AUTO,
    Backend,
    BackendError,
    Capabilities,
    OpInputs,
    OpSpec,
    capability_reasons,
    check_backend_name,
    define_linear_attention_ops,
    get_op,
    import_reason,
    list_ops,
    module_missing,
    register_backend,
    requested_backend,
    register_op,
    select_backend,
)
from .utils import compare, validate_linear_attention_inputs

__all__ = [
    "chunk_retention",
    "fused_chunk_retention",
    "fused_recurrent_retention",
    "chunk_simple_gla",
    "fused_chunk_simple_gla",
    "fused_recurrent_simple_gla",
    "chunk_linear_attn",
    "fused_chunk_linear_attn",
    "fused_recurrent_linear_attn",
    "chunk_lightning_attn",
    "fused_recurrent_lightning_attn",
    "chunk_gla",
    "fused_recurrent_gla",
    "fused_chunk_gla",
    "parallel_simple_gla",
    "chunk_hgrn",
    "fused_recurrent_hgrn",
    "fused_chunk_based",
    "parallel_based",
    "parallel_rebased",
    "chunk_delta_rule",
    "fused_recurrent_delta_rule",
    "fused_chunk_delta_rule",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "chunk_titans_linear",
    "chunk_rwkv6",
    "fused_recurrent_rwkv6",
    "chunk_abc",
    "chunk_gsa",
    "fused_recurrent_gsa",
    "list_ops",
    "BackendError",
]

MAX_HEAD_DIM = 256
# the TileLang launchers of each variant: module, and the launcher name of each mode (`<name>_fwd` / `<name>_bwd`)
TILELANG_MODULES = {
    "retention": "fla_tl.kernels.retention",
    "simple_gla": "fla_tl.kernels.simple_gla",
    "linear_attn": "fla_tl.kernels.simple_gla",
    "lightning_attn": "fla_tl.kernels.simple_gla",
    "gla": "fla_tl.kernels.gla",
}


def _launcher_name(variant: str, mode: str) -> str:
    return f"{mode}_{variant}" if variant in ("retention", "gla") else f"{mode}_simple_gla"


def _state_v_first(variant: str, mode: str) -> bool:
    """whether fla's public op of (variant, mode) takes `state_v_first`."""
    return variant in ("retention", "simple_gla", "gla") and mode == "fused_recurrent" or (variant, mode) in (
        ("simple_gla", "chunk"), ("gla", "chunk"))


def tilelang_capabilities(recurrent: bool = False, state_v_first: bool = False) -> Capabilities:
    return Capabilities(
        devices=("cuda",),
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        max_head_dim=MAX_HEAD_DIM,
        min_compute_capability=(9, 0),
        reverse=recurrent,
        state_v_first=state_v_first,
        # the per-token gate `g` (gate "g": `kernels.common.gates`, `kernels.common.cumsum`)
        gate=True,
    )


def torch_capabilities(recurrent: bool = False, state_v_first: bool = False, gate: bool = False) -> Capabilities:
    return Capabilities(
        devices=None,
        dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64),
        reverse=recurrent,
        state_v_first=state_v_first,
        gate=gate,
    )


def tilelang_verifier(caps: Capabilities, module: str, inputs: OpInputs) -> list[str]:
    """every reason the tilelang backend refuses `inputs`: its capabilities, and tilelang / kernels importable."""
    reasons = capability_reasons(caps, inputs)
    if module_missing("tilelang"):
        reasons.append("tilelang is not installed")
    elif not reasons:
        # the kernels are imported only for an input they would run
        reason = import_reason(module)
        if reason is not None:
            reasons.append(reason)
    return reasons


def torch_verifier(caps: Capabilities, inputs: OpInputs) -> list[str]:
    """every reason the torch backend refuses `inputs` (its declared capabilities only)."""
    return capability_reasons(caps, inputs)


def _tilelang_launchers(module: str, name: str):
    mod = __import__(module, fromlist=[f"{name}_fwd", f"{name}_bwd"])
    return getattr(mod, f"{name}_fwd"), getattr(mod, f"{name}_bwd")


def _contiguous(*xs):
    return tuple(x.contiguous() if x is not None else None for x in xs)


def _transpose_state(x):
    return x.transpose(-1, -2).contiguous() if x is not None else None


def make_tilelang_backend(variant: str, mode: str) -> Backend:
    """the tilelang backend of (variant, mode): launchers `<mode>_<kernels>_fwd` / `_bwd` of the variant's module.
    Retention's launchers bring its decay; the others take `g_gamma` (None: no decay). The chunk modes keep the state
    `[K, V]` in the kernels and transpose a `state_v_first` state on the way in and out."""
    module = TILELANG_MODULES[variant]
    name = _launcher_name(variant, mode)
    recurrent = mode == "fused_recurrent"
    caps = tilelang_capabilities(recurrent, _state_v_first(variant, mode))

    def gates(g, g_gamma):
        if variant == "retention":
            return {}
        return {"g_gamma": g_gamma} if g is None else {"g_gamma": g_gamma, "g": g.contiguous()}

    def fwd(q, k, v, g, g_gamma, initial_state, cu_seqlens, *, scale, output_final_state, reverse, state_v_first):
        launch_fwd, _ = _tilelang_launchers(module, name)
        q, k, v, initial_state = _contiguous(q, k, v, initial_state)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
        extra = {"reverse": reverse, "state_v_first": state_v_first} if recurrent else {}
        transpose = state_v_first and not recurrent
        o, ht = launch_fwd(
            q,
            k,
            v,
            scale=float(scale),
            initial_state=_transpose_state(initial_state) if transpose else initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            **gates(g, g_gamma),
            **extra,
        )
        return o, (_transpose_state(ht) if transpose else ht)

    def bwd(q, k, v, g, g_gamma, do, dht, initial_state, cu_seqlens, *, scale, reverse, state_v_first, ht=None):
        _, launch_bwd = _tilelang_launchers(module, name)
        q, k, v, do, dht, initial_state = _contiguous(q, k, v, do, dht, initial_state)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
        extra = {"reverse": reverse, "state_v_first": state_v_first} if recurrent else {}
        transpose = state_v_first and not recurrent
        if g is not None:
            # the gate's gradient needs <ht, dht>, both in the kernels' [K, V] layout
            extra["ht"] = _transpose_state(ht) if transpose else ht
        grads = launch_bwd(
            q,
            k,
            v,
            do,
            _transpose_state(dht) if transpose else dht,
            scale=float(scale),
            initial_state=_transpose_state(initial_state) if transpose else initial_state,
            cu_seqlens=cu_seqlens,
            **gates(g, g_gamma),
            **extra,
        )
        dq, dk, dv, dh0 = grads[:4]
        dg = grads[4] if len(grads) > 4 else None
        return dq, dk, dv, dg, (_transpose_state(dh0) if transpose else dh0)

    return Backend(
        name="tilelang",
        capabilities=caps,
        verifier=functools.partial(tilelang_verifier, caps, module),
        fwd=fwd,
        bwd=bwd,
        description="the TileLang kernels",
    )


def make_torch_backend(variant: str, mode: str) -> Backend:
    """the torch backend: the chunked pure-PyTorch forward (`fla_tl.reference.chunk_simple_gla_torch`, with
    retention's decay for retention; `chunk_gla_torch` for GLA), autograd of a recompute backward."""
    recurrent = mode == "fused_recurrent"
    caps = torch_capabilities(recurrent, _state_v_first(variant, mode), gate=variant in ("simple_gla", "gla"))

    def run(q, k, v, g, g_gamma, initial_state, *, scale, output_final_state, reverse, state_v_first, cu_seqlens):
        if variant == "gla":
            if g is None:  # fused_recurrent_gla without gk: no decay
                g = q.new_zeros(q.shape, dtype=torch.float32)
            return chunk_gla_torch(q, k, v, g, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, reverse=reverse,
                                   state_v_first=state_v_first, cu_seqlens=cu_seqlens)
        if variant == "retention":
            g_gamma = retention_g_gamma(q.shape[2], q.device)
        return chunk_simple_gla_torch(
            q,
            k,
            v,
            g=g,
            g_gamma=g_gamma,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            reverse=reverse,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
        )

    def fwd(q, k, v, g, g_gamma, initial_state, cu_seqlens, *, scale, output_final_state, reverse, state_v_first):
        with torch.no_grad():
            return run(q, k, v, g, g_gamma, initial_state, scale=scale, output_final_state=output_final_state,
                       reverse=reverse, state_v_first=state_v_first, cu_seqlens=cu_seqlens)

    def bwd(q, k, v, g, g_gamma, do, dht, initial_state, cu_seqlens, *, scale, reverse, state_v_first, ht=None):
        # torch.func.vjp works below the autograd key, where a custom op's implementation runs
        names = ["q", "k", "v"] + (["g"] if g is not None else []) + (["h0"] if initial_state is not None else [])
        given = {"q": q, "k": k, "v": v, "g": g, "h0": initial_state}
        primals = tuple(given[n] for n in names)

        def forward(*xs):
            x = dict(zip(names, xs))
            o, ht = run(x["q"], x["k"], x["v"], x.get("g"), g_gamma, x.get("h0"), scale=scale,
                        output_final_state=dht is not None, reverse=reverse, state_v_first=state_v_first,
                        cu_seqlens=cu_seqlens)
            return (o, ht) if dht is not None else (o,)

        outputs, vjp_fn = torch.func.vjp(forward, *primals)
        cotangents = (do.to(outputs[0].dtype),)
        if dht is not None:
            cotangents += (dht.to(outputs[1].dtype),)
        grads = dict(zip(names, (gr.to(x.dtype) for x, gr in zip(primals, vjp_fn(cotangents)))))
        return grads["q"], grads["k"], grads["v"], grads.get("g"), grads.get("h0")

    return Backend(
        name="torch",
        capabilities=caps,
        verifier=functools.partial(torch_verifier, caps),
        fwd=fwd,
        bwd=bwd,
        description="the pure-PyTorch path",
    )


def make_refusing_backend(name: str, caps: Capabilities, reason: str) -> Backend:
    """a backend entry that refuses every input with `reason` (an op or backend not built yet, or dropped by fla);
    `list` shows it and errors name it."""

    def refuse(*args, **kwargs):
        raise BackendError(reason)

    return Backend(name=name, capabilities=caps, verifier=lambda inputs: capability_reasons(caps, inputs) + [reason],
                   fwd=refuse, bwd=refuse, description=reason, note=reason)


def _register(name: str, variant: str, mode: str, reference, tilelang_refusal: str | None = None,
              torch_refusal: str | None = None, **fields):
    spec = register_op(OpSpec(name=name, variant=variant, mode=mode, reference=reference, **fields))
    recurrent = mode == "fused_recurrent"
    if tilelang_refusal is None:
        register_backend(name, make_tilelang_backend(variant, mode))
    else:
        caps = tilelang_capabilities(recurrent, _state_v_first(variant, mode))
        register_backend(name, make_refusing_backend("tilelang", caps, tilelang_refusal))
    if torch_refusal is None:
        register_backend(name, make_torch_backend(variant, mode))
    else:
        caps = torch_capabilities(recurrent, _state_v_first(variant, mode))
        register_backend(name, make_refusing_backend("torch", caps, torch_refusal))
    return spec, define_linear_attention_ops(name)[0]


def _simple_gla_cases(B, T, H, device):
    g_gamma = -torch.rand(H, device=device) * 0.2
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device) + 3)
    return [("g_gamma", {"g_gamma": g_gamma}), ("g", {"g": g}), ("g+g_gamma", {"g": g, "g_gamma": g_gamma})]


def _linear_attn_cases(B, T, H, device):
    return [("", {"normalize": False})]


def _lightning_attn_cases(B, T, H, device):
    return [("layer 1/4", {"layer_idx": 1, "num_layers": 4})]


_chunk_spec, _chunk_retention_fwd = _register("chunk_retention", "retention", "chunk", recurrent_retention)
_fused_chunk_spec, _fused_chunk_retention_fwd = _register(
    "fused_chunk_retention", "retention", "fused_chunk", recurrent_retention
)
_fused_recurrent_spec, _fused_recurrent_retention_fwd = _register(
    "fused_recurrent_retention", "retention", "fused_recurrent", recurrent_retention
)
_simple_gla_specs = {
    mode: _register(f"{mode}_simple_gla", "simple_gla", mode, recurrent_simple_gla, check_cases=_simple_gla_cases)
    for mode in ("chunk", "fused_chunk", "fused_recurrent")
}
_linear_attn_specs = {
    mode: _register(f"{mode}_linear_attn", "linear_attn", mode, recurrent_linear_attn, check_cases=_linear_attn_cases)
    for mode in ("chunk", "fused_chunk", "fused_recurrent")
}
def _gla_cases(B, T, H, device):
    return [("g", {"g": torch.nn.functional.logsigmoid(torch.randn(B, T, H, 32, device=device) + 2)})]


def _fused_recurrent_gla_cases(B, T, H, device):
    return [("gk", {"gk": torch.nn.functional.logsigmoid(torch.randn(B, T, H, 32, device=device) + 2)}),
            ("no gate", {})]


def _recurrent_gla_gk(q, k, v, gk=None, **kwargs):
    """`recurrent_gla` with fused_recurrent_gla's gate name (`gk`, None: no decay)."""
    return recurrent_gla(q, k, v, gk if gk is not None else torch.zeros_like(q), **kwargs)


FUSED_CHUNK_GLA_DROPPED = "fused_chunk_gla is not provided (fla 0.6.0 dropped it): use chunk_gla"
_gla_specs = {
    "chunk": _register("chunk_gla", "gla", "chunk", recurrent_gla, check_cases=_gla_cases),
    "fused_recurrent": _register("fused_recurrent_gla", "gla", "fused_recurrent", _recurrent_gla_gk,
                                 check_cases=_fused_recurrent_gla_cases),
    "fused_chunk": _register("fused_chunk_gla", "gla", "fused_chunk", recurrent_gla,
                             tilelang_refusal=FUSED_CHUNK_GLA_DROPPED, torch_refusal=FUSED_CHUNK_GLA_DROPPED),
}
_lightning_attn_specs = {
    mode: _register(f"{mode}_lightning_attn", "lightning_attn", mode, recurrent_lightning_attn,
                    check_cases=_lightning_attn_cases)
    for mode in ("chunk", "fused_recurrent")
}


def _run(
    spec: OpSpec,
    fwd_op,
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """validate, default the scale, handle T = 0, and call the custom op (which picks the backend)."""
    N = validate_linear_attention_inputs(
        q,
        k,
        v,
        scale=scale,
        initial_state=initial_state,
        cu_seqlens=cu_seqlens,
        state_v_first=state_v_first,
        g=g,
        g_gamma=g_gamma,
        g_per_key=g_per_key,
    )
    check_backend_name(spec, backend)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    ht_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if T == 0:
        o = v.new_empty(B, 0, H, V)
        if not output_final_state:
            return o, None
        if initial_state is not None:
            return o, initial_state.to(ht_dtype, copy=True)
        shape = (N, H, V, K) if state_v_first else (N, H, K, V)
        return o, q.new_zeros(shape, dtype=ht_dtype)
    requires_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, initial_state)
    )
    o, ht = fwd_op(
        q,
        k,
        v,
        g,
        g_gamma,
        initial_state,
        cu_seqlens,
        float(scale),
        bool(output_final_state),
        bool(reverse),
        bool(state_v_first),
        requires_grad,
        backend if backend is not None and backend != AUTO else "",
    )
    return o, (ht if output_final_state else None)


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Retention (RetNet) in the chunked form: `h_t = gamma_h h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`,
    with the per-head decay `gamma_h = 1 - 2 ** (-5 - h)`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]`, any float dtype; `N = B`, or the number of sequences with
            `cu_seqlens`. Default: `None`.
        output_final_state (bool):
            whether to return the final state of shape `[N, H, K, V]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` for variable-length inputs packed with `B = 1`,
            as in FlashAttention. Default: `None`.
        backend (Optional[str]):
            `"tilelang"` or `"torch"` to force a backend (raises if it cannot run the input); `None` chooses
            automatically, or takes `FLA_TL_BACKEND`. Default: `None`.
        kwargs:
            `chunk_size` is accepted and ignored (the kernels pick their own); `head_first` raises.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state of shape `[N, H, K, V]` in float32 (float64 for float64 inputs) if `output_final_state`,
            else `None`.

    Examples::
        >>> import torch
        >>> from fla_tl.ops import chunk_retention
        >>> B, T, H, K, V = 2, 1000, 4, 128, 128
        >>> q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        >>> h0 = torch.randn(B, H, K, V, device="cuda")
        >>> o, ht = chunk_retention(q, k, v, initial_state=h0, output_final_state=True)
        # varlen: pack the sequences into B = 1 and pass their boundaries
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> cu_seqlens = torch.tensor([0, 300, 2000], device="cuda")
        >>> o, ht = chunk_retention(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    """
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    kwargs.pop("chunk_size", None)
    if kwargs:
        raise TypeError(f"chunk_retention() got unexpected keyword arguments {sorted(kwargs)}")
    return _run(
        _chunk_spec,
        _chunk_retention_fwd,
        q,
        k,
        v,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=False,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )


def fused_chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Retention in the fused-chunk form (one kernel carries the state across chunks); same math as
    :func:`chunk_retention`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]`, any float dtype. Default: `None`.
        output_final_state (bool):
            whether to return the final state of shape `[N, H, K, V]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` with `B = 1`. Default: `None`.
        backend (Optional[str]):
            `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state of shape `[N, H, K, V]` in float32 if `output_final_state`, else `None`.

    Examples::
        >>> q = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> o, ht = fused_chunk_retention(q, k, v, output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, ht = fused_chunk_retention(q, k, v, cu_seqlens=torch.tensor([0, 1, 2000], device="cuda"))
    """
    return _run(
        _fused_chunk_spec,
        _fused_chunk_retention_fwd,
        q,
        k,
        v,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=False,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )


def fused_recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Retention by the token-by-token recurrence in one fused kernel; same math as :func:`chunk_retention`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`), any float dtype.
            Default: `None`.
        output_final_state (bool):
            whether to return the final state (same layout as `initial_state`). Default: `False`.
        reverse (bool):
            run the recurrence from the last token to the first of each sequence. Default: `False`.
        state_v_first (bool):
            states are laid out `[N, H, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` with `B = 1`. Default: `None`.
        backend (Optional[str]):
            `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.
        kwargs:
            the deprecated `transpose_state_layout` (renamed `state_v_first`) is accepted with a warning.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state of shape `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`) in float32 if
            `output_final_state`, else `None`.

    Examples::
        >>> q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
        >>> o, ht = fused_recurrent_retention(q, k, v, output_final_state=True, reverse=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, ht = fused_recurrent_retention(q, k, v, cu_seqlens=torch.tensor([0, 10, 128], device="cuda"))
    """
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
        warnings.warn(
            "`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
            DeprecationWarning,
            stacklevel=2,
        )
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    if kwargs:
        raise TypeError(f"fused_recurrent_retention() got unexpected keyword arguments {sorted(kwargs)}")
    return _run(
        _fused_recurrent_spec,
        _fused_recurrent_retention_fwd,
        q,
        k,
        v,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        reverse=reverse,
        state_v_first=state_v_first,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )


_chunk_spec.fn = chunk_retention
_fused_chunk_spec.fn = fused_chunk_retention
_fused_recurrent_spec.fn = fused_recurrent_retention


def _pop_state_layout(name: str, state_v_first: bool, kwargs: dict) -> bool:
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


def _pop_chunk_size(name: str, kwargs: dict) -> None:
    """fla's `chunk_size` (a power of two; the kernels pick their own) and the removed `head_first`."""
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", None)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0
                                   or chunk_size & (chunk_size - 1)):
        raise ValueError(f"`chunk_size` must be a power of 2, got {chunk_size}.")


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA in the chunked form: `h_t = exp(g_t + g_gamma) h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        g (Optional[torch.Tensor]):
            per-token log forget gates of shape `[B, T, H]` (any float dtype; gets a gradient). Default: `None`.
        g_gamma (Optional[torch.Tensor]):
            per-head constant log decay of shape `[H]` (no gradient, as in fla). Default: `None`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            initial state of shape `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`). Default: `None`.
        output_final_state (bool):
            whether to return the final state. Default: `False`.
        state_v_first (bool):
            states are laid out `[N, H, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` with `B = 1`. Default: `None`.
        cu_seqlens_cpu (Optional[torch.LongTensor]):
            accepted for fla compatibility and unused. Default: `None`.
        backend (Optional[str]):
            `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.
        kwargs:
            `chunk_size` (a power of two) is accepted and ignored; `head_first` raises.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state (Optional[torch.Tensor]):
            final state (same layout as `initial_state`) in float32 if `output_final_state`, else `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k = (torch.randn(2, 1000, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        >>> v = torch.randn(2, 1000, 4, 128, device="cuda", dtype=torch.bfloat16)
        >>> g_gamma = -torch.rand(4, device="cuda")
        >>> o, ht = chunk_simple_gla(q, k, v, g_gamma=g_gamma, output_final_state=True)
        >>> g = F.logsigmoid(torch.randn(2, 1000, 4, device="cuda"))
        >>> o, ht = chunk_simple_gla(q, k, v, g=g, output_final_state=True)
        # varlen: pack the sequences into B = 1 and pass their boundaries
        >>> q, k, v, g = (x.flatten(0, 1)[None] for x in (q, k, v, g))
        >>> o, ht = chunk_simple_gla(q, k, v, g=g, cu_seqlens=torch.tensor([0, 300, 2000], device="cuda"))
    """
    _pop_chunk_size("chunk_simple_gla", kwargs)
    state_v_first = _pop_state_layout("chunk_simple_gla", state_v_first, kwargs)
    spec, fwd_op = _simple_gla_specs["chunk"]
    return _run(spec, fwd_op, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=False, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, backend=backend, g=g, g_gamma=g_gamma)


def fused_chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA in the fused-chunk form (one kernel carries the state across chunks); same math and arguments as
    :func:`chunk_simple_gla` without `state_v_first`.

    Examples::
        >>> q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = fused_chunk_simple_gla(q, k, v, g_gamma=-torch.rand(4, device="cuda"), output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = fused_chunk_simple_gla(q, k, v, cu_seqlens=torch.tensor([0, 1, 2000], device="cuda"))
    """
    spec, fwd_op = _simple_gla_specs["fused_chunk"]
    return _run(spec, fwd_op, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=False, state_v_first=False,
                cu_seqlens=cu_seqlens, backend=backend, g=g, g_gamma=g_gamma)


def fused_recurrent_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA by the token-by-token recurrence in one fused kernel; same math and arguments as
    :func:`chunk_simple_gla`, plus `reverse` (run each sequence from its last token). The deprecated
    `transpose_state_layout` is accepted with a warning.

    Examples::
        >>> q, k, v = (torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = fused_recurrent_simple_gla(q, k, v, g_gamma=-torch.rand(4, device="cuda"), reverse=True,
        ...                                    output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = fused_recurrent_simple_gla(q, k, v, cu_seqlens=torch.tensor([0, 10, 128], device="cuda"))
    """
    state_v_first = _pop_state_layout("fused_recurrent_simple_gla", state_v_first, kwargs)
    spec, fwd_op = _simple_gla_specs["fused_recurrent"]
    return _run(spec, fwd_op, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, backend=backend, g=g, g_gamma=g_gamma)


def _linear_attn(mode, q, k, v, scale, initial_state, output_final_state, reverse, normalize, cu_seqlens, backend):
    h0, z0 = split_state(initial_state, normalize)
    spec, fwd_op = _linear_attn_specs[mode]
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = q.shape[-1] ** -0.5
    o, ht = _run(spec, fwd_op, q, k, v, scale=scale, initial_state=h0, output_final_state=output_final_state,
                 reverse=reverse, state_v_first=False, cu_seqlens=cu_seqlens, backend=backend)
    if not normalize:
        return o, ht
    if z0 is not None:
        N = h0.shape[0] if h0 is not None else (cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0])
        want = (N, 1, q.shape[2], q.shape[3])
        if not isinstance(z0, torch.Tensor) or tuple(z0.shape) != want:
            got = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise ValueError(f"`initial_state[1]` (the key sum z) must have shape [N, 1, H, K] = {list(want)}, got {got}")
    # the TileLang stages on a GPU, the PyTorch stage for the torch backend, on CPU and for empty inputs
    if (requested_backend(backend) != "torch" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32) and q.shape[1] > 0
            and import_reason("tilelang") is None):
        from .kernels.linear_attn import key_sum_normalize

        o, z = key_sum_normalize(o, q, k, float(scale), z0, reverse, cu_seqlens)
    else:
        o, z = normalize_with_key_sum(o, q, k, float(scale), z0, reverse, cu_seqlens)
    return o, (ht, z)


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | tuple | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    Linear attention in the chunked form: `h_t = h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`, divided by
    `scale * q_t . z_t + 1e-10` with the running key sum `z_t` when `normalize` (fla's default here).

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`.
        scale (Optional[float]):
            scale of the attention scores. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor | tuple]):
            `[N, H, K, V]`; with `normalize`, a tuple `(h0, z0)` with the key sum `z0` of shape `[N, 1, H, K]`
            (or `h0` alone). Default: `None`.
        output_final_state (bool):
            whether to return the final state. Default: `False`.
        normalize (bool):
            divide by the running key-sum denominator. Default: `True`.
        cu_seqlens (Optional[torch.LongTensor]):
            cumulative sequence lengths of shape `[N + 1]` with `B = 1`. Default: `None`.
        backend (Optional[str]):
            `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.

    Returns:
        o (torch.Tensor):
            outputs of shape `[B, T, H, V]` in the dtype of `q`.
        final_state:
            without `normalize`, the state `[N, H, K, V]` in float32 or `None`; with it, the tuple
            `(state or None, z)`, `z` the key sum `[N, 1, H, K]` in float32 (always returned, as in fla).

    Examples::
        >>> q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, (ht, z) = chunk_linear_attn(q, k, v, output_final_state=True)
        >>> o, ht = chunk_linear_attn(q, k, v, output_final_state=True, normalize=False)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, (ht, z) = chunk_linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 300, 2000], device="cuda"))

    The normalisation is a pure-PyTorch stage (an fp32 cumulative sum and a division) after the kernels.
    """
    return _linear_attn("chunk", q, k, v, scale, initial_state, output_final_state, False, normalize, cu_seqlens,
                        backend)


def fused_chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | tuple | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    Linear attention in the fused-chunk form; same math, arguments and returns as :func:`chunk_linear_attn`.

    Examples::
        >>> q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, (ht, z) = fused_chunk_linear_attn(q, k, v, output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, ht = fused_chunk_linear_attn(q, k, v, normalize=False, cu_seqlens=torch.tensor([0, 9, 2000], device="cuda"))
    """
    return _linear_attn("fused_chunk", q, k, v, scale, initial_state, output_final_state, False, normalize,
                        cu_seqlens, backend)


def fused_recurrent_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | tuple | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    Linear attention by the token-by-token recurrence; same math and returns as :func:`chunk_linear_attn`, plus
    `reverse`; `normalize` defaults to `False` here, as in fla.

    Examples::
        >>> q, k, v = (torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = fused_recurrent_linear_attn(q, k, v, output_final_state=True, reverse=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, (ht, z) = fused_recurrent_linear_attn(q, k, v, normalize=True, cu_seqlens=torch.tensor([0, 10, 128], device="cuda"))
    """
    return _linear_attn("fused_recurrent", q, k, v, scale, initial_state, output_final_state, reverse, normalize,
                        cu_seqlens, backend)


def _lightning_decay(q, layer_idx, num_layers) -> torch.Tensor:
    for name, x in (("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"`{name}` must be an int, got {type(x).__name__}")
    if num_layers < 1 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"need 0 <= layer_idx < num_layers, got layer_idx = {layer_idx}, num_layers = {num_layers}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return None  # the shared validation reports q
    return lightning_g_gamma(q.shape[2], layer_idx, num_layers, q.device)


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Lightning attention in the chunked form: simple GLA with the per-head decay
    `g_gamma_h = -(8 / H) * (1 - layer_idx / num_layers) * h` (fla 0.6.0).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        layer_idx (int): this layer's index, `0 <= layer_idx < num_layers`.
        num_layers (int): the number of layers.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. Default: `None`.
        output_final_state (bool): Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. Default: `None`.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None`. Default: `None`.
        kwargs: `chunk_size` is accepted and ignored; `head_first` raises.

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in q's dtype. final_state: `[N, H, K, V]` float32 or `None`.

    Examples::
        >>> q, k, v = (torch.randn(2, 1000, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = chunk_lightning_attn(q, k, v, layer_idx=3, num_layers=24, output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = chunk_lightning_attn(q, k, v, 3, 24, cu_seqlens=torch.tensor([0, 300, 2000], device="cuda"))
    """
    _pop_chunk_size("chunk_lightning_attn", kwargs)
    if kwargs:
        raise TypeError(f"chunk_lightning_attn() got unexpected keyword arguments {sorted(kwargs)}")
    spec, fwd_op = _lightning_attn_specs["chunk"]
    return _run(spec, fwd_op, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=False, state_v_first=False, cu_seqlens=cu_seqlens,
                backend=backend, g_gamma=_lightning_decay(q, layer_idx, num_layers))


def fused_recurrent_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Lightning attention by the token-by-token recurrence; same math and arguments as :func:`chunk_lightning_attn`,
    plus `reverse`.

    Examples::
        >>> q, k, v = (torch.randn(2, 64, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = fused_recurrent_lightning_attn(q, k, v, 0, 12, output_final_state=True, reverse=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = fused_recurrent_lightning_attn(q, k, v, 0, 12, cu_seqlens=torch.tensor([0, 10, 128], device="cuda"))
    """
    spec, fwd_op = _lightning_attn_specs["fused_recurrent"]
    return _run(spec, fwd_op, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=reverse, state_v_first=False, cu_seqlens=cu_seqlens,
                backend=backend, g_gamma=_lightning_decay(q, layer_idx, num_layers))


for _mode, _fn in (("chunk", chunk_simple_gla), ("fused_chunk", fused_chunk_simple_gla),
                   ("fused_recurrent", fused_recurrent_simple_gla)):
    _simple_gla_specs[_mode][0].fn = _fn
for _mode, _fn in (("chunk", chunk_linear_attn), ("fused_chunk", fused_chunk_linear_attn),
                   ("fused_recurrent", fused_recurrent_linear_attn)):
    _linear_attn_specs[_mode][0].fn = _fn
for _mode, _fn in (("chunk", chunk_lightning_attn), ("fused_recurrent", fused_recurrent_lightning_attn)):
    _lightning_attn_specs[_mode][0].fn = _fn


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    GLA in the chunked form: `h_t = diag(exp(g_t)) h_{t-1} + k_t v_t^T`, `o_t = scale * h_t^T q_t`, with a log gate
    per key channel. The tilelang backend runs the kernels of `fla_tl.kernels.gla` (per-key gated state passes).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        g (torch.Tensor): per-key log forget gates `[B, T, H, K]` (any float dtype; gets a gradient).
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]` (`[N, H, V, K]` with `state_v_first`).
        output_final_state (bool): Default: `False`.
        state_v_first (bool): states laid out `[N, H, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. Default: `None`.
        cu_seqlens_cpu (Optional[torch.LongTensor]): accepted for fla compatibility and unused.
        backend (Optional[str]): `"torch"` or `None`. Default: `None`.

    Returns:
        o `[B, T, H, V]` in q's dtype; the final state in float32 if `output_final_state`, else `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k, v = (torch.randn(2, 500, 4, 64) for _ in range(3))
        >>> g = F.logsigmoid(torch.randn(2, 500, 4, 64))
        >>> o, ht = chunk_gla(q, k, v, g, output_final_state=True)
        >>> q, k, v, g = (x.flatten(0, 1)[None] for x in (q, k, v, g))
        >>> o, ht = chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 300, 1000]), output_final_state=True)
    """
    spec, fwd_op = _gla_specs["chunk"]
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"`g` must be a torch.Tensor [B, T, H, K], got {type(g).__name__}")
    return _run(spec, fwd_op, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=False, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, backend=backend, g=g, g_per_key=True)


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    GLA by the token-by-token recurrence; same math as :func:`chunk_gla` with the key gate `gk` (None: no decay),
    plus `reverse`. The value gate `gv` is not supported yet (raises). The deprecated `transpose_state_layout` is
    accepted with a warning.

    Examples::
        >>> q, k, v = (torch.randn(2, 64, 4, 32) for _ in range(3))
        >>> gk = torch.randn(2, 64, 4, 32).sigmoid().log()
        >>> o, ht = fused_recurrent_gla(q, k, v, gk, output_final_state=True, reverse=True)
        >>> q, k, v, gk = (x.flatten(0, 1)[None] for x in (q, k, v, gk))
        >>> o, _ = fused_recurrent_gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 10, 128]))
    """
    if gv is not None:
        raise NotImplementedError("fused_recurrent_gla: the value gate `gv` is not supported by fla_tl yet")
    state_v_first = _pop_state_layout("fused_recurrent_gla", state_v_first, kwargs)
    spec, fwd_op = _gla_specs["fused_recurrent"]
    return _run(spec, fwd_op, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                cu_seqlens=cu_seqlens, backend=backend, g=gk, g_per_key=True)


def fused_chunk_gla(**kwargs):
    """fla 0.6.0 dropped `fused_chunk_gla`; so does fla_tl (registered with that refusal): use :func:`chunk_gla`."""
    raise NotImplementedError("`fused_chunk_gla` is deprecated. Please use `chunk_gla` instead.")


_gla_specs["chunk"][0].fn = chunk_gla
_gla_specs["fused_recurrent"][0].fn = fused_recurrent_gla
_gla_specs["fused_chunk"][0].fn = fused_chunk_gla


# ---------------------------------------------------------------- ops without TileLang kernels yet
#
# Their only runnable backend is plain differentiable PyTorch, so they need no custom op: the public function checks
# the input, asks the registry for a backend (the tilelang entry refuses with its reason), and calls it; autograd and
# torch.compile see ordinary tensor code.

NO_KERNEL = "no TileLang kernel for this op yet; the torch backend runs it"


def _register_plain(name: str, variant: str, mode: str, reference, torch_fn, *, recurrent=False, varlen=True,
                    initial_state=True, max_head_dim=None, self_check=None, tilelang_refusal=NO_KERNEL,
                    tilelang_backend: Backend | None = None, gate: bool = False):
    spec = register_op(OpSpec(name=name, variant=variant, mode=mode, reference=reference, self_check=self_check))
    tl_caps = dataclasses.replace(tilelang_capabilities(recurrent), varlen=varlen, initial_state=initial_state)
    register_backend(name, tilelang_backend or make_refusing_backend("tilelang", tl_caps, tilelang_refusal))
    caps = dataclasses.replace(torch_capabilities(recurrent), varlen=varlen, initial_state=initial_state,
                               max_head_dim=max_head_dim, gate=gate)
    register_backend(name, Backend(name="torch", capabilities=caps, verifier=functools.partial(torch_verifier, caps),
                                   fwd=torch_fn, bwd=None, description="the pure-PyTorch path"))
    return spec


def _plain_backend(spec: OpSpec, x: torch.Tensor, K: int, V: int, backend: str | None, cu_seqlens=None,
                   initial_state=None, gate: bool = False) -> Backend:
    check_backend_name(spec, backend)
    cc = tuple(torch.cuda.get_device_capability(x.device)) if x.device.type == "cuda" else None
    inputs = OpInputs(device_type=x.device.type, dtype=x.dtype, K=K, V=V, compute_capability=cc,
                      varlen=cu_seqlens is not None, initial_state=initial_state is not None,
                      backward=torch.is_grad_enabled() and x.requires_grad, gate=gate)
    return select_backend(spec, inputs, backend if backend != AUTO else None)


def _self_check_attention(fn, reference, K=16, **kwargs):
    """a `check` for attention-form ops: fn against reference on (q, k, v) at (2, 70, 2, K)."""

    def run(device, dtype):
        q, k, v = (torch.randn(2, 70, 2, K, device=device).to(dtype).requires_grad_() for _ in range(3))
        o = fn(q, k, v, backend="torch", **kwargs)
        o = o[0] if isinstance(o, tuple) else o
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), do)
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        r = [x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v)]
        ro = reference(*r, **kwargs)
        ro = ro[0] if isinstance(ro, tuple) else ro
        rgrads = torch.autograd.grad(ro, r, do.to(ref_dtype))
        names = ("o", "dq", "dk", "dv")
        return [(n, *compare(a, b, dtype)) for n, a, b in zip(names, (o, *grads), (ro, *rgrads))]

    return run


def parallel_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    output_attentions: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Simple GLA in the attention form: `o_i = scale * sum_{j <= i} exp(G_i - G_j) (q_i . k_j) v_j`, `G` the cumulative
    per-token log gate `g` `[B, T, H]` (None: no decay). Returns `(o [B, T, H, V], attn [B, H, T, T] or None)`; the
    attention is materialised only with `output_attentions` (not with `cu_seqlens`, as in fla). No TileLang kernel
    yet: the torch backend runs it, queries in blocks.

    Examples::
        >>> q, k, v = (torch.randn(2, 300, 4, 64) for _ in range(3))
        >>> g = torch.randn(2, 300, 4).sigmoid().log()
        >>> o, attn = parallel_simple_gla(q, k, v, g, output_attentions=True)
        >>> q, k, v, g = (x.flatten(0, 1)[None] for x in (q, k, v, g))
        >>> o, _ = parallel_simple_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 100, 600]))
    """
    validate_linear_attention_inputs(q, k, v, scale=scale, cu_seqlens=cu_seqlens, g=g)
    if output_attentions and cu_seqlens is not None:
        raise ValueError("`output_attentions=True` is not supported with `cu_seqlens` (as in fla)")
    if output_attentions:
        # the attention matrix exists only in the torch backend's attention form
        if backend == "tilelang":
            raise BackendError("parallel_simple_gla: the tilelang backend does not materialise the attention "
                               "(output_attentions=True); use backend='torch' or None")
        backend = "torch"
    chosen = _plain_backend(_parallel_simple_gla_spec, q, q.shape[-1], v.shape[-1], backend, cu_seqlens,
                            gate=g is not None)
    return chosen.fwd(q, k, v, g, scale=scale, output_attentions=output_attentions, cu_seqlens=cu_seqlens)


def _check_hgrn(x, g, initial_state, cu_seqlens):
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor [B, T, D], got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if x.dim() != 3:
        raise ValueError(f"`x` must have shape [B, T, D], got {tuple(x.shape)}")
    if g.shape != x.shape:
        raise ValueError(f"`g` must have the shape of `x` {tuple(x.shape)}, got {tuple(g.shape)}")
    if g.device != x.device:
        raise ValueError(f"`g` must be on the device of `x` ({x.device}), got {g.device}")
    B, T, D = x.shape
    N = B
    if cu_seqlens is not None:
        # the shared checks of cu_seqlens, on a [B, T, 1, D] view
        validate_linear_attention_inputs(x[..., None, :], x[..., None, :], x[..., None, :], cu_seqlens=cu_seqlens)
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (N, D):
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"`initial_state` must have shape [N, D] = {[N, D]}, got {got}")


def chunk_hgrn(
    x: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    HGRN in chunks: `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t`, elementwise over `[B, T, D]`.

    Args:
        x (torch.Tensor): inputs `[B, T, D]`. g (torch.Tensor): log forget gates `[B, T, D]`.
        initial_state (Optional[torch.Tensor]): `[B, D]`. Default: `None`.
        output_final_state (bool): return the final state `[B, D]` (float32). Default: `False`.
        backend (Optional[str]): `"torch"` or `None`. Default: `None`.

    Returns:
        o `[B, T, D]` in x's dtype, and the final state or `None`.

    Examples::
        >>> x, g = torch.randn(2, 500, 256), torch.randn(2, 500, 256).sigmoid().log()
        >>> o, ht = chunk_hgrn(x, g, output_final_state=True)
    """
    _check_hgrn(x, g, initial_state, None)
    chosen = _plain_backend(_chunk_hgrn_spec, x, x.shape[-1], x.shape[-1], backend, None, initial_state)
    return chosen.fwd(x, g, initial_state, output_final_state)


def fused_recurrent_hgrn(
    x: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    HGRN token by token; same math and returns as :func:`chunk_hgrn`, plus `cu_seqlens` (`B = 1`, `initial_state`
    `[N, D]`).

    Examples::
        >>> x, g = torch.randn(1, 500, 256), torch.randn(1, 500, 256).sigmoid().log()
        >>> o, ht = fused_recurrent_hgrn(x, g, output_final_state=True, cu_seqlens=torch.tensor([0, 100, 500]))
    """
    _check_hgrn(x, g, initial_state, cu_seqlens)
    chosen = _plain_backend(_fused_recurrent_hgrn_spec, x, x.shape[-1], x.shape[-1], backend, cu_seqlens,
                            initial_state)
    return chosen.fwd(x, g, initial_state, output_final_state, cu_seqlens)


def _check_head_dim(name: str, q: torch.Tensor, limit: int) -> None:
    if q.shape[-1] > limit:
        raise ValueError(f"{name}: the feature dim K must be <= {limit} (fla's limit), got {q.shape[-1]}")


def fused_chunk_based(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    use_norm: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    r"""
    Based: causal linear attention with the 2nd-order Taylor feature map, `a_ij = 1 + s_ij + s_ij^2 / 2`,
    `s_ij = scale * q_i . k_j`; normalised by `sum_j a_ij + 1e-6` when `use_norm`. `[B, T, H, K]` with `K <= 16`
    (fla's limit); returns `o` `[B, T, H, V]`.

    Examples::
        >>> q, k, v = torch.randn(2, 300, 4, 16), torch.randn(2, 300, 4, 16), torch.randn(2, 300, 4, 64)
        >>> o = fused_chunk_based(q, k, v)
    """
    validate_linear_attention_inputs(q, k, v, scale=scale)
    _check_head_dim("fused_chunk_based", q, 16)
    chosen = _plain_backend(_fused_chunk_based_spec, q, q.shape[-1], v.shape[-1], backend)
    return chosen.fwd(q, k, v, scale=scale, use_norm=use_norm)


def parallel_based(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    use_norm: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    r"""
    Based in the parallel (attention) form; same math as :func:`fused_chunk_based` with `K <= 128`.

    Examples::
        >>> q, k, v = torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64)
        >>> o = parallel_based(q, k, v, use_norm=False)
    """
    validate_linear_attention_inputs(q, k, v, scale=scale)
    _check_head_dim("parallel_based", q, 128)
    chosen = _plain_backend(_parallel_based_spec, q, q.shape[-1], v.shape[-1], backend)
    return chosen.fwd(q, k, v, scale=scale, use_norm=use_norm)


def parallel_rebased(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-5,
    use_scale: bool = True,
    use_normalize: bool = True,
    return_both: bool = False,
    backend: str | None = None,
):
    r"""
    ReBased: causal linear attention with the squared feature map, `a_ij = s_ij^2`, `s_ij = scale * q_i . k_j`
    (`scale = K ** -0.5` when `use_scale`, else 1); normalised by `sum_j a_ij + eps` when `use_normalize`. `K <= 128`.
    Returns `o` `[B, T, H, V]`, or with `return_both` the unnormalised `o` `[B, H, T, V]` and `z` `[B, H, T]` (fla's
    layout).

    Examples::
        >>> q, k, v = torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64)
        >>> o = parallel_rebased(q, k, v)
    """
    validate_linear_attention_inputs(q, k, v)
    _check_head_dim("parallel_rebased", q, 128)
    chosen = _plain_backend(_parallel_rebased_spec, q, q.shape[-1], v.shape[-1], backend)
    return chosen.fwd(q, k, v, eps=eps, use_scale=use_scale, use_normalize=use_normalize, return_both=return_both)


def make_fused_chunk_based_backend() -> Backend:
    """the tilelang backend of fused_chunk_based: the chunked kernels of `fla_tl.kernels.based.fused_chunk`, which form
    the Taylor features of the 16-dim keys and queries on the fly (K <= 16, fla's limit; V <= 256), forward and
    backward, with the normalisation in PyTorch."""
    caps = dataclasses.replace(tilelang_capabilities(), varlen=False, initial_state=False, gate=False)

    def verifier(inputs: OpInputs) -> list[str]:
        reasons = tilelang_verifier(caps, "fla_tl.kernels.based.fused_chunk", inputs)
        if inputs.K > 16:
            reasons.append(f"K = {inputs.K} > 16 (fla's limit for fused_chunk_based: its Taylor features grow as K^2)")
        return reasons

    def fwd(q, k, v, scale=None, use_norm=True):
        from .kernels.based import fused_chunk_based_attention

        scale = q.shape[-1] ** -0.5 if scale is None else scale
        o, z = fused_chunk_based_attention(q, k, v, scale)
        return (o / (z[..., None] + 1e-6) if use_norm else o).to(q.dtype)

    return Backend(name="tilelang", capabilities=caps, verifier=verifier, fwd=fwd, bwd=None,
                   description="chunked Taylor features, TileLang kernels (K <= 16, V <= 256), fwd and bwd")


def make_parallel_based_backend(based: bool) -> Backend:
    """the tilelang backend of parallel_based / parallel_rebased: the attention-form kernels of
    `fla_tl.kernels.based.parallel` (K <= 128, V <= 256), forward and backward, with the normalisation in PyTorch."""
    caps = dataclasses.replace(tilelang_capabilities(), varlen=False, initial_state=False, gate=False)

    def verifier(inputs: OpInputs) -> list[str]:
        reasons = tilelang_verifier(caps, "fla_tl.kernels.based.parallel", inputs)
        if inputs.K > 128:
            reasons.append(f"K = {inputs.K} > 128 (fla's limit for the attention form)")
        return reasons

    def based_fwd(q, k, v, scale=None, use_norm=True):
        from .kernels.based import parallel_based_attention

        scale = q.shape[-1] ** -0.5 if scale is None else scale
        o, z = parallel_based_attention(q, k, v, scale, True)
        return (o / (z[..., None] + 1e-6) if use_norm else o).to(q.dtype)

    def rebased_fwd(q, k, v, eps=1e-5, use_scale=True, use_normalize=True, return_both=False):
        from .kernels.based import parallel_based_attention

        o, z = parallel_based_attention(q, k, v, q.shape[-1] ** -0.5 if use_scale else 1.0, False)
        if return_both:
            return o.transpose(1, 2).to(q.dtype), z.transpose(1, 2).to(q.dtype)
        return (o / (z[..., None] + eps) if use_normalize else o).to(q.dtype)

    return Backend(name="tilelang", capabilities=caps, verifier=verifier, fwd=based_fwd if based else rebased_fwd,
                   bwd=None, description="attention form, TileLang kernels (K <= 128, V <= 256), fwd and bwd")


def _hgrn_self_check(fn, varlen):
    def run(device, dtype):
        B, T, D = (1, 101, 24) if varlen else (2, 70, 24)
        cu = torch.tensor([0, 30, 30, 101], device=device) if varlen else None
        N = 3 if varlen else B
        x = torch.randn(B, T, D, device=device).to(dtype).requires_grad_()
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, device=device) + 2).to(dtype).requires_grad_()
        h0 = torch.randn(N, D, device=device).to(dtype).requires_grad_()
        kw = {"cu_seqlens": cu} if varlen else {}
        o, ht = fn(x, g, h0, True, backend="torch", **kw)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        grads = torch.autograd.grad((o, ht), (x, g, h0), (do, dht))
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        r = [t.detach().to(ref_dtype).requires_grad_() for t in (x, g, h0)]
        ro, rht = recurrent_hgrn(*r, True, cu)
        rgrads = torch.autograd.grad((ro, rht), r, (do.to(ref_dtype), dht.to(ref_dtype)))
        names = ("o", "ht", "dx", "dg", "dh0")
        return [(n, *compare(a, b, dtype)) for n, a, b in zip(names, (o, ht, *grads), (ro, rht, *rgrads))]

    return run


def _parallel_simple_gla_check(device, dtype):
    g = torch.nn.functional.logsigmoid(torch.randn(2, 70, 2, device=device) + 2)
    return _self_check_attention(
        lambda q, k, v, backend: parallel_simple_gla(q, k, v, g.to(q.dtype), backend=backend)[0],
        lambda q, k, v: recurrent_simple_gla(q, k, v, g=g.to(q.dtype))[0],
    )(device, dtype)


def make_parallel_simple_gla_backend() -> Backend:
    """the tilelang backend of parallel_simple_gla: the same output by chunk_simple_gla's TileLang kernels (without
    the attention matrix); the per-token gate follows chunk_simple_gla's capabilities."""
    caps = dataclasses.replace(tilelang_capabilities(), initial_state=False)

    def fwd(q, k, v, g, scale=None, output_attentions=False, cu_seqlens=None):
        return chunk_simple_gla(q, k, v, g=g, scale=scale, cu_seqlens=cu_seqlens, backend="tilelang")[0], None

    return Backend(name="tilelang", capabilities=caps,
                   verifier=functools.partial(tilelang_verifier, caps, "fla_tl.kernels.simple_gla"), fwd=fwd, bwd=None,
                   description="chunk_simple_gla's TileLang kernels")


_parallel_simple_gla_spec = _register_plain(
    "parallel_simple_gla", "simple_gla", "parallel", recurrent_simple_gla, parallel_simple_gla_torch,
    initial_state=False, self_check=_parallel_simple_gla_check, tilelang_backend=make_parallel_simple_gla_backend(),
    gate=True,
)
_parallel_simple_gla_spec.fn = parallel_simple_gla
def make_hgrn_backend(varlen: bool) -> Backend:
    """the tilelang backend of chunk_hgrn and fused_recurrent_hgrn: the fp32 scan kernels of `fla_tl.kernels.hgrn`."""
    caps = dataclasses.replace(tilelang_capabilities(), varlen=varlen, max_head_dim=None)

    def fwd(x, g, initial_state=None, output_final_state=False, cu_seqlens=None):
        from .kernels.hgrn import hgrn

        return hgrn(x, g, initial_state, output_final_state, cu_seqlens)

    return Backend(name="tilelang", capabilities=caps,
                   verifier=functools.partial(tilelang_verifier, caps, "fla_tl.kernels.hgrn"), fwd=fwd, bwd=None,
                   description="fp32 scan kernels, token by token")


_chunk_hgrn_spec = _register_plain("chunk_hgrn", "hgrn", "chunk", recurrent_hgrn, chunk_hgrn_torch, varlen=False,
                                   self_check=_hgrn_self_check(chunk_hgrn, False),
                                   tilelang_backend=make_hgrn_backend(False))
_chunk_hgrn_spec.fn = chunk_hgrn
_fused_recurrent_hgrn_spec = _register_plain(
    "fused_recurrent_hgrn", "hgrn", "fused_recurrent", recurrent_hgrn, chunk_hgrn_torch,
    self_check=_hgrn_self_check(fused_recurrent_hgrn, True), tilelang_backend=make_hgrn_backend(True),
)
_fused_recurrent_hgrn_spec.fn = fused_recurrent_hgrn
_fused_chunk_based_spec = _register_plain(
    "fused_chunk_based", "based", "fused_chunk", recurrent_based, parallel_based_torch, varlen=False,
    initial_state=False, self_check=_self_check_attention(fused_chunk_based, recurrent_based),
    tilelang_backend=make_fused_chunk_based_backend(),
)
_fused_chunk_based_spec.fn = fused_chunk_based
_parallel_based_spec = _register_plain(
    "parallel_based", "based", "parallel", recurrent_based, parallel_based_torch, varlen=False,
    initial_state=False, self_check=_self_check_attention(parallel_based, recurrent_based),
    tilelang_backend=make_parallel_based_backend(True),
)
_parallel_based_spec.fn = parallel_based
_parallel_rebased_spec = _register_plain(
    "parallel_rebased", "rebased", "parallel", recurrent_rebased, parallel_rebased_torch, varlen=False,
    initial_state=False, self_check=_self_check_attention(parallel_rebased, recurrent_rebased),
    tilelang_backend=make_parallel_based_backend(False),
)
_parallel_rebased_spec.fn = parallel_rebased


# ---------------------------------------------------------------- delta rule family


def _validate_delta(q, k, v, beta, g, initial_state, cu_seqlens, state_v_first, scale=None) -> int:
    """the checks of the delta-rule ops (grouped value heads: v, beta, g and the state have HV heads, a multiple of
    the H of q and k); returns N."""
    # q, k, scale and cu_seqlens by the shared checks (v in the shape of q there)
    N = validate_linear_attention_inputs(q, k, q, scale=scale, cu_seqlens=cu_seqlens)
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(f"`v` must be a floating-point torch.Tensor [B, T, HV, V], got "
                        f"{type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}")
    if v.dtype != q.dtype:
        raise TypeError(f"`v` must have the dtype of `q` ({q.dtype}), got {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"`v` must be on the device of `q` ({q.device}), got {v.device}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"`v` must have shape [B, T, HV, V] = [{B}, {T}, HV, V], got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"`v` must have a number of heads HV divisible by H = {H} (grouped value heads), got HV = {HV}")
    for name, x in (("beta", beta), ("g", g)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor [B, T, HV], got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if tuple(x.shape) != (B, T, HV):
            raise ValueError(f"`{name}` must have shape [B, T, HV] = {[B, T, HV]}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {x.device}")
    if initial_state is not None:
        want = (N, HV, V, K) if state_v_first else (N, HV, K, V)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            layout = "[N, HV, V, K]" if state_v_first else "[N, HV, K, V]"
            raise ValueError(f"`initial_state` must have shape {layout} = {list(want)}, got {got}")
        if initial_state.device != q.device:
            raise ValueError(f"`initial_state` must be on the device of `q` ({q.device}), got {initial_state.device}")
    return N


def _delta_chunk_size(name: str, kwargs: dict) -> None:
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", 64)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"`chunk_size` must be 16, 32, or 64, got {chunk_size}.")


def _delta_run(spec, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
               use_qk_l2norm_in_kernel, backend):
    N = _validate_delta(q, k, v, beta, g, initial_state, cu_seqlens, state_v_first, scale)
    chosen = _plain_backend(spec, q, q.shape[-1], v.shape[-1], backend, cu_seqlens, initial_state)
    if q.shape[1] == 0:
        o = v.new_empty(v.shape)
        if not output_final_state:
            return o, None
        B, _, HV, V = v.shape
        K = q.shape[-1]
        ht_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if initial_state is not None:
            return o, initial_state.to(ht_dtype, copy=True)
        return o, q.new_zeros((N, HV, V, K) if state_v_first else (N, HV, K, V), dtype=ht_dtype)
    o, ht = chosen.fwd(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens,
                       use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return o.to(q.dtype), ht


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    if not use_beta_sigmoid_in_kernel or not isinstance(beta, torch.Tensor):
        return beta
    return _f32(beta).sigmoid() * (2.0 if allow_neg_eigval else 1.0)


def _gdn_gate(g, use_gate_in_kernel, A_log, dt_bias):
    """the log gate: `g` itself, or with `use_gate_in_kernel` fla's `-exp(A_log) * softplus(g + dt_bias)` in fp32."""
    if not use_gate_in_kernel or not isinstance(g, torch.Tensor):
        return g
    if A_log is None:
        raise ValueError("`A_log` [HV] is required with `use_gate_in_kernel=True`")
    x = _f32(g) + (dt_bias.to(_f32(g).dtype) if dt_bias is not None else 0.0)
    return -A_log.to(x.dtype).exp() * torch.nn.functional.softplus(x)


DELTA_NOTE = ("The recurrence is unstable when keys are not normalised (the state update I - beta k k^T has an "
              "eigenvalue 1 - beta |k|^2): pass L2-normalised keys or `use_qk_l2norm_in_kernel=True`, as with fla.")


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
):
    r"""
    DeltaNet in the chunked (WY) form: `h_t = h_{t-1} + k_t (beta_t (v_t - h_{t-1}^T k_t))^T`, `o_t = scale * h_t^T q_t`.
    Unlike fla 0.6.0, fp32 inputs are accepted (on the tilelang backend with K <= 128; wider fp32 keys go to the
    torch backend, and `backend="tilelang"` refuses them). The tilelang backend runs the chunked WY kernels of
    `fla_tl.kernels.delta_rule` (chunks of 64 tokens whatever `chunk_size`; the result does not depend on it).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`. beta (torch.Tensor): `[B, T, H]`.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. output_final_state (bool): Default: `False`.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k first. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. cu_seqlens_cpu: accepted, unused.
        kwargs: `chunk_size` in {16, 32, 64} (accepted; the torch form uses 64); `head_first` raises.

    Returns:
        o `[B, T, H, V]` in q's dtype; the final state `[N, H, K, V]` in float32, or `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, v = torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64)
        >>> k = F.normalize(torch.randn(2, 300, 4, 64), dim=-1)
        >>> beta = torch.rand(2, 300, 4)
        >>> o, ht = chunk_delta_rule(q, k, v, beta, output_final_state=True)
        >>> q, k, v, beta = (x.flatten(0, 1)[None] for x in (q, k, v, beta))
        >>> o, ht = chunk_delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 100, 600]), output_final_state=True)

    {note}
    """
    _delta_chunk_size("chunk_delta_rule", kwargs)
    if kwargs:
        raise TypeError(f"chunk_delta_rule() got unexpected keyword arguments {sorted(kwargs)}")
    return _delta_run(_delta_specs["chunk_delta_rule"], q, k, v, beta, None, scale, initial_state,
                      output_final_state, False, cu_seqlens, use_qk_l2norm_in_kernel, backend)


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    DeltaNet token by token; same math and returns as :func:`chunk_delta_rule`; `beta=None` means ones (as fla).

    Examples::
        >>> q, v = torch.randn(2, 64, 4, 32), torch.randn(2, 64, 4, 32)
        >>> k = torch.nn.functional.normalize(torch.randn(2, 64, 4, 32), dim=-1)
        >>> o, ht = fused_recurrent_delta_rule(q, k, v, torch.rand(2, 64, 4), output_final_state=True)
    """
    if beta is None and isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor) and v.dim() == 4:
        beta = torch.ones(v.shape[:3], dtype=v.dtype, device=v.device)
    return _delta_run(_delta_specs["fused_recurrent_delta_rule"], q, k, v, beta, None, scale, initial_state,
                      output_final_state, False, cu_seqlens, use_qk_l2norm_in_kernel, backend)


def fused_chunk_delta_rule(**kwargs):
    """fla 0.6.0's stub raises; so does fla_tl (registered with that refusal): use :func:`chunk_delta_rule`."""
    raise NotImplementedError("fused_chunk_delta_rule is deprecated. Please use chunk_delta_rule instead.")


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    cp_context=None,
    backend: str | None = None,
    **kwargs,
):
    r"""
    Gated DeltaNet in the chunked (WY) form: `h <- exp(g_t) h`, then the delta update, per value head; grouped value
    heads (HV a multiple of H: value head j reads key head j // (HV / H)). The tilelang backend runs the chunked WY
    kernels of `fla_tl.kernels.delta_rule` (chunks of 64 tokens whatever `chunk_size`); it takes fp32 inputs with
    K <= 128 (wider fp32 keys go to the torch backend).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, HV, V]`.
        g (torch.Tensor): log gates `[B, T, HV]` (raw inputs with `use_gate_in_kernel=True`, see kwargs).
        beta (torch.Tensor): `[B, T, HV]` (logits with `use_beta_sigmoid_in_kernel=True`).
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`).
        output_final_state (bool): Default: `False`.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k first. Default: `False`.
        use_beta_sigmoid_in_kernel (bool): apply `sigmoid` to beta (times 2 with `allow_neg_eigval`). Default: `False`.
        allow_neg_eigval (bool): see above. Default: `False`.
        state_v_first (bool): states laid out `[N, HV, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. cu_seqlens_cpu, chunk_indices: accepted,
            unused. cp_context: context parallelism is not supported (raises).
        kwargs: `chunk_size` in {16, 32, 64}; `use_gate_in_kernel` with `A_log` `[HV]` and `dt_bias` `[HV]` (the gate
            becomes `-exp(A_log) * softplus(g + dt_bias)`); the deprecated `transpose_state_layout`; `head_first`
            raises.

    Returns:
        o `[B, T, HV, V]` in q's dtype; the final state in float32, or `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k = torch.randn(2, 300, 2, 64), torch.randn(2, 300, 2, 64)
        >>> v, g, beta = torch.randn(2, 300, 4, 64), F.logsigmoid(torch.randn(2, 300, 4)), torch.rand(2, 300, 4)
        >>> o, ht = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
        >>> q, k, v, g, beta = (x.flatten(0, 1)[None] for x in (q, k, v, g, beta))
        >>> o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
        ...                               cu_seqlens=torch.tensor([0, 100, 600]))
    """
    if cp_context is not None:
        raise NotImplementedError("chunk_gated_delta_rule: context parallelism (cp_context) is not supported by fla_tl")
    use_gate_in_kernel = kwargs.pop("use_gate_in_kernel", False)
    A_log, dt_bias = kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    _delta_chunk_size("chunk_gated_delta_rule", kwargs)
    state_v_first = _pop_state_layout("chunk_gated_delta_rule", state_v_first, kwargs)
    return _delta_run(_delta_specs["chunk_gated_delta_rule"], q, k, v, _beta(beta, use_beta_sigmoid_in_kernel,
                      allow_neg_eigval), _gdn_gate(g, use_gate_in_kernel, A_log, dt_bias), scale, initial_state,
                      output_final_state, state_v_first, cu_seqlens, use_qk_l2norm_in_kernel, backend)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
):
    r"""
    Gated DeltaNet token by token; same math, arguments and returns as :func:`chunk_gated_delta_rule` (`g=None`: no
    gate; `beta=None`: ones). Unlike fla 0.6.0 it has a backward. The per-key and per-value gates `gk`, `gv` are not
    supported yet (raise).

    Examples::
        >>> q, k = torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32)
        >>> v, g, beta = torch.randn(2, 64, 4, 32), torch.randn(2, 64, 4).sigmoid().log(), torch.rand(2, 64, 4)
        >>> o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, use_qk_l2norm_in_kernel=True,
        ...                                          output_final_state=True)
    """
    if gk is not None or gv is not None:
        raise NotImplementedError("fused_recurrent_gated_delta_rule: `gk` / `gv` are not supported by fla_tl yet")
    state_v_first = _pop_state_layout("fused_recurrent_gated_delta_rule", state_v_first, kwargs)
    if beta is None and isinstance(v, torch.Tensor) and v.dim() == 4:
        beta = torch.ones(v.shape[:3], dtype=v.dtype, device=v.device)
    return _delta_run(_delta_specs["fused_recurrent_gated_delta_rule"], q, k, v,
                      _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval),
                      _gdn_gate(g, use_gate_in_kernel, A_log, dt_bias), scale, initial_state, output_final_state,
                      state_v_first, cu_seqlens, use_qk_l2norm_in_kernel, backend)


for _fn in (chunk_delta_rule, fused_recurrent_delta_rule, chunk_gated_delta_rule, fused_recurrent_gated_delta_rule):
    _fn.__doc__ = _fn.__doc__.replace("{note}", DELTA_NOTE) if "{note}" in _fn.__doc__ else _fn.__doc__ + "\n    " + \
        DELTA_NOTE + "\n"


def _delta_torch(q, k, v, beta, g, *, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                 use_qk_l2norm_in_kernel):
    return chunk_gated_delta_rule_torch(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state, state_v_first=state_v_first,
                                        cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def _delta_self_check(fn, gated, recurrent_opts):
    def run(device, dtype):
        torch.manual_seed(0)
        B, T, H, HV, K, V = 2, 70, 2, (4 if gated else 2), 16, 12
        q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
        k = torch.nn.functional.normalize(k, dim=-1)
        v = torch.randn(B, T, HV, V, device=device)
        beta = torch.rand(B, T, HV, device=device)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, device=device) + 2)
        h0 = torch.randn(B, HV, K, V, device=device)
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v, beta, g, h0)]
        ins = xs if gated else xs[:4] + xs[5:]
        args = (xs[0], xs[1], xs[2], xs[4], xs[3]) if gated and not recurrent_opts else None
        if gated and recurrent_opts:
            o, ht = fn(xs[0], xs[1], xs[2], xs[4], beta=xs[3], initial_state=xs[5], output_final_state=True,
                       backend="torch")
        elif gated:
            o, ht = fn(*args, initial_state=xs[5], output_final_state=True, backend="torch")
        else:
            o, ht = fn(xs[0], xs[1], xs[2], xs[3], initial_state=xs[5], output_final_state=True, backend="torch")
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        grads = torch.autograd.grad((o, ht), ins, (do, dht))
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        r = [x.detach().to(ref_dtype).requires_grad_() for x in xs]
        rins = r if gated else r[:4] + r[5:]
        ro, rht = recurrent_gated_delta_rule(r[0], r[1], r[2], r[3], r[4] if gated else None, initial_state=r[5],
                                             output_final_state=True)
        rgrads = torch.autograd.grad((ro, rht), rins, (do.to(ref_dtype), dht.to(ref_dtype)))
        names = ["o", "ht", "dq", "dk", "dv", "dbeta"] + (["dg"] if gated else []) + ["dh0"]
        return [(n, *compare(a, b, dtype)) for n, a, b in zip(names, (o, ht, *grads), (ro, rht, *rgrads))]

    return run


# the chunk kernels' largest key head dim for fp32 inputs (`kernels.common.chunk_delta_h`: one pipeline stage of fp32
# [64, K] query and key tiles beside the [K, 64] state gradient)
DELTA_TL_MAX_K_FP32 = 128


def make_delta_backend(mode: str) -> Backend:
    """the tilelang backend of the (gated) delta rule ops of `mode`: the chunked WY kernels (chunk) or the
    token-by-token ones (fused_recurrent) of `fla_tl.kernels.delta_rule`, forward and backward; grouped value heads,
    state_v_first, varlen."""
    caps = tilelang_capabilities(mode == "fused_recurrent", True)

    def fwd(q, k, v, beta, g, *, scale=None, **kwargs):
        from .kernels import delta_rule

        run = delta_rule.chunk_gated_delta_rule_tl if mode == "chunk" else delta_rule.fused_recurrent_gated_delta_rule_tl
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return run(q, k, v, beta, g, scale=scale, **kwargs)

    def verifier(inputs: OpInputs) -> list[str]:
        reasons = tilelang_verifier(caps, "fla_tl.kernels.delta_rule", inputs)
        if mode == "chunk" and inputs.dtype == torch.float32 and inputs.K > DELTA_TL_MAX_K_FP32:
            reasons.append(f"fp32 inputs take K <= {DELTA_TL_MAX_K_FP32} (the backward state pass's fp32 tiles of K = "
                           f"{inputs.K} overflow shared memory): use bf16 / fp16 inputs or backend='torch'")
        return reasons

    kind = "chunked WY" if mode == "chunk" else "token-by-token"
    return Backend(name="tilelang", capabilities=caps, verifier=verifier, fwd=fwd, bwd=None,
                   description=f"{kind} TileLang kernels")



DELTA_DROPPED = "fused_chunk_delta_rule is not provided (fla 0.6.0's is a stub that raises): use chunk_delta_rule"
_delta_specs = {}
for _name, _mode, _fn, _gated in (
    ("chunk_delta_rule", "chunk", chunk_delta_rule, False),
    ("fused_recurrent_delta_rule", "fused_recurrent", fused_recurrent_delta_rule, False),
    ("chunk_gated_delta_rule", "chunk", chunk_gated_delta_rule, True),
    ("fused_recurrent_gated_delta_rule", "fused_recurrent", fused_recurrent_gated_delta_rule, True),
):
    _delta_specs[_name] = _register_plain(
        _name, "gated_delta_rule" if _gated else "delta_rule", _mode, recurrent_gated_delta_rule, _delta_torch,
        self_check=_delta_self_check(_fn, _gated, _mode == "fused_recurrent"),
        tilelang_backend=make_delta_backend(_mode),
    )
    _delta_specs[_name].fn = _fn
_delta_specs["fused_chunk_delta_rule"] = register_op(OpSpec(
    name="fused_chunk_delta_rule", variant="delta_rule", mode="fused_chunk", reference=recurrent_gated_delta_rule,
    fn=fused_chunk_delta_rule,
))
register_backend("fused_chunk_delta_rule", make_refusing_backend("tilelang", tilelang_capabilities(), DELTA_DROPPED))
register_backend("fused_chunk_delta_rule", make_refusing_backend("torch", torch_capabilities(), DELTA_DROPPED))
_delta_specs["fused_chunk_delta_rule"].self_check = lambda device, dtype: []


# ---------------------------------------------------------------- titans (linear memory)

TITANS_TL_CHUNK_SIZES = (16, 32, 64)
TITANS_TL_MAX_D = 128


def _validate_titans(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state) -> None:
    """the checks of chunk_titans_linear, each error naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v), ("w", w), ("b", b), ("theta", theta), ("alpha", alpha),
                    ("eta", eta)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.device != q.device:
            raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {x.device}")
    if q.dim() != 4:
        raise ValueError(f"`q` must have shape [B, T, H, D], got {tuple(q.shape)}")
    B, T, H, D = q.shape
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"`{name}` must have the shape of `q` [B, T, H, D] = {list(q.shape)} (fla requires DK == "
                             f"DV), got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"`{name}` must have the dtype of `q` ({q.dtype}), got {x.dtype}")
    if D == 0:
        raise ValueError("`q` must have a head dim D > 0")
    for name, x in (("w", w), ("b", b)):
        if x.numel() != H * D:
            raise ValueError(f"`{name}` must have H * D = {H * D} elements ([H, D] = [{H}, {D}]), got shape "
                             f"{tuple(x.shape)}")
    for name, x in (("theta", theta), ("alpha", alpha), ("eta", eta)):
        if tuple(x.shape) not in ((B, T, H, 1), (B, T, H)):
            raise ValueError(f"`{name}` must have shape [B, T, H, 1] = {[B, T, H, 1]} (or [B, T, H]), got "
                             f"{tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"`eps` must be a positive number, got {eps!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise TypeError(f"`initial_state` must be a floating-point torch.Tensor [B, H, D, D], got "
                            f"{type(initial_state).__name__}")
        if tuple(initial_state.shape) != (B, H, D, D):
            raise ValueError(f"`initial_state` must have shape [B, H, D, D] = {[B, H, D, D]}, got "
                             f"{tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"`initial_state` must be on the device of `q` ({q.device}), got {initial_state.device}")


def _titans_backend(spec: OpSpec, q, initial_state, chunk_size: int, backend: str | None) -> Backend:
    """the backend of chunk_titans_linear; the TileLang kernels take chunk_size in TITANS_TL_CHUNK_SIZES only (an
    automatic choice then runs the torch backend, a requested tilelang raises)."""
    check_backend_name(spec, backend)
    D = q.shape[-1]
    cc = tuple(torch.cuda.get_device_capability(q.device)) if q.device.type == "cuda" else None
    inputs = OpInputs(device_type=q.device.type, dtype=q.dtype, K=D, V=D, compute_capability=cc, varlen=False,
                      initial_state=initial_state is not None, backward=torch.is_grad_enabled())
    if chunk_size not in TITANS_TL_CHUNK_SIZES:
        why = f"chunk_size = {chunk_size} is not one of the kernels' {TITANS_TL_CHUNK_SIZES}"
        if requested_backend(backend) == "tilelang":
            raise BackendError(f"{spec.name}: the requested backend ('tilelang') cannot run this input: {why}")
        chosen = select_backend(spec, inputs, "torch" if requested_backend(backend) == AUTO else backend)
        if chosen.name == "torch" and requested_backend(backend) == AUTO and q.device.type == "cuda":
            from .utils import log_once

            log_once(("titans chunk_size", chunk_size), f"fla_tl: {spec.name} runs the torch backend: {why}")
        return chosen
    return select_backend(spec, inputs, backend if backend != AUTO else None)


def chunk_titans_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
):
    r"""
    Titans with a linear memory (fla's `chunk_titans_linear`, in the `[B, T, H, D]` layout of its
    `chunk_titans_linear_ref`): per head, with the memory M and the momentum S (S_0 = 0),
    `S_t = eta_t S_{t-1} - 2 theta_t k_t^T vn_t`, `M_t = (1 - alpha_t) M_{t-1} + S_t`,
    `o_t = q_t M_t + LN(q_t M_t) w + b`, where vn_t is fla's layer-norm reconstruction gradient of (k_t, v_t) taken at
    the memory entering the token's chunk of `chunk_size` tokens (see `fla_tl.reference.titans`). Unlike fla 0.6.0
    (plain PyTorch) it has TileLang kernels: the forward, and the backward for bf16 / fp16 (D = 128 with chunk_size
    16, D = 64 with any); other cases take a PyTorch-recompute backward. Every input gets a gradient.

    Args:
        q, k, v (torch.Tensor): `[B, T, H, D]` (fla requires DK == DV).
        w, b (torch.Tensor): the layer-norm weight and bias `[H, D]` (any shape of H * D elements).
        theta, alpha, eta (torch.Tensor): per-token learning rate, memory decay and momentum `[B, T, H, 1]` (or
            `[B, T, H]`), already activated (alpha < 1, eta > 0).
        eps (float): the layer-norm epsilon. Default: `1e-6`.
        chunk_size (int): the tokens that share one gradient memory (part of the semantics). Default: `16`; the
            TileLang kernels take 16, 32 or 64 (others run the torch backend).
        initial_state (Optional[torch.Tensor]): the memory `[B, H, D, D]`. Default: `None` (zeros).
        output_final_state (bool): Default: `False`.
        backend (Optional[str]): `"tilelang"`, `"torch"` or None (automatic).

    Returns:
        o `[B, T, H, D]` in q's dtype (fla's reference returns float32); the final memory `[B, H, D, D]` in float32
        (float64 for float64 inputs), or `None`. For T not a multiple of `chunk_size` the final memory is the one after
        the last token (fla's reference pads the sequence and its final state includes the pad tokens' updates).

    Examples::
        >>> q, k, v = (torch.randn(2, 300, 4, 64) for _ in range(3))
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> w, b = torch.ones(4, 64), torch.zeros(4, 64)
        >>> theta, alpha, eta = torch.rand(2, 300, 4, 1) * 0.1, torch.rand(2, 300, 4, 1) * 0.1, torch.rand(2, 300, 4, 1)
        >>> o, ht = chunk_titans_linear(q, k, v, w, b, theta, alpha, eta, output_final_state=True)
    """
    _validate_titans(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state)
    spec = _titans_spec
    chosen = _titans_backend(spec, q, initial_state, chunk_size, backend)
    B, T, H, D = q.shape
    if T == 0:
        ht = None
        if output_final_state:
            ht_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            ht = (initial_state.to(ht_dtype, copy=True) if initial_state is not None
                  else q.new_zeros(B, H, D, D, dtype=ht_dtype))
        return q.new_empty(q.shape), ht
    o, ht = chosen.fwd(q, k, v, w, b, theta, alpha, eta, float(eps), chunk_size, initial_state, output_final_state)
    return o.to(q.dtype), ht


def _titans_self_check(device, dtype):
    torch.manual_seed(0)
    B, T, H, D = 2, 37, 2, 16
    q, k, v = (torch.randn(B, T, H, D, device=device) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    w, b = 1 + 0.1 * torch.randn(H, D, device=device), 0.1 * torch.randn(H, D, device=device)
    theta, alpha = 0.1 * torch.rand(B, T, H, 1, device=device), 0.2 * torch.rand(B, T, H, 1, device=device)
    eta, h0 = 0.5 + 0.5 * torch.rand(B, T, H, 1, device=device), 0.1 * torch.randn(B, H, D, D, device=device)
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v, w, b, theta, alpha, eta, h0)]
    o, ht = chunk_titans_linear(*xs[:8], chunk_size=16, initial_state=xs[8], output_final_state=True, backend="torch")
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o, ht), xs, (do, dht))
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    r = [x.detach().to(ref_dtype).requires_grad_() for x in xs]
    ro, rht = recurrent_titans_linear(*r[:8], chunk_size=16, initial_state=r[8], output_final_state=True)
    rgrads = torch.autograd.grad((ro, rht), r, (do.to(ref_dtype), dht.to(ref_dtype)))
    names = ("o", "ht", "dq", "dk", "dv", "dw", "db", "dtheta", "dalpha", "deta", "dh0")
    return [(n, *compare(x, y, dtype)) for n, x, y in zip(names, (o, ht, *grads), (ro, rht, *rgrads))]


def make_titans_backend() -> Backend:
    """the tilelang backend of chunk_titans_linear: `fla_tl.kernels.titans` (one block per sequence and head walks the
    chunks with the memory and momentum in registers; the backward walks them in reverse)."""
    caps = dataclasses.replace(tilelang_capabilities(), varlen=False, max_head_dim=TITANS_TL_MAX_D)

    def verifier(inputs: OpInputs) -> list[str]:
        reasons = tilelang_verifier(caps, "fla_tl.kernels.titans", inputs)
        if inputs.K % 16:
            reasons.append(f"D = {inputs.K} is not a multiple of 16")
        return reasons

    def fwd(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state, output_final_state):
        from .kernels.titans import chunk_titans_linear_tl

        return chunk_titans_linear_tl(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state,
                                      output_final_state)

    return Backend(name="tilelang", capabilities=caps, verifier=verifier, fwd=fwd, bwd=None,
                   description="the TileLang kernels")


def _titans_torch(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state, output_final_state):
    return chunk_titans_linear_torch(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state,
                                     output_final_state)


_titans_spec = _register_plain(
    "chunk_titans_linear", "titans", "chunk", recurrent_titans_linear, _titans_torch, varlen=False,
    self_check=_titans_self_check, tilelang_backend=make_titans_backend(),
)
_titans_spec.fn = chunk_titans_linear
# ---------------------------------------------------------------- rwkv6


def _validate_rwkv6(r, k, v, w, u, scale, initial_state, cu_seqlens) -> int:
    """the checks of the RWKV6 ops, naming fla's arguments (r for the query, w for the decay); returns N."""
    if w is None:
        raise TypeError("`w` must be a torch.Tensor [B, T, H, K] (the per-key log decays), got None")
    try:
        N = validate_linear_attention_inputs(r, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                             g=w, g_per_key=True)
    except (TypeError, ValueError) as e:
        message = str(e).replace("`q`", "`r`").replace("`g`", "`w`")
        raise type(e)(message) from None
    H, K = r.shape[2], r.shape[3]
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise TypeError(f"`u` must be a floating-point torch.Tensor [H, K], got "
                        f"{type(u).__name__ if not isinstance(u, torch.Tensor) else u.dtype}")
    if tuple(u.shape) != (H, K):
        raise ValueError(f"`u` must have shape [H, K] = {[H, K]}, got {tuple(u.shape)}")
    if u.device != r.device:
        raise ValueError(f"`u` must be on the device of `r` ({r.device}), got {u.device}")
    return N


def _rwkv6_run(spec, r, k, v, w, u, scale, initial_state, output_final_state, reverse, cu_seqlens, backend):
    N = _validate_rwkv6(r, k, v, w, u, scale, initial_state, cu_seqlens)
    B, T, H, K = r.shape
    V = v.shape[-1]
    chosen = _plain_backend(spec, r, K, V, backend, cu_seqlens, initial_state, gate=True)
    if scale is None:
        scale = K ** -0.5
    if T == 0:
        o = v.new_empty(B, 0, H, V)
        if not output_final_state:
            return o, None
        ht_dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
        if initial_state is not None:
            return o, initial_state.to(ht_dtype, copy=True)
        return o, r.new_zeros(N, H, K, V, dtype=ht_dtype)
    o, ht = chosen.fwd(r, k, v, w, u, scale=float(scale), initial_state=initial_state,
                       output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens)
    return o.to(r.dtype), (ht if output_final_state else None)


def _rwkv6_kwargs(name: str, kwargs: dict) -> None:
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", None)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1
                                   or chunk_size & (chunk_size - 1)):
        raise ValueError(f"`chunk_size` must be a power of 2, got {chunk_size}.")
    if kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(kwargs)}")


def chunk_rwkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    RWKV6 in the chunked form: `h_t = diag(exp(w_t)) h_{t-1} + k_t v_t^T`,
    `o_t = scale * (h_{t-1}^T r_t + (sum_k r_t[k] u[k] k_t[k]) v_t)`: GLA's state, read before the current token,
    plus a per-head bonus `u` for the current token.

    Args:
        r, k (torch.Tensor): receptance (query) and keys `[B, T, H, K]`. v (torch.Tensor): values `[B, T, H, V]`.
        w (torch.Tensor): per-key log decays `[B, T, H, K]` (any float dtype; gets a gradient).
        u (torch.Tensor): bonus `[H, K]` (gets a gradient).
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. Default: `None`.
        output_final_state (bool): Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. Default: `None`.
        cu_seqlens_cpu (Optional[torch.LongTensor]): accepted for fla compatibility and unused.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None` (the first that fits). Default: `None`.
        kwargs: `chunk_size` (a power of 2; accepted, the kernels use 64); `head_first` raises.

    Returns:
        o `[B, T, H, V]` in r's dtype; the final state `[N, H, K, V]` in float32 if `output_final_state`, else `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> r, k, v = (torch.randn(2, 500, 4, 64) for _ in range(3))
        >>> w, u = F.logsigmoid(torch.randn(2, 500, 4, 64)), torch.randn(4, 64)
        >>> o, ht = chunk_rwkv6(r, k, v, w, u, output_final_state=True)
        >>> r, k, v, w = (x.flatten(0, 1)[None] for x in (r, k, v, w))
        >>> o, ht = chunk_rwkv6(r, k, v, w, u, cu_seqlens=torch.tensor([0, 300, 1000]), output_final_state=True)
    """
    _rwkv6_kwargs("chunk_rwkv6", kwargs)
    return _rwkv6_run(_rwkv6_specs["chunk_rwkv6"], r, k, v, w, u, scale, initial_state, output_final_state, False,
                      cu_seqlens, backend)


def fused_recurrent_rwkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    RWKV6 token by token; same math, arguments and returns as :func:`chunk_rwkv6`, plus `reverse` (run the recurrence
    from the last token; each token reads the state of the tokens after it).

    Examples::
        >>> r, k, v = (torch.randn(1, 300, 4, 64) for _ in range(3))
        >>> w, u = torch.randn(1, 300, 4, 64).sigmoid().log(), torch.randn(4, 64)
        >>> o, ht = fused_recurrent_rwkv6(r, k, v, w, u, output_final_state=True, reverse=True)
        >>> o, _ = fused_recurrent_rwkv6(r, k, v, w, u, cu_seqlens=torch.tensor([0, 100, 300]))
    """
    return _rwkv6_run(_rwkv6_specs["fused_recurrent_rwkv6"], r, k, v, w, u, scale, initial_state,
                      output_final_state, bool(reverse), cu_seqlens, backend)


def _rwkv6_torch(r, k, v, w, u, *, scale, initial_state, output_final_state, reverse, cu_seqlens):
    return chunk_rwkv6_torch(r, k, v, w, u, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens)


def make_rwkv6_backend(mode: str) -> Backend:
    """the tilelang backend of chunk_rwkv6 / fused_recurrent_rwkv6: GLA's TileLang kernels of that mode with the
    queries shifted one token and the bonus added (`fla_tl.kernels.rwkv6`), forward and backward."""
    caps = tilelang_capabilities(recurrent=mode == "fused_recurrent")

    def fwd(r, k, v, w, u, *, scale, initial_state, output_final_state, reverse, cu_seqlens):
        from .kernels.rwkv6 import chunk_rwkv6_tl, fused_recurrent_rwkv6_tl

        if w.dtype == torch.float64:
            w = w.float()
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
        kw = {"scale": scale, "initial_state": initial_state, "output_final_state": output_final_state,
              "cu_seqlens": cu_seqlens}
        if mode == "chunk":
            return chunk_rwkv6_tl(r, k, v.to(r.dtype), w, u, **kw)
        return fused_recurrent_rwkv6_tl(r, k, v.to(r.dtype), w, u, reverse=reverse, **kw)

    return Backend(name="tilelang", capabilities=caps,
                   verifier=functools.partial(tilelang_verifier, caps, "fla_tl.kernels.rwkv6"), fwd=fwd, bwd=None,
                   description="GLA's TileLang kernels with a one-token query shift and the bonus")


def _rwkv6_self_check(fn, recurrent):
    def run(device, dtype):
        torch.manual_seed(0)
        # K = V = 64: on a GPU the kernels of a common head dim (compiled once, cached)
        B, T, H, K, V = 1, 101, 2, 64, 64
        cu = torch.tensor([0, 30, 30, 101], device=device)
        backend = "tilelang" if device.type == "cuda" else "torch"
        r, k, w = (torch.randn(B, T, H, K, device=device) for _ in range(3))
        v = torch.randn(B, T, H, V, device=device)
        w = torch.nn.functional.logsigmoid(w + 2)
        u, h0 = torch.randn(H, K, device=device), torch.randn(3, H, K, V, device=device)
        xs = [x.to(dtype).requires_grad_() for x in (r, k, v, w, u, h0)]
        extra = {"reverse": True} if recurrent else {}
        o, ht = fn(*xs[:5], initial_state=xs[5], output_final_state=True, cu_seqlens=cu, backend=backend, **extra)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        grads = torch.autograd.grad((o, ht), xs, (do, dht))
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rs = [x.detach().to(ref_dtype).requires_grad_() for x in xs]
        ro, rht = recurrent_rwkv6(*rs[:5], initial_state=rs[5], output_final_state=True, cu_seqlens=cu, **extra)
        rgrads = torch.autograd.grad((ro, rht), rs, (do.to(ref_dtype), dht.to(ref_dtype)))
        names = ("o", "ht", "dr", "dk", "dv", "dw", "du", "dh0")
        return [(n, *compare(a, b, dtype)) for n, a, b in zip(names, (o, ht, *grads), (ro, rht, *rgrads))]

    return run


_rwkv6_specs = {}
for _name, _mode, _fn in (("chunk_rwkv6", "chunk", chunk_rwkv6),
                          ("fused_recurrent_rwkv6", "fused_recurrent", fused_recurrent_rwkv6)):
    _rwkv6_specs[_name] = _register_plain(
        _name, "rwkv6", _mode, recurrent_rwkv6, _rwkv6_torch, recurrent=_mode == "fused_recurrent", gate=True,
        self_check=_rwkv6_self_check(_fn, _mode == "fused_recurrent"), tilelang_backend=make_rwkv6_backend(_mode),
    )
    _rwkv6_specs[_name].fn = _fn


# ---------------------------------------------------------------- gated slot attention (GSA) and ABC


GSA_MAX_SLOTS = 256


def _check_float(name: str, x, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor {layout}, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")


def _validate_gsa(q, k, v, s, g, scale, initial_state, cu_seqlens, grouped: bool) -> int:
    """the checks of the GSA / ABC ops (q may have HQ heads, a multiple of the H of k, v, s, g, with `grouped`);
    returns N."""
    # q, scale and cu_seqlens by the shared checks
    N = validate_linear_attention_inputs(q, q, q, scale=scale, cu_seqlens=cu_seqlens)
    B, T, HQ, K = q.shape
    for name, x, layout in (("k", k, "[B, T, H, K]"), ("v", v, "[B, T, H, V]"), ("s", s, "[B, T, H, M]")):
        _check_float(name, x, layout)
        if x.dtype != q.dtype:
            raise TypeError(f"`{name}` must have the dtype of `q` ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {x.device}")
        if x.dim() != 4 or x.shape[:2] != q.shape[:2]:
            raise ValueError(f"`{name}` must have shape {layout} with B, T = {B}, {T}, got {tuple(x.shape)}")
    H = k.shape[2]
    if k.shape[3] != K:
        raise ValueError(f"`k` must have the key dim K = {K} of `q`, got {tuple(k.shape)}")
    if grouped and (HQ < H or HQ % H):
        raise ValueError(f"`q` must have a number of heads HQ that is a multiple of the H = {H} of `k`, got HQ = {HQ}")
    if not grouped and HQ != H:
        raise ValueError(f"`k` must have the H = {HQ} heads of `q` (no grouped query heads here), got {H}")
    for name, x in (("v", v), ("s", s)):
        if x.shape[2] != H:
            raise ValueError(f"`{name}` must have the H = {H} heads of `k`, got {tuple(x.shape)}")
    V, M = v.shape[3], s.shape[3]
    if g is not None:
        _check_float("g", g, "[B, T, H, M]")
        if g.shape != s.shape:
            raise ValueError(f"`g` must have the shape of `s` {tuple(s.shape)} ([B, T, H, M]), got {tuple(g.shape)}")
        if g.device != q.device:
            raise ValueError(f"`g` must be on the device of `q` ({q.device}), got {g.device}")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError(f"`initial_state` must be a pair (hk [N, H, K, M], hv [N, H, M, V]), got "
                            f"{type(initial_state).__name__}")
        for name, x, want in (("initial_state[0]", initial_state[0], (N, H, K, M)),
                              ("initial_state[1]", initial_state[1], (N, H, M, V))):
            _check_float(name, x, str(list(want)))
            if tuple(x.shape) != want:
                raise ValueError(f"`{name}` must have shape {list(want)}, got {tuple(x.shape)}")
            if x.device != q.device:
                raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {x.device}")
    return N


def _gsa_empty(q, k, v, s, N, initial_state, output_final_state):
    """the result of a T = 0 input: an empty output and the initial (or zero) states."""
    B, _, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], s.shape[3]
    o = v.new_empty(B, 0, HQ, V)
    if not output_final_state:
        return o, None
    ht_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        return o, [x.to(ht_dtype, copy=True) for x in initial_state]
    return o, [q.new_zeros(N, H, K, M, dtype=ht_dtype), q.new_zeros(N, H, M, V, dtype=ht_dtype)]


def _gsa_run(spec, q, k, v, s, g, scale, initial_state, output_final_state, reverse, cu_seqlens, backend,
             grouped: bool):
    N = _validate_gsa(q, k, v, s, g, scale, initial_state, cu_seqlens, grouped)
    chosen = _plain_backend(spec, q, q.shape[-1], v.shape[-1], backend, cu_seqlens, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[1] == 0:
        return _gsa_empty(q, k, v, s, N, initial_state, output_final_state)
    o, ht = chosen.fwd(q, k, v, s, g, scale=float(scale), initial_state=initial_state,
                       output_final_state=bool(output_final_state), reverse=bool(reverse), cu_seqlens=cu_seqlens)
    return o.to(q.dtype), (list(ht) if output_final_state else None)


def _gsa_torch(q, k, v, s, g, *, scale, initial_state, output_final_state, reverse, cu_seqlens):
    return chunk_gsa_torch(q, k, v, s, g, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens)


def _gsa_tilelang(q, k, v, s, g, *, scale, initial_state, output_final_state, reverse, cu_seqlens):
    from .kernels.gsa import gsa_tl

    if s.shape[-1] > GSA_MAX_SLOTS:
        raise ValueError(f"`s`: the tilelang backend takes at most M = {GSA_MAX_SLOTS} slots, got {s.shape[-1]}")
    if g is None:
        # ABC's gates from the running normaliser of s (TileLang scans, `kernels/gsa/normaliser.py`)
        from .kernels.gsa.normaliser import slot_gates_tl

        s, g = slot_gates_tl(s, cu_seqlens, k.dtype)
    NG = q.shape[2] // k.shape[2]
    if NG > 1:
        k, v, s, g = (x.repeat_interleave(NG, dim=2) for x in (k, v, s, g))
        if initial_state is not None:
            initial_state = tuple(x.repeat_interleave(NG, dim=1) for x in initial_state)
    o, ht = gsa_tl(q, k, v, s, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   reverse=reverse, cu_seqlens=cu_seqlens)
    if NG > 1 and output_final_state:
        ht = [x[:, ::NG].contiguous() for x in ht]
    return o, ht


def make_gsa_backend(varlen: bool = True, recurrent: bool = False) -> Backend:
    """the tilelang backend of the GSA / ABC ops: two chunk_gla passes of `fla_tl.kernels.gsa` with PyTorch glue."""
    caps = dataclasses.replace(tilelang_capabilities(recurrent), varlen=varlen)
    return Backend(name="tilelang", capabilities=caps,
                   verifier=functools.partial(tilelang_verifier, caps, "fla_tl.kernels.gsa"), fwd=_gsa_tilelang,
                   bwd=None, description="chunk_gla's TileLang stages, softmax glue in PyTorch")


def _gsa_self_check(name: str):
    """a `check` of chunk_abc / chunk_gsa / fused_recurrent_gsa against the recurrence: o, both final states and
    every gradient (q, k, v, s, g, both initial states)."""

    def run(device, dtype):
        torch.manual_seed(0)
        abc, grouped = name == "chunk_abc", name == "chunk_gsa"
        B, T, H, K, V, M = 2, 70, 2, 16, 12, 8
        HQ = 2 * H if grouped else H
        q = torch.randn(B, T, HQ, K, device=device)
        k, v, s = (torch.randn(B, T, H, d, device=device) for d in (K, V, M))
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, M, device=device) + 2)
        hk0, hv0 = torch.randn(B, H, K, M, device=device), torch.randn(B, H, M, V, device=device)
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v, s, g, hk0, hv0)]
        if abc:
            del xs[4]
        backend = "tilelang" if device.type == "cuda" else "torch"
        if abc:
            o, ht = chunk_abc(*xs[:4], initial_state=(xs[4], xs[5]), output_final_state=True, backend=backend)
        else:
            fn = chunk_gsa if grouped else fused_recurrent_gsa
            o, ht = fn(*xs[:5], initial_state=(xs[5], xs[6]), output_final_state=True, backend=backend)
        douts = [torch.randn_like(o), torch.randn_like(ht[0]), torch.randn_like(ht[1])]
        grads = torch.autograd.grad((o, *ht), xs, douts)
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        r = [x.detach().to(ref_dtype).requires_grad_() for x in xs]
        if abc:
            ro, rht = recurrent_abc(*r[:4], initial_state=(r[4], r[5]), output_final_state=True)
        else:
            ro, rht = recurrent_gsa(*r[:5], initial_state=(r[5], r[6]), output_final_state=True)
        rgrads = torch.autograd.grad((ro, *rht), r, [d.to(ref_dtype) for d in douts])
        names = ["o", "hk", "hv", "dq", "dk", "dv", "ds"] + ([] if abc else ["dg"]) + ["dhk0", "dhv0"]
        return [(n, *compare(a, b, dtype)) for n, a, b in zip(names, (o, *ht, *grads), (ro, *rht, *rgrads))]

    return run


def chunk_abc(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    r"""
    ABC in chunks: keys to slots, a softmax over the M slots, slots to values, the slots' gates derived from the
    running normaliser `z = logcumsumexp(s)` of the slot logits (`s <- exp(s - z)`, `g_t = z_{t-1} - z_t`):
    GSA (:func:`chunk_gsa`) without `g`, at `scale = K ** -0.5`.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        s (torch.Tensor): slot logits `[B, T, H, M]`.
        initial_state (Optional[Tuple[torch.Tensor, torch.Tensor]]): `[B, H, K, M]` and `[B, H, M, V]` (both get
            gradients). Default: `None`.
        output_final_state (bool): Default: `False`.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None`. Default: `None`.

    Returns:
        o `[B, T, H, V]` in q's dtype; the final states `(hk [B, H, K, M], hv [B, H, M, V])` in float32 if
        `output_final_state`, else `None`.

    Examples::
        >>> q, k, v, s = (torch.randn(2, 500, 4, d) for d in (64, 64, 64, 32))
        >>> o, (hk, hv) = chunk_abc(q, k, v, s, output_final_state=True)
    """
    o, ht = _gsa_run(_gsa_specs["chunk_abc"], q, k, v, s, None, None, initial_state, output_final_state, False,
                     None, backend, grouped=False)
    return o, (tuple(ht) if ht is not None else None)


def chunk_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    checkpoint_level: int = 2,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, list]:
    r"""
    Gated slot attention in chunks: `hk_t = hk_{t-1} diag(exp(g_t)) + k_t s_t^T`, `p_t = softmax(scale hk_t^T q_t)`,
    `hv_t = diag(exp(g_t)) hv_{t-1} + s_t v_t^T`, `o_t = hv_t^T p_t`.

    Args:
        q (torch.Tensor): `[B, T, HQ, K]`; HQ a multiple of H (grouped query heads).
        k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`. s (torch.Tensor): slots `[B, T, H, M]`.
        g (Optional[torch.Tensor]): slot log forget gates `[B, T, H, M]`; `None` is ABC (gates from the running
            normaliser of `s`). Default: `None`.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[Tuple[torch.Tensor, torch.Tensor]]): `[N, H, K, M]` and `[N, H, M, V]`.
        output_final_state (bool): Default: `False`.
        checkpoint_level (int): 0, 1 or 2, accepted for fla compatibility (the backward always recomputes the
            states). Default: `2`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. Default: `None`.
        cu_seqlens_cpu (Optional[torch.LongTensor]): accepted for fla compatibility and unused.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None`. Default: `None`.

    Returns:
        o `[B, T, HQ, V]` in q's dtype and `[hk [N, H, K, M], hv [N, H, M, V]]` in float32 (`[None, None]` without
        `output_final_state`).

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k, v, s = (torch.randn(2, 500, 4, d) for d in (64, 64, 64, 32))
        >>> g = F.logsigmoid(torch.randn(2, 500, 4, 32))
        >>> o, (hk, hv) = chunk_gsa(q, k, v, s, g, output_final_state=True)
        >>> q, k, v, s, g = (x.flatten(0, 1)[None] for x in (q, k, v, s, g))
        >>> o, (hk, hv) = chunk_gsa(q, k, v, s, g, output_final_state=True, cu_seqlens=torch.tensor([0, 300, 1000]))
    """
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", None)
    if chunk_size is not None and (chunk_size <= 0 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"`chunk_size` must be a power of 2, got {chunk_size}.")
    if checkpoint_level not in (0, 1, 2):
        raise ValueError(f"`checkpoint_level` must be 0, 1 or 2, got {checkpoint_level}")
    o, ht = _gsa_run(_gsa_specs["chunk_gsa"], q, k, v, s, g, scale, initial_state, output_final_state, False,
                     cu_seqlens, backend, grouped=True)
    return o, (ht if ht is not None else [None, None])


def fused_recurrent_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, list]:
    r"""
    Gated slot attention token by token; the math and returns of :func:`chunk_gsa`, plus `reverse` (walk each
    sequence from its end). Grouped query heads (HQ a multiple of H) are accepted at any T (fla takes them only for
    single-token decoding). The tilelang backend runs the exact chunked passes.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k, v, s = (torch.randn(1, 500, 4, d) for d in (64, 64, 64, 32))
        >>> g = F.logsigmoid(torch.randn(1, 500, 4, 32))
        >>> o, (hk, hv) = fused_recurrent_gsa(q, k, v, s, g, output_final_state=True,
        ...                                   cu_seqlens=torch.tensor([0, 100, 500]))
    """
    o, ht = _gsa_run(_gsa_specs["fused_recurrent_gsa"], q, k, v, s, g, scale, initial_state, output_final_state,
                     reverse, cu_seqlens, backend, grouped=True)
    return o, (ht if ht is not None else [None, None])


def _abc_torch(q, k, v, s, g, *, scale, initial_state, output_final_state, reverse, cu_seqlens):
    return chunk_abc_torch(q, k, v, s, initial_state=initial_state, output_final_state=output_final_state)


_gsa_specs = {}
for _name, _variant, _mode, _fn, _ref, _torch_fn, _varlen in (
    ("chunk_abc", "abc", "chunk", chunk_abc, recurrent_abc, _abc_torch, False),
    ("chunk_gsa", "gsa", "chunk", chunk_gsa, recurrent_gsa, _gsa_torch, True),
    ("fused_recurrent_gsa", "gsa", "fused_recurrent", fused_recurrent_gsa, recurrent_gsa, _gsa_torch, True),
):
    _gsa_specs[_name] = _register_plain(
        _name, _variant, _mode, _ref, _torch_fn, recurrent=_mode == "fused_recurrent", varlen=_varlen,
        self_check=_gsa_self_check(_name),
        tilelang_backend=make_gsa_backend(_varlen, recurrent=_mode == "fused_recurrent"),
    )
    _gsa_specs[_name].fn = _fn
