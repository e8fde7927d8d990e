"""The public ops (fla 0.6.0 signatures plus `backend=`) and their registrations.

Backends, preferred first: `tilelang` (the TileLang kernels of `fla_tl.kernels`, CUDA, sm_90+) and `torch` (the
chunked pure-PyTorch form of `fla_tl.reference`, any device). Pick one with `backend=` or `FLA_TL_BACKEND`;
see `fla_tl.registry` for the rules and `python -m fla_tl list` for the table.
"""

import functools
import warnings

import torch

from .reference.retention import chunk_retention_torch, recurrent_retention
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
    register_op,
)
from .utils import validate_linear_attention_inputs

__all__ = [
    "chunk_retention",
    "fused_chunk_retention",
    "fused_recurrent_retention",
    "list_ops",
    "BackendError",
]

MAX_HEAD_DIM = 256
TILELANG_MODULES = {"retention": "fla_tl.kernels.retention"}


def tilelang_capabilities(recurrent: bool = False) -> Capabilities:
    return Capabilities(
        devices=("cuda",),
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        max_head_dim=MAX_HEAD_DIM,
        min_compute_capability=(9, 0),
        reverse=recurrent,
        state_v_first=recurrent,
    )


def torch_capabilities(recurrent: bool = False) -> Capabilities:
    return Capabilities(
        devices=None,
        dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64),
        reverse=recurrent,
        state_v_first=recurrent,
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


def _tilelang_launchers(module: str, op: str):
    mod = __import__(module, fromlist=[f"{op}_fwd", f"{op}_bwd"])
    return getattr(mod, f"{op}_fwd"), getattr(mod, f"{op}_bwd")


def _prepare_tilelang(q, k, v, initial_state, cu_seqlens):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
    return q, k, v, initial_state, cu_seqlens


def make_tilelang_backend(op: str, variant: str, recurrent: bool) -> Backend:
    """the tilelang backend of `op`: launchers `<op>_fwd` / `<op>_bwd` of `fla_tl.kernels.<variant>`."""
    module = TILELANG_MODULES[variant]
    caps = tilelang_capabilities(recurrent)

    def fwd(q, k, v, initial_state, cu_seqlens, *, scale, output_final_state, reverse, state_v_first):
        launch_fwd, _ = _tilelang_launchers(module, op)
        q, k, v, initial_state, cu_seqlens = _prepare_tilelang(q, k, v, initial_state, cu_seqlens)
        extra = {"reverse": reverse, "state_v_first": state_v_first} if recurrent else {}
        return launch_fwd(
            q,
            k,
            v,
            scale=float(scale),
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            **extra,
        )

    def bwd(q, k, v, do, dht, initial_state, cu_seqlens, *, scale, reverse, state_v_first):
        _, launch_bwd = _tilelang_launchers(module, op)
        q, k, v, initial_state, cu_seqlens = _prepare_tilelang(q, k, v, initial_state, cu_seqlens)
        extra = {"reverse": reverse, "state_v_first": state_v_first} if recurrent else {}
        return launch_bwd(
            q,
            k,
            v,
            do.contiguous(),
            dht.contiguous() if dht is not None else None,
            scale=float(scale),
            initial_state=initial_state,
            cu_seqlens=cu_seqlens,
            **extra,
        )

    return Backend(
        name="tilelang",
        capabilities=caps,
        verifier=functools.partial(tilelang_verifier, caps, module),
        fwd=fwd,
        bwd=bwd,
        description="the TileLang kernels",
    )


def make_torch_backend(chunk_fn, recurrent: bool) -> Backend:
    """the torch backend: `chunk_fn` (a chunked pure-PyTorch form) forward, autograd of a recompute backward."""
    caps = torch_capabilities(recurrent)

    def fwd(q, k, v, initial_state, cu_seqlens, *, scale, output_final_state, reverse, state_v_first):
        with torch.no_grad():
            o, ht = chunk_fn(
                q,
                k,
                v,
                scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state,
                reverse=reverse,
                state_v_first=state_v_first,
                cu_seqlens=cu_seqlens,
            )
        return o, ht

    def bwd(q, k, v, do, dht, initial_state, cu_seqlens, *, scale, reverse, state_v_first):
        # torch.func.vjp works below the autograd key, where a custom op's implementation runs
        primals = (q, k, v) if initial_state is None else (q, k, v, initial_state)

        def forward(q, k, v, h0=None):
            o, ht = chunk_fn(
                q,
                k,
                v,
                scale=scale,
                initial_state=h0,
                output_final_state=dht is not None,
                reverse=reverse,
                state_v_first=state_v_first,
                cu_seqlens=cu_seqlens,
            )
            return (o, ht) if dht is not None else (o,)

        outputs, vjp_fn = torch.func.vjp(forward, *primals)
        cotangents = (do.to(outputs[0].dtype),)
        if dht is not None:
            cotangents += (dht.to(outputs[1].dtype),)
        grads = [g.to(x.dtype) for x, g in zip(primals, vjp_fn(cotangents))]
        if initial_state is None:
            grads.append(None)
        return tuple(grads)

    return Backend(
        name="torch",
        capabilities=caps,
        verifier=functools.partial(torch_verifier, caps),
        fwd=fwd,
        bwd=bwd,
        description="the pure-PyTorch path",
    )


def _register(name: str, variant: str, mode: str, reference, chunk_fn, recurrent: bool = False):
    spec = register_op(OpSpec(name=name, variant=variant, mode=mode, reference=reference))
    register_backend(name, make_tilelang_backend(name, variant, recurrent))
    register_backend(name, make_torch_backend(chunk_fn, recurrent))
    return spec, define_linear_attention_ops(name)


_chunk_spec, (_chunk_retention_fwd, _) = _register(
    "chunk_retention", "retention", "chunk", recurrent_retention, chunk_retention_torch
)
_fused_chunk_spec, (_fused_chunk_retention_fwd, _) = _register(
    "fused_chunk_retention", "retention", "fused_chunk", recurrent_retention, chunk_retention_torch
)
_fused_recurrent_spec, (_fused_recurrent_retention_fwd, _) = _register(
    "fused_recurrent_retention", "retention", "fused_recurrent", recurrent_retention, chunk_retention_torch,
    recurrent=True,
)


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
        x is not None and x.requires_grad for x in (q, k, v, initial_state)
    )
    o, ht = fwd_op(
        q,
        k,
        v,
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
