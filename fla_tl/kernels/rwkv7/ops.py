"""RWKV-7's public ops (fla 0.6.0's `fla.ops.rwkv7`): `chunk_rwkv7`, `fused_recurrent_rwkv7` and
`fused_mul_recurrent_rwkv7`, on the generalized delta rule's kernel-level call (`dplr.ops`) with r for q and w for the
log decay gk; the `fused_mul` form forms the low-rank pair from kk and a first (`reference.dplr.rwkv7_low_rank`)."""

import torch

from ...reference.dplr import recurrent_dplr, rwkv7_low_rank
from ...registry import register
from ...utils import check_device, check_tensor, use_host_copy
from ..dplr.ops import _chunk_options, cases_of, dplr_run, dplr_spec

NAMES = ("r", "k", "v", "a", "b", "w")


def _rwkv7_reference(scale):
    """the reference in RWKV-7's names, with the op's default `scale` (None: K ** -0.5)."""

    def reference(r, w, k, v, a, b, **kwargs):
        return recurrent_dplr(r, k, v, a, b, w, **{"scale": scale, **kwargs})

    return reference


def _mul_reference(r, w, k, v, kk, a, **kwargs):
    return recurrent_dplr(r, k, v, *rwkv7_low_rank(kk, a), w, **{"scale": 1.0, **kwargs})


def _rwkv7_args(x: dict) -> dict:
    return dict(r=x.pop("q"), w=x.pop("gk"), **x)


def _mul_args(x: dict) -> dict:
    # the normalised key kk (dplr_inputs' a = -kk) and an in-context rate in [0, 1)
    x = _rwkv7_args(x)
    kk = -x.pop("a")
    x.pop("b")
    return {**x, "kk": kk, "a": torch.rand_like(kk)}


_GRAD = ("r", "w", "k", "v", "a", "b", "initial_state")
CHUNK = dplr_spec("chunk_rwkv7", "rwkv7", "chunk", cases_of(_rwkv7_args, _rwkv7_reference(1.0), _GRAD))
FUSED_RECURRENT = dplr_spec("fused_recurrent_rwkv7", "rwkv7", "fused_recurrent",
                            cases_of(_rwkv7_args, _rwkv7_reference(None), _GRAD))
FUSED_MUL_RECURRENT = dplr_spec("fused_mul_recurrent_rwkv7", "rwkv7", "fused_recurrent",
                                cases_of(_mul_args, _mul_reference, ("r", "w", "k", "v", "kk", "a", "initial_state")))


@register(CHUNK)
def chunk_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
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
):
    r"""
    RWKV-7's time mixing in chunks: `S_t = (Diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`,
    `o_t = S_t^T (scale r_t)` (:func:`fla_tl.ops.chunk_dplr_delta_rule` with q = r, gk = w).

    Args:
        r, k, a, b (torch.Tensor): `[B, T, H, K]`. w (torch.Tensor): the log decay `[B, T, H, K]`.
        v (torch.Tensor): `[B, T, H, V]`. scale (float): Default: `1.0`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. output_final_state (bool): Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. cu_seqlens_cpu: a CPU copy of it.
        safe_gate, chunk_size, disable_recompute, lower_bound: as :func:`fla_tl.ops.chunk_dplr_delta_rule`.
        cp_context: not supported (raises). backend (Optional[str]): `"tilelang"`, `"torch"` or `None`.

    Returns:
        o `[B, T, H, V]` in r's dtype; the final state `[N, H, K, V]` in float32, or `None`.

    Examples::
        >>> import torch.nn.functional as F
        >>> r, k, v = torch.randn(2, 64, 2, 64), torch.randn(2, 64, 2, 64), torch.randn(2, 64, 2, 64)
        >>> w = -F.softplus(torch.randn(2, 64, 2, 64)) - 0.5
        >>> kk = F.normalize(torch.randn(2, 64, 2, 64), dim=-1)
        >>> o, ht = chunk_rwkv7(r, w, k, v, -kk, kk * torch.rand(2, 64, 2, 64), output_final_state=True)
        >>> r, w, k, v, kk = (x.flatten(0, 1)[None] for x in (r, w, k, v, kk))
        >>> o, _ = chunk_rwkv7(r, w, k, v, -kk, kk, cu_seqlens=torch.tensor([0, 50, 128]))
    """
    _chunk_options("chunk_rwkv7", chunk_size, lower_bound, cp_context, {})
    use_host_copy(cu_seqlens, cu_seqlens_cpu)
    return dplr_run(CHUNK, r, k, v, a, b, w, scale, initial_state, output_final_state, False, cu_seqlens, backend,
                    NAMES)


@register(FUSED_RECURRENT)
def fused_recurrent_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    :func:`chunk_rwkv7` token by token, with fla's defaults here: `scale=None` (`K ** -0.5`) and
    `output_final_state=True`.

    Examples::
        >>> r, k, v = torch.randn(1, 16, 2, 64), torch.randn(1, 16, 2, 64), torch.randn(1, 16, 2, 64)
        >>> w, a, b = -torch.rand(1, 16, 2, 64), -torch.rand(1, 16, 2, 64) * 0.1, torch.rand(1, 16, 2, 64) * 0.1
        >>> o, ht = fused_recurrent_rwkv7(r, w, k, v, a, b)
    """
    return dplr_run(FUSED_RECURRENT, r, k, v, a, b, w, scale, initial_state, output_final_state, False, cu_seqlens,
                    backend, NAMES)


@register(FUSED_MUL_RECURRENT)
def fused_mul_recurrent_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
):
    r"""
    RWKV-7 token by token from its normalised key `kk` and in-context rate `a` (both `[B, T, H, K]`): the
    generalized delta rule with the low-rank pair (-kk, kk * a), `reverse` as
    :func:`fla_tl.ops.fused_recurrent_dplr_delta_rule`. Unlike fla 0.6.0 it has a backward (kk and a included).

    Examples::
        >>> import torch.nn.functional as F
        >>> r, k, v = torch.randn(1, 16, 2, 64), torch.randn(1, 16, 2, 64), torch.randn(1, 16, 2, 64)
        >>> w, kk = -torch.rand(1, 16, 2, 64), F.normalize(torch.randn(1, 16, 2, 64), dim=-1)
        >>> o, _ = fused_mul_recurrent_rwkv7(r, w, k, v, kk, torch.rand(1, 16, 2, 64))
    """
    for name, x in (("kk", kk), ("a", a)):
        check_tensor(name, x)
        if isinstance(r, torch.Tensor):
            check_device(name, x, r.device, "r")
            if x.shape != r.shape:
                raise ValueError(f"`{name}` must have shape [B, T, H, K] = {list(r.shape)}, got {tuple(x.shape)}")
    low_a, low_b = rwkv7_low_rank(kk, a)
    return dplr_run(FUSED_MUL_RECURRENT, r, k, v, low_a, low_b, w, scale, initial_state, output_final_state, reverse,
                    cu_seqlens, backend, ("r", "k", "v", "-kk", "kk * a", "w"))
