"""Linear attention's public ops: simple GLA's kernels with no decay, then (with `normalize`) the key-sum
normalisation of `normalize.py`, both inside one kernel-level call."""

import importlib

import torch

from ...reference.linear_attn import normalize_with_key_sum, recurrent_linear_attn, split_state
from ...registry import (
    Backend,
    OpSpec,
    check_backend_name,
    describe_inputs,
    register,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import reference_dtype
from ...utils import join_graph, validate_linear_attention_inputs
from ..common.state_op import SIMPLE_GLA_MODULES, simple_gla_form, stage_spec, state_cases, state_kernels

SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor? initial_state, Tensor? z0, Tensor? cu_seqlens, float scale, "
          "bool output_final_state, bool reverse, bool normalize")
NORMALIZE_MODULE = "fla_tl.kernels.linear_attn.normalize"


def _tilelang(mode: str) -> Backend:
    """simple GLA's launchers of `mode` with no decay, then the TileLang normalisation stages."""
    recurrent = mode == "fused_recurrent"

    def launchers():
        return importlib.import_module(SIMPLE_GLA_MODULES[mode]), importlib.import_module(NORMALIZE_MODULE)

    def state_options(reverse):
        return {"reverse": reverse, "state_v_first": False} if recurrent else {}

    def cu_int64(cu):
        return cu.to(torch.int64).contiguous() if cu is not None else None

    def fwd(q, k, v, initial_state, z0, cu_seqlens, scale, output_final_state, reverse, normalize, requires_grad):
        kernels, norm = launchers()
        o, ht = getattr(kernels, f"{mode}_simple_gla_fwd")(
            q.contiguous(), k.contiguous(), v.contiguous(), g_gamma=None, scale=scale,
            initial_state=initial_state.contiguous() if initial_state is not None else None,
            output_final_state=output_final_state, cu_seqlens=cu_int64(cu_seqlens), **state_options(reverse))
        if not normalize:
            return o, ht, None
        y, z, den, zc = norm.key_sum_normalize_fwd(o, q, k, scale, z0, reverse, cu_seqlens)
        return y, ht, z, den, zc

    def bwd(args, outputs, grads):
        kernels, norm = launchers()
        q, k, v, h0, cu = args["q"], args["k"], args["v"], args["initial_state"], args["cu_seqlens"]
        do, dht, dz = grads
        dq_n = dk_n = dz0 = None
        if args["normalize"]:
            y, _, _, den, zc = outputs
            do, dq_n, dk_n, dz0 = norm.key_sum_normalize_bwd(
                q, k, y, den, zc, do, dz, scale=args["scale"], has_z0=args["z0"] is not None, reverse=args["reverse"],
                cu_seqlens=cu)
        if do is None:
            do = torch.zeros(q.shape[:3] + v.shape[-1:], dtype=q.dtype, device=q.device)
        dq, dk, dv, dh0 = getattr(kernels, f"{mode}_simple_gla_bwd")(
            q.contiguous(), k.contiguous(), v.contiguous(), do.to(q.dtype).contiguous(),
            dht.contiguous() if dht is not None else None, g_gamma=None, scale=args["scale"],
            initial_state=h0.contiguous() if h0 is not None else None, cu_seqlens=cu_int64(cu),
            **state_options(args["reverse"]))[:4]
        if dq_n is not None:
            dq, dk = dq + dq_n, dk + dk_n
        return {"q": dq, "k": dk, "v": dv, "initial_state": dh0, "z0": dz0}

    def residuals(args, requires_grad):
        from .normalize import chunk_rows

        q = args["q"]
        if not args["normalize"]:
            return []
        B, T, H, K = q.shape
        N = _sequences(args)
        acc = torch.promote_types(q.dtype, torch.float32)
        return [q.new_empty(B * T, H, dtype=acc), q.new_empty(chunk_rows(B, T, N), H, K, dtype=acc)]

    caps = tilelang_capabilities(reverse=recurrent)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, residuals=residuals,
                   module=SIMPLE_GLA_MODULES[mode], description="the TileLang kernels")


def _form(q, k, v, initial_state, z0, cu_seqlens, scale, output_final_state, reverse, normalize):
    o, ht = simple_gla_form(q, k, v, None, None, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, reverse=reverse, state_v_first=False,
                            cu_seqlens=cu_seqlens)
    z = None
    if normalize:
        o, z = normalize_with_key_sum(o, q, k, scale, z0, reverse, cu_seqlens)
    return o.to(q.dtype), (ht.to(reference_dtype(q.dtype)) if ht is not None else None), z


def _sequences(args) -> int:
    q, h0, cu = args["q"], args["initial_state"], args["cu_seqlens"]
    return h0.shape[0] if h0 is not None else (cu.shape[0] - 1 if cu is not None else q.shape[0])


