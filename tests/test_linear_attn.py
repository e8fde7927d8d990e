"""Linear attention (no decay), with and without fla's running key-sum normalisation.

CPU (fp64): the `torch` backend against the token-by-token recurrence; the normalisation against a plain per-token
loop (varlen, reverse, carried key sum). GPU (`gpu` marker): the `tilelang` backend against the fp32 recurrence.
"""

import pytest
import torch

from fla_tl.ops import chunk_linear_attn, fused_chunk_linear_attn, fused_recurrent_linear_attn
from fla_tl.reference import normalize_with_key_sum, recurrent_linear_attn

from test_retention import _cu, make_inputs
from utils import assert_close, check_op

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


# ---------------------------------------------------------------- the TileLang normalisation stages
#
# `fla_tl.kernels.linear_attn.normalize`'s `key_sum_normalize_fwd` / `_bwd`: their PyTorch glue (chunk prefixes per
# sequence, reverse) runs here on CPU with each kernel replaced by a PyTorch emulation of its contract; the kernels
# themselves run in the gpu test.


def _key_sum_normalize(o, q, k, scale, z_init, reverse, cu, **kw):
    """the normalisation stages as one differentiable function (forward and backward launchers)."""
    from fla_tl.kernels.linear_attn import normalize as Nm

    class Stages(torch.autograd.Function):
        @staticmethod
        def forward(ctx, o, q, k, z_init):
            y, z, den, zc = Nm.key_sum_normalize_fwd(o, q, k, scale, z_init, reverse, cu, **kw)
            ctx.save_for_backward(q, k, y, den, zc)
            ctx.has_z0 = z_init is not None
            return y, z

        @staticmethod
        def backward(ctx, dy, dz):
            q, k, y, den, zc = ctx.saved_tensors
            return Nm.key_sum_normalize_bwd(q, k, y, den, zc, dy, dz, scale=scale, has_z0=ctx.has_z0,
                                            reverse=reverse, cu_seqlens=cu, **kw)

    return Stages.apply(o, q, k, z_init)


def _emulated_kernel(factory, target, **kw):
    """a PyTorch function with the calling convention and the math of the TileLang kernel `factory` builds."""
    from fla_tl.kernels.linear_attn import normalize as Nm

    BT = kw.get("BT", 64)

    def chunks(cu, ci):
        for c, (n, j) in enumerate(ci.tolist()):
            t0 = int(cu[n]) + j * BT
            yield c, t0, min(int(cu[n + 1]) - t0, BT)

    name = factory.__name__
    if name == "chunk_scan_kernel":
        def run(x, w, init, cu, offsets, s, total):
            for n in range(len(cu) - 1):
                acc = init[n].clone() if kw["with_init"] else torch.zeros_like(total[n])
                nc = int(offsets[n + 1] - offsets[n])
                for j in (reversed(range(nc)) if kw["reverse"] else range(nc)):
                    t0 = int(cu[n]) + j * BT
                    xs = x[t0:min(t0 + BT, int(cu[n + 1]))].to(s.dtype)
                    s[int(offsets[n]) + j] = acc
                    acc = acc + (xs * w[t0:t0 + len(xs), :, None] if kw["weighted"] else xs).sum(0)
                total[n] = acc
    elif name == "normalize_fwd_kernel":
        def run(q, k, o, zc, cu, ci, y, den, scale):
            assert zc.shape[0] == ci.shape[0], "the kernel's zc and chunk_indices share their first extent (NT)"
            for c, t0, nv in chunks(cu, ci):
                qs, ks = q[t0:t0 + nv].to(den.dtype), k[t0:t0 + nv].to(den.dtype)
                a = torch.einsum("ihk,jhk->hij", qs, ks).tril()
                d = scale * (a.sum(-1).T + (qs * zc[c]).sum(-1)) + Nm.EPS
                den[t0:t0 + nv] = d
                y[t0:t0 + nv] = (o[t0:t0 + nv].to(d.dtype) / d[..., None]).to(y.dtype)
    elif name == "normalize_bwd_c_kernel":
        def run(dy, y, den, cu, ci, do, c, scale):
            do.copy_(dy / den[..., None].to(dy.dtype))
            c.copy_(-scale * (dy * y).sum(-1).to(c.dtype) / den)
    elif name == "normalize_bwd_dqk_kernel":
        def run(q, k, c, zc, rc, cu, ci, dq, dk):
            assert zc.shape[0] == rc.shape[0] == ci.shape[0], "zc, rc and chunk_indices share their first extent (NT)"
            for ch, t0, nv in chunks(cu, ci):
                cs = c[t0:t0 + nv]  # [nv, H]
                m = torch.ones(nv, nv, dtype=cs.dtype).tril()[None] * cs.T[:, :, None]  # [H, i, j] = c_i (j <= i)
                dq[t0:t0 + nv] = torch.einsum("hij,jhk->ihk", m, k[t0:t0 + nv].to(cs.dtype)) + cs[..., None] * zc[ch]
                dk[t0:t0 + nv] = torch.einsum("hij,ihk->jhk", m, q[t0:t0 + nv].to(cs.dtype)) + rc[ch]
    else:
        raise AssertionError(name)
    return run


