"""The delta-rule family's public ops: DeltaNet (`chunk_delta_rule`, `fused_recurrent_delta_rule`) and Gated DeltaNet
(`chunk_gated_delta_rule`, `fused_recurrent_gated_delta_rule`) on one kernel-level call each, with grouped value heads
(v, beta, g and the states have HV heads, a multiple of the H of q and k); `fused_chunk_delta_rule` is registered with
fla 0.6.0's refusal.

The kernel-level call (`SCHEMA`): q, k `[B, T, H, K]`, v `[B, T, HV, V]`, beta `[B, T, HV]` (already activated: the
public functions apply `use_beta_sigmoid_in_kernel` and `use_gate_in_kernel` in PyTorch first), an optional log gate
g `[B, T, HV]`, the initial state, cu_seqlens and the options; it returns (o `[B, T, HV, V]` in q's dtype, the final
state in fp32, fp64 for fp64 inputs, or None). The tilelang backends keep residuals for their backward: the chunked
WY form the inverse Ai, the token-by-token one w (only when gradients are needed) and the final state (gated op).
"""

import dataclasses

import torch

from ...autotune.configs import (
    BT,
    DELTA_MAX_K_FP32,
    KERNELS,
    delta_pass_configs,
    delta_pass_launches,
)
from ...reference.delta_rule import chunk_gated_delta_rule_torch, recurrent_gated_delta_rule
from ...reference.kda import chunk_kda_torch
from ...registry import (
    Backend,
    KernelSpec,
    OpSpec,
    describe_inputs,
    refusing_backend,
    register,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case, reference_dtype
from ...utils import check_device, check_tensor, use_host_copy, validate_linear_attention_inputs
from ..common.state_op import empty_run, pop_state_layout

SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, Tensor? cu_seqlens, "
          "float scale, bool output_final_state, bool state_v_first, bool use_qk_l2norm_in_kernel")
GRADS = ("q", "k", "v", "beta", "g", "initial_state")
MODULES = {
    "chunk": "fla_tl.kernels.delta_rule.chunk",
    "fused_recurrent": "fla_tl.kernels.delta_rule.fused_recurrent",
}
DELTA_DROPPED = "fused_chunk_delta_rule is not provided (fla 0.6.0's is a stub that raises): use chunk_delta_rule"
DELTA_NOTE = ("The recurrence is unstable when keys are not normalised (the state update I - beta k k^T has an "
              "eigenvalue 1 - beta |k|^2): pass L2-normalised keys or `use_qk_l2norm_in_kernel=True`, as with fla.")


def _with_note(fn):
    """a public function with DELTA_NOTE at the end of its docstring."""
    fn.__doc__ = fn.__doc__.rstrip() + "\n\n    " + DELTA_NOTE + "\n"
    return fn


# ---------------------------------------------------------------------------------------------- validation


