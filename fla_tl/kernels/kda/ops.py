"""KDA's public ops: `chunk_kda` and `fused_recurrent_kda` (fla 0.6.0's names, arguments, defaults and returns), on
the delta rules' kernel-level call with a per-key gate g `[B, T, HV, K]` and the gate activation (`KDA_SCHEMA`).

The gate activation (`use_gate_in_kernel` with `A_log`, `dt_bias`, `lower_bound`) runs in the token-by-token kernels,
which read the raw gate input; their backward takes the activated gate's gradient on to g, `A_log` and `dt_bias`
(`delta_rule.fused_recurrent.activation_grads`); so do the chunked kernels (the activation in the gate's cumulative
sum, `common.cumsum`). The torch paths activate in PyTorch. The beta activation
(`use_beta_sigmoid_in_kernel`, `allow_neg_eigval`) runs in PyTorch before the call. `fused_recurrent_kda` with
`ssm_state_indices` serves from a state pool (inference only: no kernel-level call, no autograd).
"""

import torch

from ...autotune.configs import BT, KERNELS
from ...reference.kda import kda_beta, kda_gate, recurrent_kda
from ...registry import (
    Backend,
    BackendError,
    OpSpec,
    register,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case, reference_dtype
from ...utils import check_device, use_host_copy
from ..common.state_op import pop_state_layout
from ..delta_rule.ops import (
    GRADS,
    SCHEMA,
    _delta_run,
    _delta_torch,
    _describe,
    _fake,
    _fused_recurrent_backend,
    _kernel_options,
    _validate_delta,
)

# the delta rules' kernel-level call plus the gate activation (`gate_act` "", "softplus" or "sigmoid")
KDA_SCHEMA = SCHEMA + ", Tensor? A_log, Tensor? dt_bias, str gate_act, float lower_bound"
KDA_GRADS = GRADS + ("A_log", "dt_bias")
# the kernels' gate options: log gates given, or the raw input activated in the kernels (`_gate_act`)
GATES = ("gk", "gk_softplus", "gk_sigmoid")
UNSUPPORTED = ("cp_context", "use_graph", "return_intermediate_states")
CHUNK_OPT_IN = ("chunk_kda's chunked TileLang kernels have not yet passed their GPU tests: they run only when asked "
                "for by name (backend='tilelang' or FLA_TL_BACKEND=tilelang)")
# the widest fp32 keys of the chunked kernels (the state pass's fp32 gate and gated-key tiles overflow shared memory
# beyond)
KDA_MAX_K_FP32 = 64


# ---------------------------------------------------------------------------------------------- activations


def _gate_act(g, use_gate_in_kernel: bool, A_log, dt_bias, lower_bound, safe_gate: bool = False) -> str:
    """the gate activation the kernels apply: "" (g is the log gate), "softplus" (`-exp(A_log) * softplus(g +
    dt_bias)`) or "sigmoid" (`lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`, without `A_log` a factor of 1),
    after checking `A_log` `[HV]`, `dt_bias` `[HV * K]` and fla's `safe_gate` / `lower_bound` rules."""
    if safe_gate and use_gate_in_kernel:
        if lower_bound is None:
            raise ValueError("`lower_bound` must be specified when `safe_gate=True` and `use_gate_in_kernel=True`")
        if not -5 <= lower_bound < 0:
            raise ValueError(f"`lower_bound` must be in the safe range [-5, 0), got {lower_bound}")
    if not use_gate_in_kernel:
        return ""
    if A_log is None and lower_bound is None:
        raise ValueError("`A_log` [HV] must be provided when `use_gate_in_kernel=True` and `lower_bound` is not set")
    if isinstance(g, torch.Tensor) and g.dim() == 4:
        HV, K = g.shape[-2:]
        for name, x, size in (("A_log", A_log, HV), ("dt_bias", dt_bias, HV * K)):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"`{name}` must be a floating-point torch.Tensor [{size}], got {type(x).__name__}")
            if x.numel() != size:
                raise ValueError(f"`{name}` must have {size} elements ({'[HV]' if name == 'A_log' else '[HV * K]'}), "
                                 f"got shape {tuple(x.shape)}")
            check_device(name, x, g.device, "g")
    return "softplus" if lower_bound is None else "sigmoid"


