"""Linear attention (no decay), with and without fla's running key-sum normalisation.

CPU (fp64): the `torch` backend against the token-by-token recurrence; the normalisation against a plain per-token
loop (varlen, reverse, carried key sum). GPU (`gpu` marker): the `tilelang` backend against the fp32 recurrence.
"""

import pytest
import torch

from fla_tl.ops import chunk_linear_attn, fused_chunk_linear_attn, fused_recurrent_linear_attn
from fla_tl.reference import normalize_with_key_sum, recurrent_linear_attn

from test_retention import _cu, make_inputs
from utils import assert_close, check_op, poison_allocator

OPS = {
    "chunk": chunk_linear_attn,
    "fused_chunk": fused_chunk_linear_attn,
    "fused_recurrent": fused_recurrent_linear_attn,
}


def _normalize_loop(o, q, k, scale, z0, reverse, cu):
    """the normalisation token by token, per sequence (the definition)."""
    B, T, H, K = k.shape
    bounds = [(b, 0, T) for b in range(B)] if cu is None else [(0, s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    out, zs = torch.empty_like(o), []
    for n, (b, s, e) in enumerate(bounds):
        z = z0[n if cu is not None else b, 0].clone() if z0 is not None else k.new_zeros(H, K)
        order = range(e - 1, s - 1, -1) if reverse else range(s, e)
        for t in order:
            z = z + k[b, t]
            out[b, t] = o[b, t] / ((q[b, t] * scale * z).sum(-1, keepdim=True) + 1e-10)
        zs.append(z)
    return out, torch.stack(zs)[:, None]


@pytest.mark.parametrize("z0", [False, True], ids=["z0-none", "z0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_normalize_matches_the_definition(varlen, reverse, z0):
    lens = (3, 0, 7, 1)
    B, T = (1, sum(lens)) if varlen else (2, 9)
    N = len(lens) if varlen else B
    q, k, o = (torch.randn(B, T, 2, 5, dtype=torch.float64) for _ in range(3))
    cu = _cu(lens) if varlen else None
    z_init = torch.randn(N, 1, 2, 5, dtype=torch.float64) if z0 else None
    got, z = normalize_with_key_sum(o, q, k, 0.3, z_init, reverse, cu)
    want, z_want = _normalize_loop(o, q, k, 0.3, z_init, reverse, cu)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(z, z_want)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("op", list(OPS))
def test_torch_backend(op, normalize):
    q, k, v, h0 = make_inputs(2, 130, 2, 60, 100, torch.float64)
    if not normalize:
        check_op(OPS[op], recurrent_linear_attn, q, k, v, h0, backend="torch", normalize=False)
        return
    # keys positive so the denominators stay away from zero (fla uses feature maps such as elu + 1)
    k = k.detach().abs().requires_grad_()
    z0 = torch.rand(2, 1, 2, 60, dtype=torch.float64, requires_grad=True)
    o, (ht, z) = OPS[op](q, k, v, initial_state=(h0, z0), output_final_state=True, normalize=True, backend="torch")
    ro, (rht, rz) = recurrent_linear_attn(q, k, v, initial_state=(h0, z0), output_final_state=True, normalize=True)
    for name, a, b in (("o", o, ro), ("ht", ht, rht), ("z", z, rz)):
        assert_close(name, a, b, torch.float64)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, h0, z0), do)
    ref_grads = torch.autograd.grad(ro, (q, k, v, h0, z0), do)
    for name, a, b in zip(("dq", "dk", "dv", "dh0", "dz0"), grads, ref_grads):
        assert_close(name, a, b, torch.float64)


def test_defaults_and_returns():
    q, k, v, h0 = make_inputs(1, 20, 2, 8, 8, torch.float32)
    o, state = chunk_linear_attn(q, k, v)
    assert isinstance(state, tuple) and state[0] is None and state[1].shape == (1, 1, 2, 8)
    o, ht = fused_recurrent_linear_attn(q, k, v)
    assert ht is None
    o, (ht, z) = fused_recurrent_linear_attn(q, k, v, initial_state=h0, output_final_state=True, normalize=True)
    assert ht.shape == (1, 2, 8, 8) and z.shape == (1, 1, 2, 8)


def test_bad_key_sum_shape():
    q, k, v, h0 = make_inputs(2, 20, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"initial_state\[1\].*\[2, 1, 2, 8\]"):
        chunk_linear_attn(q, k, v, initial_state=(h0, torch.zeros(2, 2, 8)))
    with pytest.raises(TypeError, match="tuple"):
        chunk_linear_attn(q, k, v, initial_state=(h0, h0), normalize=False)


@pytest.mark.parametrize("op", list(OPS))
def test_varlen(op):
    lens = (1, 63, 0, 130)
    q, k, v, h0 = make_inputs(1, sum(lens), 2, 32, 48, torch.float64, N=len(lens))
    check_op(OPS[op], recurrent_linear_attn, q, k, v, h0, cu_seqlens=_cu(lens), backend="torch", normalize=False)


# ---------------------------------------------------------------- gpu


@pytest.fixture
def poisoned_cuda():
    poison_allocator("cuda")
    yield
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize(("T", "D", "dtype"), [
    pytest.param(63, 64, torch.bfloat16, id="T63-D64-bf16"),
    pytest.param(500, 100, torch.bfloat16, id="T500-D100-bf16"),
    pytest.param(2048, 128, torch.bfloat16, id="T2048-D128-bf16"),
    pytest.param(500, 128, torch.float32, id="T500-D128-fp32"),
])
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang(op, T, D, dtype, poisoned_cuda):
    q, k, v, h0 = make_inputs(2, T, 4, D, D, dtype, device="cuda")
    check_op(OPS[op], recurrent_linear_attn, q, k, v, h0, backend="tilelang", normalize=False)


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang_varlen_normalized(op, poisoned_cuda):
    lens = (1, 300, 0, 64, 1000, 77)
    q, k, v, h0 = make_inputs(1, sum(lens), 4, 128, 128, torch.bfloat16, device="cuda", N=len(lens))
    k = k.detach().abs().requires_grad_()
    cu = _cu(lens, "cuda")
    o, (ht, z) = OPS[op](q, k, v, initial_state=h0, output_final_state=True, normalize=True, cu_seqlens=cu,
                         backend="tilelang")
    ref = [x.detach().float() for x in (q, k, v, h0)]
    ro, (rht, rz) = recurrent_linear_attn(*ref[:3], initial_state=ref[3], output_final_state=True, normalize=True,
                                          cu_seqlens=cu)
    for name, a, b in (("o", o, ro), ("ht", ht, rht), ("z", z, rz)):
        assert_close(name, a, b, torch.bfloat16)
