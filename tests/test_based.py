"""Based and ReBased (polynomial feature maps) and simple GLA's attention form, against token-by-token linear-attention
recurrences on the explicit feature maps; API and validation."""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import BackendError, fused_chunk_based, parallel_based, parallel_rebased, parallel_simple_gla
from fla_tl.reference import recurrent_simple_gla
from fla_tl.reference.based import recurrent_based, recurrent_rebased

from test_retention import _cu
from utils import assert_close


def _qkv(B=2, T=70, H=2, K=16, V=24, dtype=torch.float64):
    q, k = (torch.randn(B, T, H, K).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V).to(dtype).requires_grad_()
    return q, k, v


def _compare(fn, ref, inputs, **kw):
    o = fn(*inputs, **kw)
    o = o[0] if isinstance(o, tuple) else o
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    r = [x.detach().double().requires_grad_() for x in inputs]
    ro = ref(*r, **kw)
    ro = ro[0] if isinstance(ro, tuple) else ro
    rgrads = torch.autograd.grad(ro, r, do.double())
    dtype = inputs[0].dtype
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
        assert_close(name, a, b, dtype)


@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("fn", [fused_chunk_based, parallel_based], ids=["fused_chunk", "parallel"])
def test_based(fn, use_norm):
    _compare(fn, recurrent_based, _qkv(), use_norm=use_norm)


@pytest.mark.parametrize(("use_scale", "use_normalize"), [(True, True), (False, False), (True, False)])
def test_rebased(use_scale, use_normalize):
    _compare(parallel_rebased, recurrent_rebased, _qkv(K=8), use_scale=use_scale, use_normalize=use_normalize)


def test_rebased_return_both_layout():
    q, k, v = _qkv(K=8)
    o, z = parallel_rebased(q, k, v, return_both=True)
    assert o.shape == (2, 2, 70, 24) and z.shape == (2, 2, 70)
    torch.testing.assert_close((o / (z[..., None] + 1e-5)).transpose(1, 2), parallel_rebased(q, k, v))


def test_long_sequence_blocks():
    """more queries than one block (512): the blocked attention still matches."""
    q, k, v = _qkv(B=1, T=700, H=1, K=4, V=8)
    _compare(parallel_based, recurrent_based, (q, k, v))


def test_feature_dim_limits():
    q, k, v = _qkv(K=32, dtype=torch.float32)
    with pytest.raises(ValueError, match="K must be <= 16"):
        fused_chunk_based(q, k, v)
    q, k, v = _qkv(K=130, dtype=torch.float32)
    for fn in (parallel_based, parallel_rebased):
        with pytest.raises(ValueError, match="K must be <= 128"):
            fn(q, k, v)


def test_tilelang_backend_refusals():
    from fla_tl.registry import OpInputs, get_op

    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=16, V=64, compute_capability=(9, 0))
    for name in ("fused_chunk_based", "parallel_based", "parallel_rebased"):
        tl = get_op(name).backend("tilelang")
        assert tl.verifier(h100) == []
        assert "K = 32 > 16" in tl.verifier(OpInputs(**{**h100.__dict__, "K": 32}))[-1]
        assert "V + 1" in tl.verifier(OpInputs(**{**h100.__dict__, "V": 256}))[-1]
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(BackendError, match="needs a cuda tensor"):
        parallel_based(q, k, v, backend="tilelang")


@pytest.mark.parametrize("based", [True, False], ids=["based", "rebased"])
def test_feature_map_composition(based):
    """the TileLang path's composition (feature maps, ones column, linear attention) on the torch linear attention."""
    from fla_tl.kernels.based import feature_attention

    q, k, v = _qkv(K=16)
    o, z = feature_attention(q, k, v, 0.25, based, backend="torch")
    if based:
        want = recurrent_based(q, k, v, scale=0.25, use_norm=False)
    else:
        want = recurrent_rebased(q * 0.25, k, v, use_scale=False, use_normalize=False)
    assert_close("o", o, want, torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["fused_chunk_based", "parallel_based", "parallel_rebased"])
def test_tilelang(name, dtype):
    from fla_tl import ops

    fn = getattr(ops, name)
    ref = recurrent_rebased if name == "parallel_rebased" else recurrent_based
    q, k, v = (torch.randn(2, 500, 4, 16 if i < 2 else 64, device="cuda").to(dtype).requires_grad_()
               for i in range(3))
    o = fn(q, k, v, backend="tilelang")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro = ref(*r)
    rgrads = torch.autograd.grad(ro, r, do.double())
    for n, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
        assert_close(n, a, b, dtype)


@pytest.mark.parametrize("gate", [True, False])
def test_parallel_simple_gla(gate):
    q, k, v = _qkv()
    g = F.logsigmoid(torch.randn(2, 70, 2, dtype=torch.float64)).requires_grad_() if gate else None
    o, attn = parallel_simple_gla(q, k, v, g, output_attentions=True)
    ro, _ = recurrent_simple_gla(q, k, v, g=g)
    assert_close("o", o, ro, torch.float64)
    assert attn.shape == (2, 2, 70, 70) and torch.equal(attn.triu(1), torch.zeros_like(attn))
    inputs = (q, k, v) + ((g,) if gate else ())
    grads = torch.autograd.grad(o, inputs, torch.ones_like(o))
    rgrads = torch.autograd.grad(ro, inputs, torch.ones_like(o))
    for a, b in zip(grads, rgrads):
        assert_close("grad", a, b, torch.float64)


def test_parallel_simple_gla_varlen():
    lens = (3, 0, 70, 1)
    q, k, v = _qkv(B=1, T=sum(lens))
    g = F.logsigmoid(torch.randn(1, sum(lens), 2, dtype=torch.float64))
    cu = _cu(lens)
    o, attn = parallel_simple_gla(q, k, v, g, cu_seqlens=cu)
    assert attn is None
    assert_close("o", o, recurrent_simple_gla(q, k, v, g=g, cu_seqlens=cu)[0], torch.float64)
    with pytest.raises(ValueError, match="output_attentions"):
        parallel_simple_gla(q, k, v, g, cu_seqlens=cu, output_attentions=True)


def test_parallel_simple_gla_backends():
    from fla_tl.registry import OpInputs, get_op

    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0))
    tl = get_op("parallel_simple_gla").backend("tilelang")
    assert tl.verifier(h100) == [] or "tilelang" in tl.verifier(h100)[-1]
    assert tl.verifier(OpInputs(**{**h100.__dict__, "gate": True})) == tl.verifier(h100)  # the gate runs there too
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(BackendError, match="materialise the attention"):
        parallel_simple_gla(q, k, v, output_attentions=True, backend="tilelang")


@pytest.mark.gpu
def test_parallel_simple_gla_tilelang():
    q, k, v = (torch.randn(2, 500, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = F.logsigmoid(torch.randn(2, 500, 4, device="cuda") + 2).requires_grad_()
    o, attn = parallel_simple_gla(q, k, v, g, backend="tilelang")
    assert attn is None
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, g), do)
    r = [x.detach().float().requires_grad_() for x in (q, k, v, g)]
    ro, _ = recurrent_simple_gla(*r[:3], g=r[3])
    rgrads = torch.autograd.grad(ro, r, do.float())
    for n, a, b in zip(("o", "dq", "dk", "dv", "dg"), (o, *grads), (ro, *rgrads)):
        assert_close(n, a, b, torch.bfloat16)
