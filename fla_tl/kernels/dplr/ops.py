"""The generalized delta rule's public ops (fla's `generalized_delta_rule`): diagonal plus low rank
(`chunk_dplr_delta_rule`, `fused_recurrent_dplr_delta_rule`) and identity plus low rank (`chunk_iplr_delta_rule`,
`fused_recurrent_iplr_delta_rule`), on one kernel-level call (`SCHEMA`); RWKV-7's ops (`kernels.rwkv7`) call it too.

The kernel-level call: q, k, a, b `[B, T, H, K]`, v `[B, T, H, V]`, the log decay gk `[B, T, H, K]` (None: IPLR), the
initial state `[N, H, K, V]`, cu_seqlens, scale, output_final_state and reverse; it returns (o `[B, T, H, V]` in q's
dtype, the final state in fp32 (fp64 for fp64 inputs) or None). Its TileLang kernels (the per-key gated WY stages with
the low-rank term) are not built yet: the tilelang entries refuse with that reason and the torch backend runs the
chunked form of `fla_tl.reference.dplr`, with every gradient.
"""

import math

import torch

from ...reference.dplr import chunk_dplr_torch, recurrent_dplr
from ...registry import (
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
from ..common.state_op import empty_run

SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? gk, Tensor? initial_state, Tensor? cu_seqlens, "
          "float scale, bool output_final_state, bool reverse")
GRADS = ("q", "k", "v", "a", "b", "gk", "initial_state")
NOT_BUILT = ("the generalized delta rule's TileLang kernels (the per-key gated WY stages with a low-rank term) are "
             "not built yet: the torch backend runs its chunked PyTorch form")


def validate_dplr(q, k, v, a, b, gk, scale, initial_state, cu_seqlens, names=("q", "k", "v", "a", "b", "gk")) -> int:
    """the checks of the generalized delta rule's ops (`names`: the arguments' names in the caller's terms, RWKV-7's
    r, w); returns N."""
    try:
        N = validate_linear_attention_inputs(q, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                             g=gk, g_per_key=True, g_name=names[5])
    except (TypeError, ValueError) as e:
        if names[0] == "q":
            raise
        # the shared checks name the query `q`: the caller's name for it (RWKV-7's r)
        raise type(e)(str(e).replace("`q`", f"`{names[0]}`")) from None
    for name, x in ((names[3], a), (names[4], b)):
        check_tensor(name, x)
        check_device(name, x, q.device, names[0])
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"`{name}` must have shape [B, T, H, K] = {list(q.shape)}, got {tuple(x.shape)}")
    return N


def _describe(args: dict, backward: bool):
    return describe_inputs(args["q"], args["v"], args["initial_state"], args["cu_seqlens"], backward,
                           reverse=args["reverse"])


def _fake(args: dict) -> list:
    q, v, h0, cu = args["q"], args["v"], args["initial_state"], args["cu_seqlens"]
    B, T, H, K = q.shape
    o = q.new_empty(*q.shape[:3], v.shape[-1])
    if not args["output_final_state"]:
        return [o, None]
    N = h0.shape[0] if h0 is not None else (cu.shape[0] - 1 if cu is not None else B)
    return [o, q.new_empty(N, H, K, v.shape[-1], dtype=reference_dtype(q.dtype))]


def _dplr_torch(q, k, v, a, b, gk, initial_state, cu_seqlens, scale, output_final_state, reverse):
    o, ht = chunk_dplr_torch(q, k, v, a, b, gk, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu_seqlens)
    return o.to(q.dtype), ht


def _reference(q, k, v, a, b, gk=None, **kwargs):
    return recurrent_dplr(q, k, v, a, b, gk, **kwargs)


