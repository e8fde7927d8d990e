"""GSA's and ABC's public ops: chunk_abc, chunk_gsa and fused_recurrent_gsa, on two chunk_gla passes with the slot
softmax between (`chunk.py`), ABC's slot gates from the TileLang normaliser (`normaliser.py`).

The kernel-level call (`SCHEMA`): q `[B, T, HQ, K]` (HQ a multiple of H), k `[B, T, H, K]`, v `[B, T, H, V]`, the
slots s `[B, T, H, M]`, the slot log gates g (None: ABC's, derived from s), the initial states hk0 `[N, H, K, M]` and
hv0 `[N, H, M, V]` (both or neither), cu_seqlens and the options; it returns (o `[B, T, HQ, V]` in q's dtype, hk,
hv in fp32, fp64 for fp64 inputs, or None). The tilelang forward keeps the slot scores (and ABC's normaliser outputs)
for its backward (residuals).
"""

import importlib

import torch

from ...reference.abc import chunk_abc_torch, recurrent_abc
from ...reference.gsa import chunk_gsa_torch, recurrent_gsa
from ...registry import (
    Backend,
    KernelSpec,
    OpInputs,
    OpSpec,
    check_backend_name,
    describe_inputs,
    register,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case, reference_dtype
from ...utils import join_graph, use_host_copy, validate_linear_attention_inputs
from ..common.state_op import pop_chunk_size

GSA_MAX_SLOTS = 256
# the slot count of the kernel lists (`kernels(D, dtype)`: K = V = D): fla's default num_slots
KERNEL_SLOTS = 64
SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor s, Tensor? g, Tensor? hk0, Tensor? hv0, Tensor? cu_seqlens, "
          "float scale, bool output_final_state, bool reverse")
MODULES = {"chunk": "fla_tl.kernels.gsa.chunk", "fused_recurrent": "fla_tl.kernels.gsa.fused_recurrent"}


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


def _gsa_empty(q, k, v, s, g, N, initial_state, output_final_state):
    """the result of a T = 0 input: an empty output and the initial (or zero) states, joined to the autograd graph
    of the inputs (zero gradients; the states pass theirs on to the initial states)."""
    B, _, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], s.shape[3]
    o = v.new_empty(B, 0, HQ, V)
    ht_dtype = reference_dtype(q.dtype)
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    if initial_state is not None:
        states = [x.to(ht_dtype, copy=True) for x in initial_state]
    else:
        states = [q.new_zeros(N, H, K, M, dtype=ht_dtype), q.new_zeros(N, H, M, V, dtype=ht_dtype)]
    o, *states = join_graph([o, *states] if output_final_state else [o], (q, k, v, s, g, hk0, hv0))
    return o, (states if output_final_state else None)


def _gsa_run(spec, q, k, v, s, g, scale, initial_state, output_final_state, reverse, cu_seqlens, backend,
             grouped: bool):
    """validate, default the scale, handle T = 0, and run the op's kernel-level call: (o, [hk, hv] or None)."""
    N = _validate_gsa(q, k, v, s, g, scale, initial_state, cu_seqlens, grouped)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[1] == 0:
        check_backend_name(spec, backend)
        return _gsa_empty(q, k, v, s, g, N, initial_state, output_final_state)
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    o, hk, hv = spec.run(backend, q=q, k=k, v=v, s=s, g=g, hk0=hk0, hv0=hv0, cu_seqlens=cu_seqlens,
                         scale=float(scale), output_final_state=bool(output_final_state), reverse=bool(reverse))
    return o, ([hk, hv] if output_final_state else None)


def _states(q, o, ht):
    """o in q's dtype and the final states in fp32 (fp64 for fp64 q), or None; contiguous, as the fake describes them
    (the reference's states of grouped heads are strided views)."""
    acc = reference_dtype(q.dtype)
    o = o.to(q.dtype).contiguous()
    if ht is None:
        return o, None, None
    return o, ht[0].to(acc).contiguous(), ht[1].to(acc).contiguous()


def _gsa_torch(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, output_final_state, reverse):
    """the chunked PyTorch form of GSA (the torch backend)."""
    o, ht = chunk_gsa_torch(q, k, v, s, g, scale=scale, initial_state=(hk0, hv0) if hk0 is not None else None,
                            output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens)
    return _states(q, o, ht)


def _abc_torch(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, output_final_state, reverse):
    """the chunked PyTorch form of ABC (chunk_abc's torch backend; its scale is always K ** -0.5)."""
    o, ht = chunk_abc_torch(q, k, v, s, initial_state=(hk0, hv0) if hk0 is not None else None,
                            output_final_state=output_final_state)
    return _states(q, o, ht)


def _sequences(args) -> int:
    q, hk0, cu = args["q"], args["hk0"], args["cu_seqlens"]
    return hk0.shape[0] if hk0 is not None else (cu.shape[0] - 1 if cu is not None else q.shape[0])


