"""RWKV6's public ops: chunk_rwkv6 and fused_recurrent_rwkv6, on GLA's TileLang kernels with the queries shifted one
token and the bonus added (`bonus.py`, `chunk.py`, `fused_recurrent.py`).

The kernel-level call (`SCHEMA`): r, k `[B, T, H, K]`, v `[B, T, H, V]`, the per-key log decays w `[B, T, H, K]`,
the bonus u `[H, K]`, the initial state `[N, H, K, V]`, cu_seqlens and the options; it returns (o `[B, T, H, V]` in
r's dtype, the final state in fp32, fp64 for fp64 inputs, or None). chunk_rwkv6's tilelang forward keeps GLA's
cumulative gates and intra-chunk scores for its backward (residuals); fused_recurrent_rwkv6's backward reads the
final state (the decay's gradient).
"""

import importlib

import torch

from ...reference.rwkv6 import chunk_rwkv6_torch, recurrent_rwkv6
from ...registry import (
    Backend,
    KernelSpec,
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

SCHEMA = ("Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor? initial_state, Tensor? cu_seqlens, float scale, "
          "bool output_final_state, bool reverse")
SCANS = ("gate_cumsum", "gate_grad_chunk_scan", "gate_grad_scan")
MODULES = {"chunk": "fla_tl.kernels.rwkv6.chunk", "fused_recurrent": "fla_tl.kernels.rwkv6.fused_recurrent"}


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
    """validate, default the scale, handle T = 0, and run the op's kernel-level call."""
    N = _validate_rwkv6(r, k, v, w, u, scale, initial_state, cu_seqlens)
    B, T, H, K = r.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if T == 0:
        # no kernel runs; the outputs still reach the autograd graph of the inputs (zero gradients)
        check_backend_name(spec, backend)
        o, ht, ht_dtype = v.new_empty(B, 0, H, V), None, reference_dtype(r.dtype)
        if output_final_state and initial_state is not None:
            ht = initial_state.to(ht_dtype, copy=True)
        elif output_final_state:
            ht = r.new_zeros(N, H, K, V, dtype=ht_dtype)
        o, ht = join_graph([o, ht], (r, k, v, w, u, initial_state))
        return o, ht
    o, ht = spec.run(backend, r=r, k=k, v=v, w=w, u=u, initial_state=initial_state, cu_seqlens=cu_seqlens,
                     scale=float(scale), output_final_state=bool(output_final_state), reverse=bool(reverse))
    return o, (ht if output_final_state else None)


def _rwkv6_kwargs(name: str, kwargs: dict) -> None:
    """fla's `chunk_size` (a power of 2, unused: the kernels use 64); `head_first` raises; any other keyword too."""
    pop_chunk_size(kwargs)
    if kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(kwargs)}")


def _rwkv6_torch(r, k, v, w, u, initial_state, cu_seqlens, scale, output_final_state, reverse):
    """the chunked PyTorch form (the torch backend): o in r's dtype, the final state in fp32 (fp64 for fp64 r)."""
    o, ht = chunk_rwkv6_torch(r, k, v, w, u, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens)
    return o.to(r.dtype), (ht.to(reference_dtype(r.dtype)) if ht is not None else None)


def _sequences(args) -> int:
    r, h0, cu = args["r"], args["initial_state"], args["cu_seqlens"]
    return h0.shape[0] if h0 is not None else (cu.shape[0] - 1 if cu is not None else r.shape[0])


def _describe(args: dict, backward: bool):
    return describe_inputs(args["r"], args["v"], args["initial_state"], args["cu_seqlens"], backward, args["reverse"],
                           False, args["w"])


def _fake(args: dict) -> list:
    r, v = args["r"], args["v"]
    B, T, H, K = r.shape
    o = r.new_empty(B, T, H, v.shape[-1])
    if not args["output_final_state"]:
        return [o, None]
    return [o, r.new_empty(_sequences(args), H, K, v.shape[-1], dtype=reference_dtype(r.dtype))]


def make_rwkv6_backend(mode: str) -> Backend:
    """the tilelang backend of chunk_rwkv6 / fused_recurrent_rwkv6: GLA's TileLang kernels of that mode with the
    queries shifted one token and the bonus added (`fla_tl.kernels.rwkv6`), forward and backward."""
    module = MODULES[mode]

    def launchers():
        return importlib.import_module(module)

    def decay(w):
        return w.float() if w.dtype == torch.float64 else w

    def cu_int64(cu):
        return cu.to(torch.int64).contiguous() if cu is not None else None

    def fwd(r, k, v, w, u, initial_state, cu_seqlens, scale, output_final_state, reverse, requires_grad):
        mod = launchers()
        kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_int64(cu_seqlens), keep=requires_grad)
        if mode == "fused_recurrent":
            kw["reverse"] = reverse
        o, ht, residuals = getattr(mod, f"{mode}_rwkv6_fwd")(r, k, v.to(r.dtype), decay(w), u, **kw)
        return o, ht, *residuals

    def bwd(args, outputs, grads):
        mod = launchers()
        r = args["r"]
        do, dht = grads
        ht = outputs[1] if outputs[1].numel() else None
        kw = dict(scale=args["scale"], initial_state=args["initial_state"], cu_seqlens=cu_int64(args["cu_seqlens"]),
                  ht=ht, residuals=outputs[2:])
        if mode == "fused_recurrent":
            kw["reverse"] = args["reverse"]
        dr, dk, dv, dw, du, dh0 = getattr(mod, f"{mode}_rwkv6_bwd")(
            r, args["k"], args["v"].to(r.dtype), decay(args["w"]), args["u"], do, dht, **kw)
        return {"r": dr, "k": dk, "v": dv, "w": dw, "u": du, "initial_state": dh0}

    def residuals(args, requires_grad):
        if not requires_grad or mode != "chunk":
            return []
        from ...autotune.configs import BT

        r = args["r"]
        B, T, H, K = r.shape
        return [r.new_empty(B * T, H, K, dtype=torch.float32), r.new_empty(B * T, H, BT, dtype=torch.float32)]

    caps = tilelang_capabilities(reverse=mode == "fused_recurrent", gate=True)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, residuals=residuals, module=module,
                   description="GLA's TileLang kernels with a one-token query shift and the bonus")