def dplr_inputs(B, T, H, K, V, *, device, lens=None, gated=True) -> dict:
    """random inputs of the generalized delta rule (fp32): q, L2-normalised k, v, the low-rank pair a = -kk,
    b = kk * rate (kk normalised, rate in [0, 1): a stable transition), logsigmoid decays gk (with `gated`), an initial
    state; packed sequences of `lens` (B = 1)."""
    if lens is not None:
        B, T = 1, sum(lens)
    N = len(lens) if lens is not None else B
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    args = dict(q=torch.randn(B, T, H, K, device=device),
                k=torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device), dim=-1),
                v=torch.randn(B, T, H, V, device=device), a=-kk, b=kk * torch.rand(B, T, H, K, device=device),
                initial_state=torch.randn(N, H, K, V, device=device))
    if gated:
        args["gk"] = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=device) + 2)
    if lens is not None:
        args["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
    return args


def cases_of(make, reference, grad: tuple[str, ...]):
    """the `check` cases of an op whose arguments `make(args)` forms from `dplr_inputs`' (every floating tensor cast
    to the case's dtype): dense with an initial state, and packed sequences (an empty and a one-token one)."""

    def cases(device, dtype):
        found = []
        for label, B, lens in (("dense", 2, None), ("varlen", 1, (30, 0, 39, 1))):
            args = make(dplr_inputs(B, 37, 2, 16, 12, device=device, lens=lens))
            args = {n: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                    for n, x in args.items()}
            found.append(Case(label, {**args, "output_final_state": True}, grad, reference, dtype=dtype,
                              out_dtypes={"o": dtype, "ht": reference_dtype(dtype)}))
        return found

    return cases


def dplr_spec(name: str, variant: str, mode: str, cases) -> OpSpec:
    recurrent = mode == "fused_recurrent"
    return OpSpec(
        name=name, variant=variant, mode=mode, reference=recurrent_dplr,
        backends=[refusing_backend("tilelang", tilelang_capabilities(reverse=recurrent), NOT_BUILT),
                  torch_backend(_dplr_torch, torch_capabilities(reverse=recurrent), "the chunked PyTorch form")],
        schema=SCHEMA, outputs=2, grads=GRADS, describe=_describe, fake=_fake, kernels=lambda D, dtype: [],
        cases=cases,
    )


_DPLR_CASES = cases_of(lambda x: x, _reference, ("q", "k", "v", "a", "b", "gk", "initial_state"))
_IPLR_CASES = cases_of(lambda x: {n: t for n, t in x.items() if n != "gk"}, _reference,
                       ("q", "k", "v", "a", "b", "initial_state"))
CHUNK = dplr_spec("chunk_dplr_delta_rule", "dplr", "chunk", _DPLR_CASES)
FUSED_RECURRENT = dplr_spec("fused_recurrent_dplr_delta_rule", "dplr", "fused_recurrent", _DPLR_CASES)
CHUNK_IPLR = dplr_spec("chunk_iplr_delta_rule", "dplr", "chunk", _IPLR_CASES)
FUSED_RECURRENT_IPLR = dplr_spec("fused_recurrent_iplr_delta_rule", "dplr", "fused_recurrent", _IPLR_CASES)


def dplr_run(spec, q, k, v, a, b, gk, scale, initial_state, output_final_state, reverse, cu_seqlens, backend,
             names=("q", "k", "v", "a", "b", "gk")):
    """validate, then the kernel-level call of `spec` (`names`: the caller's argument names for the errors)."""
    N = validate_dplr(q, k, v, a, b, gk, scale, initial_state, cu_seqlens, names)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    args = dict(q=q, k=k, v=v, a=a, b=b, gk=gk, initial_state=initial_state, cu_seqlens=cu_seqlens,
                scale=float(scale), output_final_state=bool(output_final_state), reverse=bool(reverse))
    if T == 0:
        return empty_run(spec, args, (q, k, v, a, b, gk, initial_state), backend, (N, H, K, v.shape[-1]),
                         output_final_state)
    o, ht = spec.run(backend, **args)
    return o, (ht if output_final_state else None)


def _chunk_options(name: str, chunk_size, lower_bound, cp_context, kwargs: dict) -> None:
    """fla's checks of the chunked ops' options; `cp_context` raises until context parallelism exists."""
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    if kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(kwargs)}")
    if cp_context is not None:
        raise NotImplementedError(f"{name}: `cp_context` (context parallelism) is not supported by fla_tl")
    if lower_bound is not None and not lower_bound < 0:
        raise ValueError(f"`lower_bound` must be negative (gk is a log-decay < 0), got {lower_bound}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
                                   or chunk_size & (chunk_size - 1)):
        raise ValueError(f"`chunk_size` must be a power of 2, got {chunk_size}.")


# ---------------------------------------------------------------------------------------------- the public ops