def _fake(args):
    q, v = args["q"], args["v"]
    B, T, H, K = q.shape
    N = _sequences(args)
    acc = reference_dtype(q.dtype)
    return [q.new_empty(B, T, H, v.shape[-1]),
            q.new_empty(N, H, K, v.shape[-1], dtype=acc) if args["output_final_state"] else None,
            q.new_empty(N, 1, H, K, dtype=acc) if args["normalize"] else None]


def _spec(mode: str) -> OpSpec:
    recurrent = mode == "fused_recurrent"
    return OpSpec(
        name=f"{mode}_linear_attn", variant="linear_attn", mode=mode, reference=recurrent_linear_attn,
        backends=[_tilelang(mode), torch_backend(_form, torch_capabilities(reverse=recurrent))],
        schema=SCHEMA, outputs=3, grads=("q", "k", "v", "initial_state", "z0"), saved_outputs=(0,),
        describe=lambda args, backward: describe_inputs(args["q"], args["v"], args["initial_state"],
                                                        args["cu_seqlens"], backward, args["reverse"]),
        fake=_fake,
        kernels=lambda D, dtype: state_kernels(D, dtype, (mode,)) + _normalize_kernels(D, dtype),
        cases=state_cases(recurrent_linear_attn, recurrent=recurrent,
                          extras=lambda B, T, H, device: [("", {}, {"normalize": False})]),
    )


def _normalize_kernels(D: int, dtype: str) -> list:
    """the key-sum normalisation's kernels at K = V = D: the key scan (plain and row-weighted, with and without an
    initial sum), the forward and the two backward passes."""
    scans = [stage_spec("linear_attn_key_scan", D, D, dtype, "none", weighted=weighted, reverse=weighted,
                        with_init=with_init) for weighted in (False, True) for with_init in (False, True)]
    return scans + [stage_spec(f"linear_attn_normalize_{kind}", D, D, dtype, "none")
                    for kind in ("fwd", "bwd_c", "bwd_dqk")]


CHUNK, FUSED_CHUNK, FUSED_RECURRENT = (_spec(mode) for mode in ("chunk", "fused_chunk", "fused_recurrent"))


def _linear_attn(spec, q, k, v, scale, initial_state, output_final_state, reverse, normalize, cu_seqlens, backend):
    h0, z0 = split_state(initial_state, normalize)
    N = validate_linear_attention_inputs(q, k, v, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens)
    B, T, H, K = q.shape
    if z0 is not None:
        want = (N, 1, H, K)
        if not isinstance(z0, torch.Tensor) or tuple(z0.shape) != want:
            got = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise ValueError(
                f"`initial_state[1]` (the key sum z) must have shape [N, 1, H, K] = {list(want)}, got {got}")
    scale = K ** -0.5 if scale is None else scale
    if T == 0:
        check_backend_name(spec, backend)
        acc = reference_dtype(q.dtype)
        o, ht, z = v.new_empty(B, 0, H, v.shape[-1]), None, None
        if output_final_state:
            ht = h0.to(acc, copy=True) if h0 is not None else q.new_zeros(N, H, K, v.shape[-1], dtype=acc)
        if normalize:
            _, z = normalize_with_key_sum(o, q, k, scale, z0, reverse, cu_seqlens)
        # no kernel runs; the outputs still reach the autograd graph of the inputs (zero gradients)
        o, ht, z = join_graph([o, ht, z], (q, k, v, h0, z0))
    else:
        o, ht, z = spec.run(backend, q=q, k=k, v=v, initial_state=h0, z0=z0, cu_seqlens=cu_seqlens,
                            scale=float(scale), output_final_state=bool(output_final_state), reverse=bool(reverse),
                            normalize=bool(normalize))
    ht = ht if output_final_state else None
    return (o, (ht, z)) if normalize else (o, ht)


@register(CHUNK)
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
    """
    return _linear_attn(CHUNK, q, k, v, scale, initial_state, output_final_state, False, normalize, cu_seqlens,
                        backend)


@register(FUSED_CHUNK)
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
        >>> cu_seqlens = torch.tensor([0, 9, 2000], device="cuda")
        >>> o, ht = fused_chunk_linear_attn(q, k, v, normalize=False, cu_seqlens=cu_seqlens)
    """
    return _linear_attn(FUSED_CHUNK, q, k, v, scale, initial_state, output_final_state, False, normalize, cu_seqlens,
                        backend)


@register(FUSED_RECURRENT)
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
        >>> cu_seqlens = torch.tensor([0, 10, 128], device="cuda")
        >>> o, (ht, z) = fused_recurrent_linear_attn(q, k, v, normalize=True, cu_seqlens=cu_seqlens)
    """
    return _linear_attn(FUSED_RECURRENT, q, k, v, scale, initial_state, output_final_state, reverse, normalize,
                        cu_seqlens, backend)