@pytest.mark.parametrize("z0", [False, True], ids=["z0-none", "z0"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_normalize_stages_glue(monkeypatch, varlen, reverse, z0):
    """the normalisation stages with their kernels emulated in fp64 against the PyTorch stage: output, final key sum
    and the gradients of o, q, k and z0."""
    from fla_tl.kernels.linear_attn import normalize as Nm

    monkeypatch.setattr(Nm, "get_kernel", _emulated_kernel)
    monkeypatch.setitem(Nm.TORCH_TO_TL, torch.float64, "float64")
    lens = (3, 0, 70, 1, 130)
    B, T = (1, sum(lens)) if varlen else (2, 150)
    N = len(lens) if varlen else B
    q, o = (torch.randn(B, T, 2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k = torch.rand(B, T, 2, 5, dtype=torch.float64, requires_grad=True)
    cu = _cu(lens) if varlen else None
    z_init = torch.rand(N, 1, 2, 5, dtype=torch.float64, requires_grad=True) if z0 else None
    inputs = [x for x in (o, q, k, z_init) if x is not None]
    got = _key_sum_normalize(o, q, k, 0.3, z_init, reverse, cu, BT=16)
    want = normalize_with_key_sum(o, q, k, 0.3, z_init, reverse, cu)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    dy, dz = torch.randn_like(want[0]), torch.randn_like(want[1])
    g_got = torch.autograd.grad(got, inputs, (dy, dz))
    g_want = torch.autograd.grad(want, inputs, (dy, dz))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize(("varlen", "reverse", "dtype"), [
    (False, False, torch.bfloat16), (True, False, torch.bfloat16), (True, True, torch.bfloat16),
    (False, False, torch.float32), (True, True, torch.float32),
])
def test_normalize_kernels(varlen, reverse, dtype):
    """the TileLang normalisation against the PyTorch stage in fp32 (output, final key sum, gradients). q and k are
    positive, as the feature maps normalisation is meant for: with signed q the denominators come near zero and the
    fp32 path's TF32 products (about 1e-3 relative) blow up there."""
    lens = (1, 300, 0, 64, 1000, 77)
    B, T = (1, sum(lens)) if varlen else (2, 500)
    N = len(lens) if varlen else B
    cu = _cu(lens, "cuda") if varlen else None
    o = torch.randn(B, T, 4, 128, device="cuda").to(dtype).requires_grad_()
    q, k = (torch.rand(B, T, 4, 128, device="cuda").to(dtype).requires_grad_() for _ in range(2))
    z0 = torch.rand(N, 1, 4, 128, device="cuda", requires_grad=True)
    y, z = _key_sum_normalize(o, q, k, 128 ** -0.5, z0, reverse, cu)
    dy, dz = torch.randn_like(y), torch.randn_like(z)
    grads = torch.autograd.grad((y, z), (o, q, k, z0), (dy, dz))
    ref = [x.detach().float().requires_grad_() for x in (o, q, k, z0)]
    ry, rz = normalize_with_key_sum(ref[0], ref[1], ref[2], 128 ** -0.5, ref[3], reverse, cu)
    rgrads = torch.autograd.grad((ry, rz), ref, (dy.float(), dz))
    for name, a, b in zip(("y", "z", "do", "dq", "dk", "dz0"), (y, z, *grads), (ry, rz, *rgrads)):
        assert_close(name, a, b, dtype)