@register(CHUNK)
def chunk_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    safe_gate: bool = False,
    chunk_size: int | None = None,
    disable_recompute: bool = False,
    cp_context=None,
    lower_bound: float | None = None,
    backend: str | None = None,
    **kwargs,
):
    r"""
    The generalized delta rule with a diagonal-plus-low-rank transition, per sequence and head:
    `S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`, `o_t = S_t^T (scale q_t)` (the low-rank term reads
    the state before the decay, as fla's `naive.py`).

    Args:
        q, k, a, b (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        gk (torch.Tensor): the log decay `[B, T, H, K]`.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. output_final_state (bool): Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. cu_seqlens_cpu: a CPU copy of it.
        safe_gate, chunk_size, disable_recompute, lower_bound: fla's tuning options, checked as fla checks them (a
            power-of-2 `chunk_size`, a negative `lower_bound`); the result does not depend on them.
        cp_context: not supported (raises).
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None` (automatic / `FLA_TL_BACKEND`). The TileLang
            kernels are not built yet: the torch backend runs the chunked PyTorch form, with every gradient.

    Returns:
        o `[B, T, H, V]` in q's dtype; the final state `[N, H, K, V]` in float32, or `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> q, k, v = torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32)
        >>> kk = F.normalize(torch.randn(2, 64, 2, 32), dim=-1)
        >>> gk = F.logsigmoid(torch.randn(2, 64, 2, 32))
        >>> o, ht = chunk_dplr_delta_rule(q, k, v, -kk, kk * torch.rand(2, 64, 2, 32), gk, output_final_state=True)
        >>> q, k, v, kk, gk = (x.flatten(0, 1)[None] for x in (q, k, v, kk, gk))
        >>> o, _ = chunk_dplr_delta_rule(q, k, v, -kk, kk, gk, cu_seqlens=torch.tensor([0, 50, 128]))
    """
    _chunk_options("chunk_dplr_delta_rule", chunk_size, lower_bound, cp_context, kwargs)
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return dplr_run(CHUNK, q, k, v, a, b, gk, scale, initial_state, output_final_state, False, cu_seqlens, backend)


@register(FUSED_RECURRENT)
def fused_recurrent_dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    :func:`chunk_dplr_delta_rule`'s recurrence token by token; `reverse=True` runs each sequence from its last token
    to its first. Same arguments (`q`, `k`, `v`, `a`, `b`, `gk`, `scale`, `initial_state`, `output_final_state`,
    `cu_seqlens`) and returns.

    Examples::
        >>> q, k, v = torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32)
        >>> a, b, gk = -torch.rand(1, 16, 2, 32), torch.rand(1, 16, 2, 32), -torch.rand(1, 16, 2, 32)
        >>> o, ht = fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk, output_final_state=True)
    """
    return dplr_run(FUSED_RECURRENT, q, k, v, a, b, gk, scale, initial_state, output_final_state, reverse, cu_seqlens,
                    backend)


@register(CHUNK_IPLR)
def chunk_iplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
):
    r"""
    The generalized delta rule with an identity-plus-low-rank transition (no decay):
    `S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T`, `o_t = S_t^T (scale q_t)`. Arguments and returns as
    :func:`chunk_dplr_delta_rule` without `gk`; `chunk_size` (a power of 2) is accepted. Unlike fla 0.6.0 it has a
    backward.

    Examples::
        >>> q, k, v = torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32)
        >>> kk = torch.nn.functional.normalize(torch.randn(1, 16, 2, 32), dim=-1)
        >>> o, ht = chunk_iplr_delta_rule(q, k, v, -kk, kk * 0.5, output_final_state=True)
    """
    chunk_size = kwargs.pop("chunk_size", None)
    _chunk_options("chunk_iplr_delta_rule", chunk_size, None, None, kwargs)
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return dplr_run(CHUNK_IPLR, q, k, v, a, b, None, scale, initial_state, output_final_state, False, cu_seqlens,
                    backend)


@register(FUSED_RECURRENT_IPLR)
def fused_recurrent_iplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    :func:`chunk_iplr_delta_rule`'s recurrence token by token; same arguments and returns (`scale` must be positive,
    as fla asserts).

    Examples::
        >>> q, k, v = torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32), torch.randn(1, 16, 2, 32)
        >>> o, ht = fused_recurrent_iplr_delta_rule(q, k, v, -torch.rand(1, 16, 2, 32) * 0.1,
        ...                                         torch.rand(1, 16, 2, 32) * 0.1, output_final_state=True)
    """
    if isinstance(scale, (int, float)) and math.isfinite(scale) and not scale > 0:
        raise ValueError(f"`scale` must be positive, got {scale!r}")
    return dplr_run(FUSED_RECURRENT_IPLR, q, k, v, a, b, None, scale, initial_state, output_final_state, False,
                    cu_seqlens, backend)