def _describe(args: dict, backward: bool) -> OpInputs:
    return describe_inputs(args["q"], args["v"], args["hk0"], args["cu_seqlens"], backward, args["reverse"],
                           M=args["s"].shape[-1])


def _fake(args: dict) -> list:
    q, k, v, s = args["q"], args["k"], args["v"], args["s"]
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    o = q.new_empty(B, T, HQ, V)
    if not args["output_final_state"]:
        return [o, None, None]
    N, acc = _sequences(args), reference_dtype(q.dtype)
    return [o, q.new_empty(N, H, K, M, dtype=acc), q.new_empty(N, H, M, V, dtype=acc)]


def _gsa_tilelang(mode: str):
    """the tilelang backend's (fwd, bwd, residuals) of `mode`: `gsa_fwd` / `gsa_bwd` of `chunk.py` (one composition:
    ABC's slot gates, grouped heads, reverse, the two passes)."""
    module = MODULES[mode]

    def fwd(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, output_final_state, reverse, requires_grad):
        launch = importlib.import_module(module).gsa_fwd
        o, hk, hv, residuals = launch(q, k, v, s, g, hk0, hv0, scale=scale, output_final_state=output_final_state,
                                      reverse=reverse, cu_seqlens=cu_seqlens, keep=requires_grad)
        return o, hk, hv, *residuals

    def bwd(args, outputs, grads):
        launch = importlib.import_module(module).gsa_bwd
        names = ("q", "k", "v", "s", "g", "hk0", "hv0")
        found = launch(*(args[n] for n in names), *grads, scale=args["scale"], reverse=args["reverse"],
                       cu_seqlens=args["cu_seqlens"], residuals=outputs[3:])
        return dict(zip(names, found))

    def residuals(args, requires_grad):
        """empty tensors shaped like the forward's residuals: the slot scores ok `[B, T, HQ, M]` (s's dtype) and for
        ABC the normaliser's sn (k's dtype), gates and z (fp32) `[B, T, H, M]`."""
        if not requires_grad:
            return []
        q, k, s = args["q"], args["k"], args["s"]
        shapes = [s.new_empty(*q.shape[:3], s.shape[-1])]
        if args["g"] is None:
            shapes += [s.new_empty(s.shape, dtype=k.dtype), s.new_empty(s.shape, dtype=torch.float32),
                       s.new_empty(s.shape, dtype=torch.float32)]
        return shapes

    return fwd, bwd, residuals


def _slot_reasons(inputs: OpInputs) -> list[str]:
    M = inputs.options.get("M")
    if M is not None and M > GSA_MAX_SLOTS:
        return [f"`s`: the tilelang backend takes at most M = {GSA_MAX_SLOTS} slots, got {M}"]
    return []


def make_gsa_backend(mode: str, varlen: bool = True) -> Backend:
    """the tilelang backend of the GSA / ABC ops: two chunk_gla passes of `fla_tl.kernels.gsa` with PyTorch glue."""
    fwd, bwd, residuals = _gsa_tilelang(mode)
    caps = tilelang_capabilities(reverse=mode == "fused_recurrent", varlen=varlen)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, residuals=residuals, module=MODULES[mode],
                   extra_reasons=_slot_reasons, description="chunk_gla's TileLang stages, softmax glue in PyTorch")


def _gsa_kernels(D: int, dtype: str) -> list[KernelSpec]:
    """the kernels a GSA / ABC op launches at K = V = D with M = `KERNEL_SLOTS` slots: chunk_gla's stages of both
    passes (on (s, k) and on (s, v): the state passes, GLA's output, dv and dq/dk kernels and the per-key dg), the
    slot gates' fp32 cumsum, and ABC's normaliser (16-byte vectors and the scalar fallback; every op derives ABC's
    gates when `g` is None)."""
    from ...autotune.configs import BT
    from ..common.state_op import stage_spec
    from . import normaliser

    M = KERNEL_SLOTS
    specs = [stage_spec("gate_cumsum", 0, 0, dtype, "none", g_dtype="float32", BT=BT)]
    specs += [stage_spec(name, M, D, dtype, "gk") for name in ("chunk_fwd_h", "chunk_bwd_dh")]
    specs += [stage_spec(name, M, D, dtype, "gk")
              for name in ("chunk_gla_fwd_o", "chunk_gla_bwd_dv", "chunk_gla_bwd_dqk")]
    specs += [stage_spec("chunk_state_dot", M, D, dtype, "none", h_dtype=dtype, per_key=True, BT=BT),
              stage_spec("gate_grad_chunk_scan", 0, 0, dtype, "none", out_dtype="float32", BT=BT)]
    for vec in (normaliser.VEC_ALIGNED, 1):
        specs += [stage_spec("slot_normaliser_fwd", 0, 0, dtype, "none", out_dtype=dtype, VEC=vec),
                  stage_spec("slot_normaliser_bwd", 0, 0, dtype, "none", dsn_dtype=dtype, VEC=vec)]
    return specs