def _validate_delta(q, k, v, beta, g, initial_state, cu_seqlens, state_v_first, scale=None, per_key_gate=False) -> int:
    """the checks of the delta-rule ops (grouped value heads: v, beta, g and the state have HV heads, a multiple of
    the H of q and k; `per_key_gate`: g is `[B, T, HV, K]`, KDA's); returns N."""
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
        raise ValueError(f"`v` must have a number of heads HV divisible by H = {H} (grouped value heads), "
                         f"got HV = {HV}")
    for name, x, want, dims in (("beta", beta, (B, T, HV), "[B, T, HV]"),
                                ("g", g, (B, T, HV, K) if per_key_gate else (B, T, HV),
                                 "[B, T, HV, K]" if per_key_gate else "[B, T, HV]")):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor {dims}, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if tuple(x.shape) != want:
            raise ValueError(f"`{name}` must have shape {dims} = {list(want)}, got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {x.device}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_device("initial_state", initial_state, q.device)
        want = (N, HV, V, K) if state_v_first else (N, HV, K, V)
        if tuple(initial_state.shape) != want:
            layout = "[N, HV, V, K]" if state_v_first else "[N, HV, K, V]"
            raise ValueError(f"`initial_state` must have shape {layout} = {list(want)}, got "
                             f"{tuple(initial_state.shape)}")
    return N


def _delta_chunk_size(name: str, kwargs: dict) -> None:
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", 64)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"`chunk_size` must be 16, 32, or 64, got {chunk_size}.")


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


# ---------------------------------------------------------------------------------------------- backends


def _sequences(args: dict) -> int:
    q, h0, cu = args["q"], args["initial_state"], args["cu_seqlens"]
    return h0.shape[0] if h0 is not None else (cu.shape[0] - 1 if cu is not None else q.shape[0])


def _fake(args: dict) -> list:
    q, v = args["q"], args["v"]
    B, T, _, K = q.shape
    HV, V = v.shape[2:]
    o = q.new_empty(B, T, HV, V)
    if not args["output_final_state"]:
        return [o, None]
    shape = (_sequences(args), HV, V, K) if args["state_v_first"] else (_sequences(args), HV, K, V)
    return [o, q.new_empty(shape, dtype=reference_dtype(q.dtype))]


def _describe(args: dict, backward: bool):
    # as the verifiers always saw these ops: no gate and no state layout in the description (both backends take them)
    return describe_inputs(args["q"], args["v"], args["initial_state"], args["cu_seqlens"], backward)


def _chunk_reasons(inputs) -> list[str]:
    if inputs.dtype == torch.float32 and inputs.K > DELTA_MAX_K_FP32:
        return [f"fp32 inputs take K <= {DELTA_MAX_K_FP32} (the backward state pass's fp32 tiles of K = "
                f"{inputs.K} overflow shared memory): use bf16 / fp16 inputs or backend='torch'"]
    return []


def _kernel_options(args: dict) -> dict:
    return dict(scale=float(args["scale"]), initial_state=args["initial_state"],
                state_v_first=args["state_v_first"], cu_seqlens=args["cu_seqlens"],
                use_qk_l2norm_in_kernel=args["use_qk_l2norm_in_kernel"])


def _grads(found) -> dict:
    return dict(zip(GRADS, found))


def _chunk_backend() -> Backend:
    """the chunked WY kernels (`chunk.py`); the WY inverse Ai is the backward's residual."""

    def fwd(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, state_v_first,
            use_qk_l2norm_in_kernel, requires_grad):
        from .chunk import chunk_gated_delta_rule_fwd

        o, ht, ai = chunk_gated_delta_rule_fwd(
            q, k, v, beta, g, scale=float(scale), initial_state=initial_state, output_final_state=output_final_state,
            state_v_first=state_v_first, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            requires_grad=requires_grad)
        return (o, ht, ai) if requires_grad else (o, ht)

    def bwd(args, outputs, grads):
        from .chunk import chunk_gated_delta_rule_bwd

        do, dht = grads
        return _grads(chunk_gated_delta_rule_bwd(args["q"], args["k"], args["v"], args["beta"], args["g"], outputs[2],
                                                 do, dht, **_kernel_options(args)))

    def residuals(args, requires_grad):
        q, v = args["q"], args["v"]
        B, T = q.shape[:2]
        return [q.new_empty(B * T, v.shape[2], BT)] if requires_grad else []

    return Backend(name="tilelang", capabilities=tilelang_capabilities(state_v_first=True), fwd=fwd, bwd=bwd,
                   residuals=residuals, module=MODULES["chunk"], extra_reasons=_chunk_reasons,
                   description="chunked WY TileLang kernels")


def _fused_recurrent_backend(grads: tuple[str, ...] = GRADS, options=_kernel_options) -> Backend:
    """the token-by-token kernels (`fused_recurrent.py`); w is the backward's residual (and, for the gate's gradient,
    the final state: a saved output of the gated op). `grads` names the backward's gradients and `options(args)` gives
    the entry points' keyword options (KDA's add its gate activation)."""

    def fwd(q, k, v, beta, g, output_final_state, requires_grad, **args):
        from .fused_recurrent import fused_recurrent_gated_delta_rule_fwd

        o, ht, w = fused_recurrent_gated_delta_rule_fwd(q, k, v, beta, g, output_final_state=output_final_state,
                                                        requires_grad=requires_grad, **options(args))
        return (o, ht, w) if requires_grad else (o, ht)

    def bwd(args, outputs, found):
        from .fused_recurrent import fused_recurrent_gated_delta_rule_bwd

        do, dht = found
        # the final state (an empty placeholder when absent or not saved) enters only dg's <dht, ht> term
        ht = outputs[1] if outputs[1].numel() else None
        return dict(zip(grads, fused_recurrent_gated_delta_rule_bwd(
            args["q"], args["k"], args["v"], args["beta"], args["g"], outputs[2], ht, do, dht, **options(args))))

    def residuals(args, requires_grad):
        q, v = args["q"], args["v"]
        B, T = q.shape[:2]
        return [q.new_empty(B * T, *v.shape[2:], dtype=torch.float32)] if requires_grad else []

    return Backend(name="tilelang", capabilities=tilelang_capabilities(reverse=True, state_v_first=True), fwd=fwd,
                   bwd=bwd, residuals=residuals, module=MODULES["fused_recurrent"],
                   description="token-by-token TileLang kernels")


def _delta_torch(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, state_v_first,
                 use_qk_l2norm_in_kernel):
    # a per-key gate `[B, T, HV, K]` (`gk`) takes KDA's chunked form
    form = chunk_kda_form if g is not None and g.dim() == 4 else chunk_gated_delta_rule_torch
    o, ht = form(q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                 state_v_first=state_v_first, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return o.to(q.dtype), (ht.to(reference_dtype(q.dtype)) if ht is not None else None)


def chunk_kda_form(q, k, v, beta, g, **options):
    """KDA's chunked form (`fla_tl.reference.kda`) in the delta rules' argument order (beta before g)."""
    return chunk_kda_torch(q, k, v, g, beta, **options)


def _per_key_gate(g, gk, gv, q, v):
    """the log gate of `fused_recurrent_gated_delta_rule`: `g` `[B, T, HV]` alone, or with a per-key `gk`
    `[B, T, HV, K]` their sum per key channel (decays multiply, as fla applies both); `gv` raises."""
    if gv is not None:
        raise NotImplementedError("fused_recurrent_gated_delta_rule: the per-value gate `gv` is not supported by "
                                  "fla_tl")
    if gk is None:
        return g
    check_tensor("gk", gk)
    if isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor) and q.dim() == v.dim() == 4:
        want = (*v.shape[:3], q.shape[-1])
        if tuple(gk.shape) != want:
            raise ValueError(f"`gk` must have shape [B, T, HV, K] = {list(want)}, got {tuple(gk.shape)}")
    if g is None:
        return gk
    check_tensor("g", g)
    if tuple(g.shape) != tuple(gk.shape[:3]):
        raise ValueError(f"`g` must have shape [B, T, HV] = {list(gk.shape[:3])} (that of `gk` without K), got "
                         f"{tuple(g.shape)}")
    return _f32(gk) + _f32(g)[..., None]


# ---------------------------------------------------------------------------------------------- kernel lists


def _chunk_kernels(D: int, dtype: str, gates: tuple[str, ...]) -> list[KernelSpec]:
    """the kernels the chunk launchers (`chunk.py`) launch at K = V = D: the gate's cumulative sum, the WY stages, the
    fused forward (where it fits) and the chunk-parallel forward, the state passes at every pass config, the output
    stage, the dq / dk / dw pass and the gate gradient's scan."""
    from ..common.state_op import stage_spec

    if dtype == "float32" and D > DELTA_MAX_K_FP32:
        return []
    # the fused forward holds q, k, w tiles in shared memory: K <= 128 (fp32: K <= 64)
    fused = delta_pass_launches("fused")(D, D, dtype)
    specs = []
    for gate in gates:
        if gate == "g":
            specs.append(stage_spec("gate_cumsum", 0, 0, dtype, "none", g_dtype="float32", BT=BT))
        for pair in ((True, False) if fused else (False,)):
            specs.append(stage_spec("wy_fwd", D, D, dtype, gate, pair=pair))
        # every default the grid can pick (`delta_pass_heuristic`: the large- and the small-grid configs)
        for config in map(dataclasses.asdict, delta_pass_configs(D, D, dtype, gate)):
            passes = (("fused_chunk_delta_fwd",) if fused else ()) + ("chunk_delta_fwd_h", "chunk_delta_bwd_dhu")
            specs += [stage_spec(name, D, D, dtype, gate, config) for name in passes]
        specs.append(stage_spec("chunk_fwd_o", D, D, dtype, gate))
        specs += [stage_spec("chunk_delta_bwd_dqkw", D, D, dtype, gate), stage_spec("wy_bwd", D, D, dtype, gate)]
        if gate == "g":
            specs.append(stage_spec("gate_grad_chunk_scan", 0, 0, dtype, "none", out_dtype="float32", BT=BT))
    return specs


def _fused_recurrent_kernels(D: int, dtype: str, gates: tuple[str, ...], layouts: tuple[bool, ...]) -> list[KernelSpec]:
    """the kernels the token-by-token launchers (`fused_recurrent.py`) launch at K = V = D: the forward and the two
    backward sweeps for each gate option and state layout, and the gate gradient's per-sequence scan."""
    from ..common.state_op import stage_spec

    specs = []
    for gate in gates:
        for state_v_first in layouts:
            specs.append(stage_spec("fused_recurrent_delta_fwd", D, D, dtype, gate, state_v_first=state_v_first))
            specs.append(stage_spec("fused_recurrent_delta_bwd", D, D, dtype, gate, state_v_first=state_v_first))
            specs += [stage_spec("fused_recurrent_delta_bwd", D, D, dtype, gate, factory=companion,
                                 state_v_first=state_v_first)
                      for companion in KERNELS["fused_recurrent_delta_bwd"].companions]
        if gate == "g":
            # `common.cumsum._sequence_scan` of a forward recurrence: a reverse scan
            specs.append(stage_spec("gate_grad_scan", 0, 0, dtype, "none", reverse=True, out_dtype="float32", BT=BT))
    return specs


# ---------------------------------------------------------------------------------------------- check cases


def _delta_cases(gated: bool, recurrent: bool):
    """the `check` cases: dense with an initial state (grouped value heads for the gated ops), packed sequences (an
    empty and a one-token one; `state_v_first` for the gated ops), and raw keys with the in-kernel L2 norm."""

    def cases(device, dtype):
        H, HV, K, V = 2, (4 if gated else 2), 16, 12
        found = []
        layout = {"state_v_first": True} if gated else {}
        for label, B, lens, options in (
            ("dense", 2, None, {}),
            (" ".join(["varlen", *layout]), 1, (30, 0, 39, 1), layout),
            ("l2norm raw keys", 2, None, {"use_qk_l2norm_in_kernel": True}),
        ):
            T = sum(lens) if lens else 70
            N = len(lens) if lens else B
            q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
            if not options.get("use_qk_l2norm_in_kernel"):
                k = torch.nn.functional.normalize(k, dim=-1)
            v = torch.randn(B, T, HV, V, device=device)
            beta = torch.rand(B, T, HV, device=device)
            g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, device=device) + 2)
            h0 = torch.randn((N, HV, V, K) if options.get("state_v_first") else (N, HV, K, V), device=device)
            args = dict(q=q, k=k, v=v, beta=beta, initial_state=h0, output_final_state=True, **options)
            if gated:
                args["g"] = g
            if lens:
                args["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
            args = {n: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                    for n, x in args.items()}
            grad = ("q", "k", "v", "beta", *(("g",) if gated else ()), "initial_state")
            found.append(Case(label, args, grad, recurrent_gated_delta_rule, dtype=dtype,
                              out_dtypes={"o": dtype, "ht": reference_dtype(dtype)}))
        return found

    return cases


# ---------------------------------------------------------------------------------------------- the specs


def _spec(name: str, mode: str, gated: bool) -> OpSpec:
    recurrent = mode == "fused_recurrent"
    gates = ("none", "g") if gated else ("none",)
    if recurrent:
        backends = [_fused_recurrent_backend()]
        layouts = (False, True) if gated else (False,)
        kernels = lambda D, dtype: _fused_recurrent_kernels(D, dtype, gates, layouts)  # noqa: E731
    else:
        backends = [_chunk_backend()]
        kernels = lambda D, dtype: _chunk_kernels(D, dtype, gates)  # noqa: E731
    backends.append(torch_backend(_delta_torch, torch_capabilities(reverse=recurrent)))
    return OpSpec(
        name=name, variant="gated_delta_rule" if gated else "delta_rule", mode=mode,
        reference=recurrent_gated_delta_rule, backends=backends, schema=SCHEMA, outputs=2, grads=GRADS,
        # the token-by-token backward takes the gate's gradient from the final state
        saved_outputs=(1,) if recurrent and gated else (), describe=_describe, fake=_fake, kernels=kernels,
        cases=_delta_cases(gated, recurrent),
    )


CHUNK = _spec("chunk_delta_rule", "chunk", gated=False)
FUSED_RECURRENT = _spec("fused_recurrent_delta_rule", "fused_recurrent", gated=False)
CHUNK_GATED = _spec("chunk_gated_delta_rule", "chunk", gated=True)
FUSED_RECURRENT_GATED = _spec("fused_recurrent_gated_delta_rule", "fused_recurrent", gated=True)
FUSED_CHUNK = OpSpec(
    name="fused_chunk_delta_rule", variant="delta_rule", mode="fused_chunk", reference=recurrent_gated_delta_rule,
    backends=[refusing_backend("tilelang", tilelang_capabilities(), DELTA_DROPPED),
              refusing_backend("torch", torch_capabilities(), DELTA_DROPPED)],
    kernels=lambda D, dtype: [],  # it launches none
)


def _delta_run(spec, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
               use_qk_l2norm_in_kernel, backend, per_key_gate=False, extra=None):
    """validate, then the kernel-level call of `spec` (`extra`: the arguments its schema adds to `SCHEMA`'s)."""
    N = _validate_delta(q, k, v, beta, g, initial_state, cu_seqlens, state_v_first, scale, per_key_gate)
    _, T, _, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    args = dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens,
                scale=float(scale), output_final_state=bool(output_final_state), state_v_first=bool(state_v_first),
                use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel), **(extra or {}))
    tensors = (q, k, v, beta, g, initial_state, *(x for x in (extra or {}).values() if isinstance(x, torch.Tensor)))
    if T == 0:
        HV, V = v.shape[2:]
        return empty_run(spec, args, tensors, backend, (N, HV, V, K) if state_v_first else (N, HV, K, V),
                         output_final_state)
    o, ht = spec.run(backend, **args)
    return o, (ht if output_final_state else None)