def _kernels(mode: str):
    """the kernels an RWKV6 op of `mode` launches at K = V = D: GLA's of that mode (the chunk output kernel in its
    bonus form only; the recurrent ones with states [K, V]), the gate cumsum / gradient scan with w in fp32 or the
    input dtype (the chunk mode reads w as given), and the bonus kernels of `bonus.py`."""

    def kernels(D: int, dtype: str) -> list[KernelSpec]:
        from ...autotune.configs import BT, KERNELS
        from ..common.state_op import stage_spec
        from ..gla.ops import chunk_gla_kernels, fused_recurrent_gla_kernels

        if mode == "chunk":
            # GLA's chunk kernels: the output kernel in its bonus form only, the gate scans below
            specs = [s for s in chunk_gla_kernels(D, dtype, bonus=True)
                     if s.kwargs.get("bonus", True) and s.name not in SCANS]
            # w as given (fp32, or the input dtype): its chunk cumsum and the gradient's chunk-local scan
            for w_dtype in sorted({"float32", dtype}):
                specs += [stage_spec("gate_cumsum", 0, 0, dtype, "none", g_dtype=w_dtype, BT=BT),
                          stage_spec("gate_grad_chunk_scan", 0, 0, dtype, "none", out_dtype=w_dtype, BT=BT)]
            # the forward's bonus is in GLA's output kernel; the backward's bonus kernel
            if KERNELS["rwkv6_bwd_bonus"].launches(D, D, dtype):
                specs.append(stage_spec("rwkv6_bwd_bonus", D, D, dtype, "none"))
        else:
            specs = [s for s in fused_recurrent_gla_kernels(D, dtype)
                     if not s.kwargs.get("state_v_first", False) and s.name not in SCANS]
            # dw's sequence scan, in w's dtype (fp32 or the input dtype)
            specs += [stage_spec("gate_grad_scan", 0, 0, dtype, "none", reverse=reverse, out_dtype=w_dtype, BT=BT)
                      for w_dtype in sorted({"float32", dtype}) for reverse in (False, True)]
            specs += [stage_spec(name, D, D, dtype, "none", reverse=reverse)
                      for reverse in (False, True) for name in ("rwkv6_fwd_bonus", "rwkv6_bwd_bonus")
                      if KERNELS[name].launches is None or KERNELS[name].launches(D, D, dtype)]
        return specs

    return kernels


def _cases(recurrent: bool):
    """the `check` case: varlen with an empty sequence and an initial state, K = V = 64 (on a GPU the kernels of a
    common head dim); fused_recurrent in reverse."""

    def cases(device, dtype):
        B, T, H, K, V = 1, 101, 2, 64, 64
        cu = torch.tensor([0, 30, 30, 101], device=device)
        r, k, w = (torch.randn(B, T, H, K, device=device) for _ in range(3))
        v = torch.randn(B, T, H, V, device=device)
        w = torch.nn.functional.logsigmoid(w + 2)
        u, h0 = torch.randn(H, K, device=device), torch.randn(3, H, K, V, device=device)
        args = dict(r=r, k=k, v=v, w=w, u=u, initial_state=h0)
        args = {n: x.to(dtype) for n, x in args.items()}
        args.update(output_final_state=True, cu_seqlens=cu)
        if recurrent:
            args["reverse"] = True
        return [Case("varlen reverse" if recurrent else "varlen", args, ("r", "k", "v", "w", "u", "initial_state"),
                     recurrent_rwkv6, dtype=dtype, out_dtypes={"o": dtype, "ht": reference_dtype(dtype)})]

    return cases


def _spec(mode: str) -> OpSpec:
    recurrent = mode == "fused_recurrent"
    return OpSpec(
        name=f"{mode}_rwkv6", variant="rwkv6", mode=mode, reference=recurrent_rwkv6,
        backends=[make_rwkv6_backend(mode),
                  torch_backend(_rwkv6_torch, torch_capabilities(reverse=recurrent, gate=True))],
        schema=SCHEMA, outputs=2, grads=("r", "k", "v", "w", "u", "initial_state"),
        # the recurrent backward reads the final state (dw's <ht, dht> term)
        saved_outputs=(1,) if recurrent else (), describe=_describe, fake=_fake, kernels=_kernels(mode),
        cases=_cases(recurrent),
    )


CHUNK, FUSED_RECURRENT = _spec("chunk"), _spec("fused_recurrent")


@register(CHUNK)
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
        cu_seqlens_cpu (Optional[torch.LongTensor]): a CPU copy of `cu_seqlens`: no host sync then.
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
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return _rwkv6_run(CHUNK, r, k, v, w, u, scale, initial_state, output_final_state, False, cu_seqlens, backend)


@register(FUSED_RECURRENT)
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
    return _rwkv6_run(FUSED_RECURRENT, r, k, v, w, u, scale, initial_state, output_final_state, bool(reverse),
                      cu_seqlens, backend)
