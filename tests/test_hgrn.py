"""HGRN (`h_t = exp(g_t) * h_{t-1} + x_t`): the chunked torch form against the recurrence; API and validation."""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import BackendError, chunk_hgrn, fused_recurrent_hgrn
from fla_tl.reference import recurrent_hgrn

from test_retention import _cu
from utils import Case, assert_close, assert_matches


def _inputs(B, T, D, N=None, dtype=torch.float64, shift=2.0, device="cpu"):
    x = torch.randn(B, T, D, device=device).to(dtype).requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, D, device=device) + shift).to(dtype).requires_grad_()
    h0 = torch.randn(N or B, D, device=device).to(dtype).requires_grad_()
    return x, g, h0


def _check(fn, x, g, h0, cu=None, backend=None, dtype=None):
    """fn against the recurrence: o, the final state and the gradients of x, g, h0 (at the tolerance of `dtype`,
    default x's)."""
    args = dict(x=x, g=g, initial_state=h0, output_final_state=True, **({"cu_seqlens": cu} if cu is not None else {}))
    assert_matches(fn, Case(fn.__name__, args, ("x", "g", "initial_state"), recurrent_hgrn, dtype=dtype or x.dtype),
                   backend)


@pytest.mark.parametrize(("B", "T", "D"), [(2, 1, 8), (2, 63, 16), (1, 200, 33)])
@pytest.mark.parametrize("fn", [chunk_hgrn, fused_recurrent_hgrn], ids=["chunk", "fused_recurrent"])
def test_against_recurrence(fn, B, T, D):
    _check(fn, *_inputs(B, T, D))


def test_strong_gates_stay_finite():
    _check(chunk_hgrn, *_inputs(2, 150, 8, shift=-20))


def test_varlen():
    lens = (1, 70, 0, 64)
    x, g, h0 = _inputs(1, sum(lens), 12, N=len(lens))
    _check(fused_recurrent_hgrn, x, g, h0, _cu(lens))


def test_bf16():
    _check(chunk_hgrn, *_inputs(2, 100, 16, dtype=torch.bfloat16))


def test_bad_inputs():
    x, g, h0 = _inputs(2, 10, 4)
    with pytest.raises(ValueError, match=r"`g` must have the shape of `x`"):
        chunk_hgrn(x, g[:, :5])
    with pytest.raises(ValueError, match=r"`initial_state` must have shape \[N, D\] = \[2, 4\]"):
        chunk_hgrn(x, g, h0[:1])
    with pytest.raises(ValueError, match="B = 1"):
        fused_recurrent_hgrn(x, g, cu_seqlens=torch.tensor([0, 5, 10]))
    with pytest.raises(BackendError, match="tilelang"):
        chunk_hgrn(x, g, backend="tilelang")  # CPU tensors


# ---------------------------------------------------------------- gpu: the TileLang scan kernels, launcher level


@pytest.mark.gpu
@pytest.mark.parametrize(("lens", "D", "dtype"), [
    pytest.param((1,), 64, torch.bfloat16, id="T1-D64-bf16"),
    pytest.param((500,), 300, torch.bfloat16, id="T500-D300-bf16"),
    pytest.param((2048,), 1024, torch.float32, id="T2048-D1024-fp32"),
    pytest.param((1, 300, 0, 77), 256, torch.bfloat16, id="varlen-D256-bf16"),
])
def test_tilelang_fused_recurrent_kernels(lens, D, dtype, poisoned_cuda):
    from fla_tl.kernels.hgrn.fused_recurrent import fused_recurrent_hgrn_bwd, fused_recurrent_hgrn_fwd

    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    N = len(lens) if varlen else B
    cu = _cu(lens, "cuda") if varlen else None
    x = torch.randn(B, T, D, device="cuda").to(dtype)
    g = F.logsigmoid(torch.randn(B, T, D, device="cuda") + 2)  # fp32 gates
    h0 = torch.randn(N, D, device="cuda")
    o, ht = fused_recurrent_hgrn_fwd(x, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    dx, dg, dh0 = fused_recurrent_hgrn_bwd(x, g, o, do, dht, initial_state=h0, cu_seqlens=cu)
    r = [t.float().requires_grad_() for t in (x, g, h0)]
    ro, rht = recurrent_hgrn(*r, True, cu)
    rgrads = torch.autograd.grad((ro, rht), r, (do.float(), dht))
    for name, a, b in zip(("o", "ht", "dx", "dg", "dh0"), (o, ht, dx, dg, dh0), (ro, rht, *rgrads)):
        assert_close(name, a, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("fn", [chunk_hgrn, fused_recurrent_hgrn], ids=["chunk", "fused_recurrent"])
def test_tilelang_op(fn, varlen):
    """the public ops on the tilelang backend: output, final state and the gradients of x, g (fp32) and h0."""
    if varlen and fn is chunk_hgrn:
        pytest.skip("chunk_hgrn takes no cu_seqlens (as in fla)")
    lens = (1, 300, 0, 77)
    B, T = (1, sum(lens)) if varlen else (2, 500)
    N = len(lens) if varlen else B
    cu = _cu(lens, "cuda") if varlen else None
    x = torch.randn(B, T, 256, device="cuda").to(torch.bfloat16).requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, 256, device="cuda") + 2).requires_grad_()
    h0 = torch.randn(N, 256, device="cuda", requires_grad=True)
    # run_check also asserts each gradient's dtype: dx in x's (bf16), dg in g's (fp32)
    _check(fn, x, g, h0, cu, backend="tilelang", dtype=torch.bfloat16)