# ---------------------------------------------------------------------------------------------- the public ops


@register(CHUNK)
@_with_note
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
    DeltaNet in the chunked (WY) form: `h_t = h_{t-1} + k_t (beta_t (v_t - h_{t-1}^T k_t))^T`,
    `o_t = scale * h_t^T q_t`.
    Unlike fla 0.6.0, fp32 inputs are accepted (on the tilelang backend with K <= 128; wider fp32 keys go to the
    torch backend, and `backend="tilelang"` refuses them). The tilelang backend runs the chunked WY kernels of
    `fla_tl.kernels.delta_rule` (chunks of 64 tokens whatever `chunk_size`; the result does not depend on it).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`. beta (torch.Tensor): `[B, T, H]`.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. output_final_state (bool): Default: `False`.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k first. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. cu_seqlens_cpu: a CPU copy of it (no host
            sync then).
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.
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

    """
    _delta_chunk_size("chunk_delta_rule", kwargs)
    if kwargs:
        raise TypeError(f"chunk_delta_rule() got unexpected keyword arguments {sorted(kwargs)}")
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return _delta_run(CHUNK, q, k, v, beta, None, scale, initial_state, output_final_state, False, cu_seqlens,
                      use_qk_l2norm_in_kernel, backend)


@register(FUSED_RECURRENT)
@_with_note
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
    return _delta_run(FUSED_RECURRENT, q, k, v, beta, None, scale, initial_state, output_final_state, False,
                      cu_seqlens, use_qk_l2norm_in_kernel, backend)


@register(CHUNK_GATED)
@_with_note
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
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. cu_seqlens_cpu: a CPU copy of it (no host
            sync then). chunk_indices: accepted, unused. cp_context: context parallelism is not supported (raises).
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.
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
    state_v_first = pop_state_layout("chunk_gated_delta_rule", state_v_first, kwargs)
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return _delta_run(CHUNK_GATED, q, k, v, _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval),
                      _gdn_gate(g, use_gate_in_kernel, A_log, dt_bias), scale, initial_state, output_final_state,
                      state_v_first, cu_seqlens, use_qk_l2norm_in_kernel, backend)


@register(FUSED_RECURRENT_GATED)
@_with_note
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
    gate; `beta=None`: ones). Unlike fla 0.6.0 it has a backward. A per-key log gate `gk` `[B, T, HV, K]` decays each
    key row of the state on top of `g` (as fla; KDA's recurrence, every gradient); the per-value gate `gv` is not
    supported yet (raises).

    Examples::
        >>> q, k = torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32)
        >>> v, g, beta = torch.randn(2, 64, 4, 32), torch.randn(2, 64, 4).sigmoid().log(), torch.rand(2, 64, 4)
        >>> o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, use_qk_l2norm_in_kernel=True,
        ...                                          output_final_state=True)
    """
    state_v_first = pop_state_layout("fused_recurrent_gated_delta_rule", state_v_first, kwargs)
    if beta is None and isinstance(v, torch.Tensor) and v.dim() == 4:
        beta = torch.ones(v.shape[:3], dtype=v.dtype, device=v.device)
    g = _per_key_gate(_gdn_gate(g, use_gate_in_kernel, A_log, dt_bias), gk, gv, q, v)
    return _delta_run(FUSED_RECURRENT_GATED, q, k, v, _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval), g,
                      scale, initial_state, output_final_state, state_v_first, cu_seqlens, use_qk_l2norm_in_kernel,
                      backend, per_key_gate=gk is not None)


@register(FUSED_CHUNK)
def fused_chunk_delta_rule(**kwargs):
    """fla 0.6.0's stub raises; so does fla_tl (registered with that refusal): use :func:`chunk_delta_rule`."""
    raise NotImplementedError("fused_chunk_delta_rule is deprecated. Please use chunk_delta_rule instead.")