def _gsa_cases(name: str):
    """the `check` cases of chunk_abc / chunk_gsa / fused_recurrent_gsa against the recurrence: o, both final states
    and every gradient (q, k, v, s, g, both initial states); chunk_gsa with grouped query heads; varlen and reverse
    where the op has them."""
    abc, grouped, recurrent = name == "chunk_abc", name == "chunk_gsa", name == "fused_recurrent_gsa"

    def case(label, device, dtype, B, T, lens=None, **options):
        H, K, V, M = 2, 16, 12, 8
        HQ = 2 * H if grouped else H
        N = len(lens) if lens else B
        q = torch.randn(B, T, HQ, K, device=device)
        k, v, s = (torch.randn(B, T, H, d, device=device) for d in (K, V, M))
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, M, device=device) + 2)
        hk0, hv0 = torch.randn(N, H, K, M, device=device), torch.randn(N, H, M, V, device=device)
        args = dict(q=q, k=k, v=v, s=s, g=g)
        args = {n: x.to(dtype) for n, x in args.items()}
        args.update(initial_state=(hk0.to(dtype), hv0.to(dtype)), output_final_state=True)
        if abc:
            del args["g"]
        if lens:
            args["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
        args.update(options)
        grad = ("q", "k", "v", "s") + (() if abc else ("g",)) + ("initial_state",)
        acc = reference_dtype(dtype)
        return Case(label, args, grad, recurrent_abc if abc else recurrent_gsa, outputs=("o", "hk", "hv"),
                    dtype=dtype, out_dtypes={"o": dtype, "hk": acc, "hv": acc})

    def cases(device, dtype):
        found = [case("dense", device, dtype, 2, 70)]
        if not abc:
            found.append(case("varlen", device, dtype, 1, 101, lens=(30, 0, 70, 1)))
        if recurrent:
            found.append(case("varlen reverse", device, dtype, 1, 101, lens=(30, 0, 70, 1), reverse=True))
        return found

    return cases


def _spec(name: str, variant: str, mode: str, reference, torch_fn, varlen: bool) -> OpSpec:
    recurrent = mode == "fused_recurrent"
    return OpSpec(
        name=name, variant=variant, mode=mode, reference=reference,
        backends=[make_gsa_backend(mode, varlen),
                  torch_backend(torch_fn, torch_capabilities(reverse=recurrent, varlen=varlen))],
        schema=SCHEMA, outputs=3, grads=("q", "k", "v", "s", "g", "hk0", "hv0"), saved_outputs=(),
        describe=_describe, fake=_fake, kernels=_gsa_kernels, cases=_gsa_cases(name),
    )


CHUNK_ABC = _spec("chunk_abc", "abc", "chunk", recurrent_abc, _abc_torch, varlen=False)
CHUNK_GSA = _spec("chunk_gsa", "gsa", "chunk", recurrent_gsa, _gsa_torch, varlen=True)
FUSED_RECURRENT_GSA = _spec("fused_recurrent_gsa", "gsa", "fused_recurrent", recurrent_gsa, _gsa_torch, varlen=True)


@register(CHUNK_ABC)
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
    o, ht = _gsa_run(CHUNK_ABC, q, k, v, s, None, None, initial_state, output_final_state, False, None, backend,
                     grouped=False)
    return o, (tuple(ht) if ht is not None else None)


@register(CHUNK_GSA)
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
        cu_seqlens_cpu (Optional[torch.LongTensor]): a CPU copy of `cu_seqlens`: no host sync then.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None`. Default: `None`.
        kwargs: `chunk_size` (a power of 2; accepted, the kernels use 64); `head_first` raises; any other keyword
            raises `TypeError`.

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
    pop_chunk_size(kwargs)
    if kwargs:
        raise TypeError(f"chunk_gsa() got unexpected keyword arguments {sorted(kwargs)}")
    if checkpoint_level not in (0, 1, 2):
        raise ValueError(f"`checkpoint_level` must be 0, 1 or 2, got {checkpoint_level}")
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    o, ht = _gsa_run(CHUNK_GSA, q, k, v, s, g, scale, initial_state, output_final_state, False, cu_seqlens, backend,
                     grouped=True)
    return o, (ht if ht is not None else [None, None])


@register(FUSED_RECURRENT_GSA)
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
    o, ht = _gsa_run(FUSED_RECURRENT_GSA, q, k, v, s, g, scale, initial_state, output_final_state, reverse,
                     cu_seqlens, backend, grouped=True)
    return o, (ht if ht is not None else [None, None])