def _activated(g, A_log, dt_bias, gate_act: str, lower_bound: float):
    """the log gate in PyTorch (`fla_tl.reference.kda.kda_gate`, differentiable): the torch paths' activation."""
    if not gate_act:
        return g
    return kda_gate(g, A_log, dt_bias.reshape(-1) if dt_bias is not None else None,
                    lower_bound if gate_act == "sigmoid" else None)


def _extra(A_log, dt_bias, gate_act: str, lower_bound) -> dict:
    """the arguments `KDA_SCHEMA` adds to the delta rules' call (the activation's tensors only with one)."""
    return dict(A_log=A_log if gate_act else None, dt_bias=dt_bias if gate_act else None, gate_act=gate_act,
                lower_bound=float(lower_bound) if gate_act == "sigmoid" else 0.0)


def _activation(A_log, dt_bias, gate_act: str, lower_bound: float):
    """the kernels' `GateActivation`, or None without one."""
    if not gate_act:
        return None
    from ..common.fused_recurrent_delta import GateActivation

    return GateActivation(gate_act, A_log, dt_bias, float(lower_bound))


def _beta(beta, use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool):
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`")
    if not use_beta_sigmoid_in_kernel or not isinstance(beta, torch.Tensor) or not beta.is_floating_point():
        return beta
    return kda_beta(beta.float() if beta.dtype != torch.float64 else beta, True, allow_neg_eigval)


def _refuse(name: str, options: dict) -> None:
    for option, value in options.items():
        if value not in (None, False):
            raise NotImplementedError(f"{name}: `{option}` is not supported by fla_tl")


# ---------------------------------------------------------------------------------------------- backends


def _options(args: dict) -> dict:
    """the token-by-token entry points' options: the delta rules' and the gate activation."""
    return dict(_kernel_options(args),
                act=_activation(args["A_log"], args["dt_bias"], args["gate_act"], args["lower_bound"]))


def _kda_torch(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, state_v_first,
               use_qk_l2norm_in_kernel, A_log, dt_bias, gate_act, lower_bound):
    return _delta_torch(q, k, v, beta, _activated(g, A_log, dt_bias, gate_act, lower_bound), initial_state,
                        cu_seqlens, scale, output_final_state, state_v_first, use_qk_l2norm_in_kernel)


def _chunk_reasons(inputs) -> list[str]:
    if inputs.dtype == torch.float32 and inputs.K > KDA_MAX_K_FP32:
        return [f"fp32 inputs take K <= {KDA_MAX_K_FP32} (the state pass's fp32 tiles of K = {inputs.K} overflow "
                f"shared memory): use bf16 / fp16 inputs or backend='torch'"]
    return []


def _chunk_backend() -> Backend:
    """the chunked per-key gated WY kernels (`chunk.py`), the gate activation in the cumulative sum's stage; the
    cumulative gates, the WY inverse and the intra-chunk scores are the backward's residuals."""

    def fwd(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, state_v_first,
            use_qk_l2norm_in_kernel, A_log, dt_bias, gate_act, lower_bound, requires_grad):
        from .chunk import chunk_kda_fwd

        o, ht, kept = chunk_kda_fwd(q, k, v, beta, g, scale=float(scale), initial_state=initial_state,
                                    output_final_state=output_final_state, state_v_first=state_v_first,
                                    cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                    requires_grad=requires_grad,
                                    act=_activation(A_log, dt_bias, gate_act, lower_bound))
        return (o, ht, *kept) if requires_grad else (o, ht)

    def bwd(args, outputs, grads):
        from ..delta_rule.fused_recurrent import activation_grads
        from .chunk import chunk_kda_bwd

        do, dht = grads
        dq, dk, dv, dbeta, dg, dh0 = chunk_kda_bwd(
            args["q"], args["k"], args["v"], args["beta"], args["g"], outputs[2:5], do, dht, scale=float(args["scale"]),
            initial_state=args["initial_state"], state_v_first=args["state_v_first"], cu_seqlens=args["cu_seqlens"],
            use_qk_l2norm_in_kernel=args["use_qk_l2norm_in_kernel"])
        dA_log = ddt_bias = None
        act = _activation(args["A_log"], args["dt_bias"], args["gate_act"], args["lower_bound"])
        if act is not None:
            dg, dA_log, ddt_bias = activation_grads(args["g"], dg, act)
        return dict(q=dq, k=dk, v=dv, beta=dbeta, g=dg, initial_state=dh0, A_log=dA_log, dt_bias=ddt_bias)

    def residuals(args, requires_grad):
        q, v = args["q"], args["v"]
        B, T, _, K = q.shape
        HV = v.shape[2]
        if not requires_grad:
            return []
        return [q.new_empty(B * T, HV, K, dtype=torch.float32), q.new_empty(B * T, HV, BT),
                q.new_empty(B * T, HV, BT, dtype=torch.float32)]

    return Backend(name="tilelang", capabilities=tilelang_capabilities(state_v_first=True), fwd=fwd, bwd=bwd,
                   residuals=residuals, module="fla_tl.kernels.kda.chunk", extra_reasons=_chunk_reasons,
                   description="chunked per-key gated WY TileLang kernels", opt_in=CHUNK_OPT_IN)


def _chunk_kernels(D: int, dtype: str) -> list:
    """the kernels chunk_kda launches at K = V = D: the per-key gate's cumulative sum, the WY inverse, the state passes
    at every pass config the grid can pick, the output stage, the dq / dk / dw pass, the WY backward and the gate
    gradient's chunk-state terms and scan."""
    import dataclasses

    from ...autotune.configs import delta_pass_configs
    from ..common.state_op import stage_spec

    if dtype == "float32" and D > KDA_MAX_K_FP32:
        return []
    # the gate's cumulative sum: log gates given, or the raw input activated there
    specs = [stage_spec("gate_cumsum", 0, 0, dtype, "none", g_dtype="float32", BT=BT,
                        **({"act": act, "group": D} if act else {})) for act in ("", "softplus", "sigmoid")]
    specs.append(stage_spec("wy_fwd", D, D, dtype, "gk", pair=False))
    for config in map(dataclasses.asdict, delta_pass_configs(D, D, dtype, "gk")):
        specs += [stage_spec(name, D, D, dtype, "gk", config) for name in ("chunk_delta_fwd_h", "chunk_delta_bwd_dhu")]
    specs += [stage_spec("chunk_gla_fwd_o", D, D, dtype, "gk", bonus=False),
              stage_spec("chunk_delta_bwd_dqkw", D, D, dtype, "gk"), stage_spec("wy_bwd", D, D, dtype, "gk"),
              stage_spec("chunk_state_dot", D, D, dtype, "none", h_dtype=dtype, per_key=True, BT=BT),
              stage_spec("gate_grad_chunk_scan", 0, 0, dtype, "none", out_dtype="float32", BT=BT)]
    return specs


def _recurrent_kernels(D: int, dtype: str) -> list:
    """the kernels `fused_recurrent_kda` launches at K = V = D: for each gate option (log gates given, or activated in
    the kernels) and state layout the forward (plain and on a state pool) and the two backward sweeps, and the gate
    gradient's per-sequence scan."""
    from ..common.state_op import stage_spec

    specs = []
    for gate in GATES:
        for state_v_first in (False, True):
            for pool in (False, True):
                specs.append(stage_spec("fused_recurrent_delta_fwd", D, D, dtype, gate, state_v_first=state_v_first,
                                        pool=pool))
            specs.append(stage_spec("fused_recurrent_delta_bwd", D, D, dtype, gate, state_v_first=state_v_first))
            specs += [stage_spec("fused_recurrent_delta_bwd", D, D, dtype, gate, factory=companion,
                                 state_v_first=state_v_first)
                      for companion in KERNELS["fused_recurrent_delta_bwd"].companions]
    specs.append(stage_spec("gate_grad_scan", 0, 0, dtype, "none", reverse=True, out_dtype="float32", BT=BT))
    return specs


def _cases(device, dtype):
    """the `check` cases: dense GVA with an initial state, packed sequences (an empty and a one-token one) in the
    value-first state layout, and raw keys with the in-kernel L2 norm."""
    H, HV, K, V = 2, 4, 16, 12
    found = []
    for label, B, lens, options in (
        ("dense", 2, None, {}),
        ("varlen state_v_first", 1, (30, 0, 39, 1), {"state_v_first": True}),
        ("l2norm raw keys", 2, None, {"use_qk_l2norm_in_kernel": True}),
    ):
        T = sum(lens) if lens else 70
        N = len(lens) if lens else B
        q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
        if not options.get("use_qk_l2norm_in_kernel"):
            k = torch.nn.functional.normalize(k, dim=-1)
        v = torch.randn(B, T, HV, V, device=device)
        beta = torch.rand(B, T, HV, device=device)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, K, device=device) + 2)
        h0 = torch.randn((N, HV, V, K) if options.get("state_v_first") else (N, HV, K, V), device=device)
        args = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, output_final_state=True, **options)
        if lens:
            args["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
        args = {n: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for n, x in args.items()}
        found.append(Case(label, args, ("q", "k", "v", "g", "beta", "initial_state"), recurrent_kda, dtype=dtype,
                          out_dtypes={"o": dtype, "ht": reference_dtype(dtype)}))
    return found


def _spec(name: str, mode: str) -> OpSpec:
    recurrent = mode == "fused_recurrent"
    if recurrent:
        backends = [_fused_recurrent_backend(KDA_GRADS, _options)]
        kernels = _recurrent_kernels
    else:
        backends = [_chunk_backend()]
        kernels = _chunk_kernels
    backends.append(torch_backend(_kda_torch, torch_capabilities(), "the chunked PyTorch form"))
    return OpSpec(
        name=name, variant="kda", mode=mode, reference=recurrent_kda, backends=backends, schema=KDA_SCHEMA,
        outputs=2, grads=KDA_GRADS, saved_outputs=(1,) if recurrent else (), describe=_describe, fake=_fake,
        kernels=kernels, cases=_cases,
    )


CHUNK = _spec("chunk_kda", "chunk")
FUSED_RECURRENT = _spec("fused_recurrent_kda", "fused_recurrent")


# ---------------------------------------------------------------------------------------------- serving


def _check_pool(pool, slots, accepted, q, v, N: int, state_v_first: bool):
    """the state pool `[P, HV, K, V]` fp32 contiguous, slots `[N]` / `[N, NI]` and accepted `[N]` integers on q's
    device; returns (slots as `[N, NI]` int32, accepted as int32 or None)."""
    K, (HV, V) = q.shape[-1], v.shape[2:]
    want = (HV, V, K) if state_v_first else (HV, K, V)
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or tuple(pool.shape[1:]) != want:
        layout = "[P, HV, V, K]" if state_v_first else "[P, HV, K, V]"
        raise ValueError(f"`initial_state` must be the state pool {layout} = [P, {', '.join(map(str, want))}] with "
                         f"`ssm_state_indices`, got {tuple(pool.shape) if isinstance(pool, torch.Tensor) else pool}")
    if pool.dtype != torch.float32 or not pool.is_contiguous():
        raise ValueError(f"`initial_state` (the state pool) must be a contiguous float32 tensor (it is updated in "
                         f"place), got {pool.dtype}{'' if pool.is_contiguous() else ', not contiguous'}")
    check_device("initial_state", pool, q.device)
    for name, x in (("ssm_state_indices", slots), ("num_accepted_tokens", accepted)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"`{name}` must be an integer torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_device(name, x, q.device)
    if slots.dim() not in (1, 2) or slots.shape[0] != N:
        raise ValueError(f"`ssm_state_indices` must be [N] or [N, T] with N = {N} sequences, got {tuple(slots.shape)}")
    if accepted is not None and tuple(accepted.shape) != (N,):
        raise ValueError(f"`num_accepted_tokens` must be [N] = [{N}], got {tuple(accepted.shape)}")
    slots = slots.view(N, -1) if slots.dim() == 1 else slots
    accepted = accepted.to(torch.int32).contiguous() if accepted is not None else None
    return slots.to(torch.int32).contiguous(), accepted


def _pool_torch(q, k, v, g, beta, pool, slots, accepted, scale, state_v_first, cu_seqlens, use_qk_l2norm_in_kernel):
    """the state-pool forward in PyTorch (the recurrence per sequence; per token where a slot takes each token's
    state): o `[B, T, HV, V]`, the pool updated in place."""
    B, T = q.shape[:2]
    N, NI = slots.shape
    cu = cu_seqlens.tolist() if cu_seqlens is not None else [n * T for n in range(B + 1)]
    flat = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    o = torch.empty(B * T, *v.shape[2:], dtype=q.dtype, device=q.device)
    slots, accepted = slots.tolist(), accepted.tolist() if accepted is not None else None
    for n in range(N):
        bos, eos = cu[n], cu[n + 1]
        slot = slots[n][accepted[n] - 1] if accepted is not None else slots[n][0]
        h = pool[slot][None].clone() if slot >= 0 else torch.zeros_like(pool[:1])
        steps = [(bos, eos)] if NI == 1 else [(t, t + 1) for t in range(bos, eos)]
        for t0, t1 in steps:
            qs, ks, vs, gs, bs = (x[t0:t1][None] for x in flat)
            out, h = recurrent_kda(qs, ks, vs, gs, bs, scale=scale, initial_state=h, output_final_state=True,
                                   state_v_first=state_v_first, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
            o[t0:t1] = out[0].to(o.dtype)
            h = h.float()
            dst = slot if NI == 1 else slots[n][t0 - bos]
            if dst >= 0:
                pool[dst] = h[0]
    return o.view(*v.shape[:2], *v.shape[2:])


def _serve(q, k, v, g, beta, pool, slots, accepted, scale, state_v_first, cu_seqlens, use_qk_l2norm_in_kernel,
           backend, extra: dict):
    """`fused_recurrent_kda` on a state pool: o, the pool updated in place (`extra`: the gate activation)."""
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                       for x in (q, k, v, g, beta, pool, extra["A_log"], extra["dt_bias"])):
        raise ValueError("fused_recurrent_kda: `ssm_state_indices` (serving from a state pool) is inference only; "
                         "run it under torch.no_grad() / torch.inference_mode()")
    N = _validate_delta(q, k, v, beta, g, None, cu_seqlens, state_v_first, scale, per_key_gate=True)
    slots, accepted = _check_pool(pool, slots, accepted, q, v, N, state_v_first)
    if backend not in (None, "auto", "tilelang", "torch"):
        FUSED_RECURRENT.backend(backend)
    reasons = []
    if backend != "torch":
        inputs = _describe(dict(q=q, v=v, initial_state=pool, cu_seqlens=cu_seqlens), False)
        reasons = FUSED_RECURRENT.backend("tilelang").verifier(inputs)
        if reasons and backend == "tilelang":
            raise BackendError(f"fused_recurrent_kda: backend 'tilelang' refused the input: {'; '.join(reasons)}")
    if backend == "torch" or reasons:
        return _pool_torch(q, k, v, _activated(g, **extra), beta, pool, slots, accepted, scale, state_v_first,
                           cu_seqlens, use_qk_l2norm_in_kernel)
    from .fused_recurrent import fused_recurrent_kda_pool_fwd

    return fused_recurrent_kda_pool_fwd(q, k, v, g, beta, pool, slots, accepted, scale=scale,
                                        state_v_first=state_v_first, cu_seqlens=cu_seqlens,
                                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, act=_activation(**extra))


# ---------------------------------------------------------------------------------------------- the public ops


@register(CHUNK)
def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    cp_context=None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    backend: str | None = None,
    **kwargs,
):
    r"""
    KDA (Kimi Delta Attention) in the chunked form: per value head,
    `S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T`, `o_t = scale * S_t^T q_t`, with grouped
    value heads (HV a multiple of H: value head j reads key head j // (HV / H)). `backend="tilelang"` runs the
    chunked per-key gated WY kernels of `fla_tl.kernels.kda` (chunks of 64 tokens whatever `chunk_size`), forward and
    backward with every gradient; fp32 inputs there take K <= 64. They have not yet passed their GPU tests, so the
    automatic choice runs the chunked PyTorch form (and warns once).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, HV, V]`.
        g (torch.Tensor): log gates `[B, T, HV, K]` (the raw gate input with `use_gate_in_kernel=True`).
        beta (torch.Tensor): `[B, T, HV]` (logits with `use_beta_sigmoid_in_kernel=True`).
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, HV, K, V]` (`[N, HV, V, K]` with `state_v_first`).
        output_final_state (bool): Default: `False`.
        use_qk_l2norm_in_kernel (bool): L2-normalise q and k first. Default: `False`.
        use_gate_in_kernel (bool): the gate is `-exp(A_log) * softplus(g + dt_bias)`, or with `lower_bound`
            `lower_bound * sigmoid(exp(A_log) * (g + dt_bias))` (without `A_log`: `lower_bound * sigmoid(g +
            dt_bias)`); `A_log` `[HV]` and `dt_bias` `[HV * K]` come as keyword arguments. Default: `False`.
        use_beta_sigmoid_in_kernel (bool): apply `sigmoid` to beta (times 2 with `allow_neg_eigval`). Default: `False`.
        allow_neg_eigval (bool): see above; needs `use_beta_sigmoid_in_kernel`. Default: `False`.
        safe_gate (bool): with `use_gate_in_kernel`, requires `lower_bound` in [-5, 0) (fla's checks; the result does
            not depend on it). Default: `False`.
        lower_bound (Optional[float]): see `use_gate_in_kernel`. Default: `None`.
        disable_recompute (bool): accepted; fla's memory/speed trade-off, the result does not depend on it.
        state_v_first (bool): states laid out `[N, HV, V, K]`. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. cu_seqlens_cpu: a CPU copy of it.
        return_intermediate_states, cp_context, use_graph, max_num_seqs: not supported (raise when set).
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). Default: `None`.
        kwargs: `A_log`, `dt_bias`; `chunk_size` in {32, 64} (accepted; the result does not depend on it); the
            deprecated `transpose_state_layout`; `head_first` raises.

    Returns:
        o `[B, T, HV, V]` in q's dtype; the final state in float32, or `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k = torch.randn(2, 300, 2, 64), torch.randn(2, 300, 2, 64)
        >>> v, beta = torch.randn(2, 300, 4, 64), torch.rand(2, 300, 4)
        >>> g = F.logsigmoid(torch.randn(2, 300, 4, 64))
        >>> o, ht = chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
        >>> q, k, v, g, beta = (x.flatten(0, 1)[None] for x in (q, k, v, g, beta))
        >>> o, _ = chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=torch.tensor([0, 100, 600]))
    """
    _refuse("chunk_kda", dict(cp_context=cp_context, use_graph=use_graph, max_num_seqs=max_num_seqs,
                              return_intermediate_states=return_intermediate_states))
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    A_log, dt_bias = kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    chunk_size = kwargs.pop("chunk_size", 64)
    if chunk_size not in (32, 64):
        raise ValueError(f"`chunk_size` must be either 32 or 64 for KDA, got {chunk_size}")
    state_v_first = pop_state_layout("chunk_kda", state_v_first, kwargs)
    if kwargs:
        raise TypeError(f"chunk_kda() got unexpected keyword arguments {sorted(kwargs)}")
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    gate_act = _gate_act(g, use_gate_in_kernel, A_log, dt_bias, lower_bound, safe_gate)
    return _delta_run(CHUNK, q, k, v, _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval), g, scale,
                      initial_state, output_final_state, state_v_first, cu_seqlens, use_qk_l2norm_in_kernel, backend,
                      per_key_gate=True, extra=_extra(A_log, dt_bias, gate_act, lower_bound))


@register(FUSED_RECURRENT)
def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    backend: str | None = None,
    **kwargs,
):
    r"""
    KDA token by token: the math, arguments and returns of :func:`chunk_kda` (`A_log`, `dt_bias` as arguments here,
    as in fla). Unlike fla 0.6.0 it has a backward (every gradient, `A_log` and `dt_bias` included).

    Serving from a state pool: with `ssm_state_indices` `[N]` (a slot per sequence) or `[N, T]` (a slot per token,
    speculative decoding), `initial_state` is the pool `[P, HV, K, V]` float32 contiguous; sequence n starts from
    slot `ssm_state_indices[n, num_accepted_tokens[n] - 1]` (`ssm_state_indices[n, 0]` without
    `num_accepted_tokens` `[N]`) and writes back in place: its final state to its slot (`[N]`), or the state after
    each token t to `ssm_state_indices[n, t]` (`[N, T]`). A negative slot is padding (a zero state, nothing written).
    Inference only; returns (o, the pool) with `output_final_state`, else (o, None).

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k = torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32)
        >>> v, beta = torch.randn(2, 64, 4, 32), torch.rand(2, 64, 4)
        >>> g = F.logsigmoid(torch.randn(2, 64, 4, 32))
        >>> o, ht = fused_recurrent_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, output_final_state=True)
        >>> pool = torch.randn(8, 4, 32, 32)
        >>> with torch.no_grad():  # decode one token of two sequences held in slots 5 and 2
        ...     o, _ = fused_recurrent_kda(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], initial_state=pool,
        ...                                ssm_state_indices=torch.tensor([5, 2]), use_qk_l2norm_in_kernel=True)
        >>> q, k, v, g, beta = (x.flatten(0, 1)[None] for x in (q, k, v, g, beta))
        >>> o, _ = fused_recurrent_kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 100, 128]))
    """
    state_v_first = pop_state_layout("fused_recurrent_kda", state_v_first, kwargs)
    if kwargs:
        raise TypeError(f"fused_recurrent_kda() got unexpected keyword arguments {sorted(kwargs)}")
    if num_accepted_tokens is not None and ssm_state_indices is None:
        raise ValueError("`num_accepted_tokens` needs `ssm_state_indices` (the slots of the state pool)")
    gate_act = _gate_act(g, use_gate_in_kernel, A_log, dt_bias, lower_bound)
    beta = _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    extra = _extra(A_log, dt_bias, gate_act, lower_bound)
    if ssm_state_indices is not None:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        o = _serve(q, k, v, g, beta, initial_state, ssm_state_indices, num_accepted_tokens, float(scale),
                   bool(state_v_first), cu_seqlens, bool(use_qk_l2norm_in_kernel), backend, extra)
        return o, (initial_state if output_final_state else None)
    return _delta_run(FUSED_RECURRENT, q, k, v, beta, g, scale, initial_state, output_final_state, state_v_first,
                      cu_seqlens, use_qk_l2norm_in_kernel, backend, per_key_gate=True, extra=extra)
