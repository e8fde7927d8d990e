"""Based and ReBased (polynomial scores) and simple GLA's attention form: the CPU tests against token-by-token
linear-attention recurrences on the explicit feature maps, the GPU tests of the attention-form kernels against the
fp64 attention form; API and validation."""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import BackendError, fused_chunk_based, parallel_based, parallel_rebased, parallel_simple_gla
from fla_tl.reference import recurrent_simple_gla
from fla_tl.reference.based import recurrent_based, recurrent_rebased

from test_retention import _cu
from utils import Case, assert_close, assert_matches


def _qkv(B=2, T=70, H=2, K=16, V=24, dtype=torch.float64):
    q, k = (torch.randn(B, T, H, K).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V).to(dtype).requires_grad_()
    return q, k, v


def _compare(fn, ref, inputs, **kw):
    """fn against the fp64 recurrence ref: o and the gradients of q, k, v (fp64 inputs)."""
    q, k, v = inputs
    assert_matches(fn, Case(fn.__name__, dict(q=q, k=k, v=v, **kw), ("q", "k", "v"), ref, outputs=("o",)))


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
    # fused_chunk_based: the chunked feature kernels, K <= 16 (fla's limit) and V <= 256, with a backward
    tl = get_op("fused_chunk_based").backend("tilelang")
    for K, V in ((16, 64), (5, 24), (16, 256)):
        assert tl.verifier(OpInputs(**{**h100.__dict__, "K": K, "V": V, "backward": True})) == [], (K, V)
    assert "K = 32 > 16" in tl.verifier(OpInputs(**{**h100.__dict__, "K": 32}))[-1]
    assert tl.verifier(OpInputs(**{**h100.__dict__, "V": 257})) == ["head dim V = 257 exceeds 256"]
    # parallel_based / parallel_rebased: the attention-form kernels, K <= 128 and V <= 256, with a backward
    for name in ("parallel_based", "parallel_rebased"):
        tl = get_op(name).backend("tilelang")
        for K, V in ((16, 64), (32, 48), (100, 256), (128, 128)):
            assert tl.verifier(OpInputs(**{**h100.__dict__, "K": K, "V": V, "backward": True})) == [], (name, K, V)
        assert "K = 129 > 128" in tl.verifier(OpInputs(**{**h100.__dict__, "K": 129}))[-1]
        assert tl.verifier(OpInputs(**{**h100.__dict__, "V": 257})) == ["head dim V = 257 exceeds 256"]
        reasons = tl.verifier(OpInputs(**{**h100.__dict__, "compute_capability": (8, 0), "varlen": True}))
        assert reasons == ["needs compute capability >= 9.0, got 8.0",
                           "does not support variable-length inputs (cu_seqlens)"]
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(BackendError, match="needs a cuda tensor"):
        parallel_based(q, k, v, backend="tilelang")


@pytest.mark.parametrize("K", [1, 5, 16])
def test_feature_tables(K):
    """fused_chunk_based's feature tables: the features `fc * xa[fi] * xa[fj]` of xa = [x, 1] give the Taylor score
    (phi(a) . phi(b) = 1 + a.b + (a.b)^2 / 2), and the chain-rule table gives autograd's gradient of G . phi(x)."""
    from fla_tl.kernels.based.fused_chunk import feature_dims, feature_tables

    fi, fj, fc, pi, pc = (torch.tensor(t, dtype=torch.float64 if isinstance(t[0], float) else torch.long)
                          for t in feature_tables(K))
    assert len(fi) == feature_dims(K) and len(pc) == len(pi) and len(pi) % (K + 1) == 0
    a, b = torch.randn(50, K, dtype=torch.float64), torch.randn(50, K, dtype=torch.float64)

    def phi(x):
        xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        return fc * xa[:, fi] * xa[:, fj]

    s = (a * b).sum(1)
    assert_close("p", (phi(a) * phi(b)).sum(1), 1 + s + s * s / 2, torch.float64)
    x = a.clone().requires_grad_()
    G = torch.randn(50, len(fi), dtype=torch.float64)
    want = torch.autograd.grad((phi(x) * G).sum(), x)[0]
    xa = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    got = torch.stack([sum(pc[d * (K + 1) + e] * G[:, pi[d * (K + 1) + e]] * xa[:, e] for e in range(K + 1))
                       for d in range(K)], 1)
    assert_close("dx", got, want, torch.float64)
    # the padding features are zero and the rows past K of the chain table are empty
    assert torch.all(fc[1 + K + K * (K + 1) // 2:] == 0) and torch.all(pc[K * (K + 1):] == 0)


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


@pytest.fixture
def poisoned_outputs(monkeypatch, poisoned_cuda):
    """the attention-form launchers allocate their outputs as NaN (and the freed cache holds NaN), so an element a
    kernel never writes fails the comparison."""
    from fla_tl.kernels.based import fused_chunk, parallel

    for module in (parallel, fused_chunk):
        monkeypatch.setattr(module, "_output", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                         dtype=dtype, device=device))


# (T, K, V): odd lengths (one token, a partial block, several blocks with a tail), padded K = 100, V = 48, and a
# V = 256 case (two value blocks in the forward, two warpgroups for dk, dv; a narrower key loop for fp32)
PARALLEL_CASES = [
    pytest.param(1, 32, 48, id="T1-K32-V48"),
    pytest.param(63, 64, 128, id="T63-K64-V128"),
    pytest.param(300, 100, 48, id="T300-K100-V48"),
    pytest.param(300, 128, 128, id="T300-K128-V128"),
    pytest.param(200, 64, 256, id="T200-K64-V256"),
]


def _check_parallel(fn, ref, T, K, V, dtype, **kwargs):
    """fn on the tilelang backend against ref (fp64, attention form) for fresh random q, k, v `[2, T, 3, *]`: every
    output (o, or o and z with `return_both`) and dq, dk, dv, for random output gradients."""
    q, k = (torch.randn(2, T, 3, K, device="cuda").to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(2, T, 3, V, device="cuda").to(dtype).requires_grad_()
    out = fn(q, k, v, backend="tilelang", **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    douts = [torch.randn_like(x) for x in outs]
    grads = torch.autograd.grad(outs, (q, k, v), douts)
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rout = ref(*r, **kwargs)
    routs = rout if isinstance(rout, tuple) else (rout,)
    rgrads = torch.autograd.grad(routs, r, [d.double() for d in douts])
    names = ("o", "z")[: len(outs)] + ("dq", "dk", "dv")
    # at T = 1 a normalised output is v p / (p + eps) with p the one score: its q, k gradients only carry the eps
    # term (Based: of eps's order; ReBased: p = s^2 can be eps-sized, where they swing with the rounding of p), too
    # ill-conditioned to compare; o and dv still are
    normalised = kwargs.get("use_norm", kwargs.get("use_normalize", False)) and not kwargs.get("return_both", False)
    skip = ("dq", "dk") if T == 1 and normalised else ()
    # fp32 inputs run TF32 products (as fla's Triton kernels): there, ReBased's normalised o = v s^2 / (s^2 + eps) at
    # T = 1 and its dv swing with the rounding of s near 0 (beyond the fp32 tolerance), so that case is held to TF32's
    # precision (the bf16 row of the table)
    tol_dtype = torch.bfloat16 if T == 1 and normalised and dtype == torch.float32 and fn is parallel_rebased else dtype
    for name, a, b in zip(names, (*outs, *grads), (*routs, *rgrads)):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
        if name not in skip:
            assert_close(name, a, b, tol_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("T", "K", "V"), PARALLEL_CASES)
def test_tilelang_parallel_based(T, K, V, dtype, use_norm, poisoned_outputs):
    from fla_tl.reference.based import parallel_based_torch

    _check_parallel(parallel_based, parallel_based_torch, T, K, V, dtype, use_norm=use_norm)


# (T, K, V): one token, a partial chunk, several chunks with a tail; K = 16 (fla's), 12 and 5 (the features' padding);
# V = 48 (a partial V tile), 128, 256 (two V tiles: dq, dk summed over them, dz in one)
FUSED_CHUNK_CASES = [
    pytest.param(1, 16, 48, id="T1-K16-V48"),
    pytest.param(63, 16, 128, id="T63-K16-V128"),
    pytest.param(300, 12, 48, id="T300-K12-V48"),
    pytest.param(200, 16, 256, id="T200-K16-V256"),
    pytest.param(130, 5, 24, id="T130-K5-V24"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(("T", "K", "V"), FUSED_CHUNK_CASES)
def test_tilelang_fused_chunk_based(T, K, V, dtype, use_norm, poisoned_outputs):
    from fla_tl.reference.based import parallel_based_torch

    _check_parallel(fused_chunk_based, parallel_based_torch, T, K, V, dtype, use_norm=use_norm)


@pytest.mark.gpu
def test_tilelang_fused_chunk_kernels_dz():
    """the differentiable (o, z) of the chunked kernels directly (the op's kernel-level call), with gradients on both
    (dz reaches dq, dk through the normaliser states and the chunk's scores)."""
    from fla_tl.reference.based import parallel_based_torch
    from fla_tl.registry import get_op

    q, k = (torch.randn(1, 200, 2, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 200, 2, 200, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    o, z = get_op("fused_chunk_based").run("tilelang", q=q, k=k, v=v, scale=0.3)
    assert o.dtype == z.dtype == torch.float32 and o.shape == v.shape and z.shape == q.shape[:3]
    do, dz = torch.randn_like(o), torch.randn_like(z)
    grads = torch.autograd.grad((o, z), (q, k, v), (do, dz))
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro = parallel_based_torch(*r, scale=0.3, use_norm=False)
    rz = parallel_based_torch(r[0], r[1], torch.ones_like(r[2][..., :1]), scale=0.3, use_norm=False)[..., 0]
    rgrads = torch.autograd.grad((ro, rz), r, (do.double(), dz.double()))
    for name, a, b in zip(("o", "z", "dq", "dk", "dv"), (o, z, *grads), (ro, rz, *rgrads)):
        assert_close(name, a, b, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(("use_scale", "use_normalize", "return_both"), [
    (True, True, False), (False, False, False), (True, False, False), (True, True, True),
], ids=["scale-norm", "plain", "scale", "both"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("T", "K", "V"), PARALLEL_CASES)
def test_tilelang_parallel_rebased(T, K, V, dtype, use_scale, use_normalize, return_both, poisoned_outputs):
    from fla_tl.reference.based import parallel_rebased_torch

    _check_parallel(parallel_rebased, parallel_rebased_torch, T, K, V, dtype, use_scale=use_scale,
                    use_normalize=use_normalize, return_both=return_both)


@pytest.mark.gpu
@pytest.mark.parametrize("based", [True, False], ids=["based", "rebased"])
def test_tilelang_parallel_kernels_dz(based):
    """the differentiable (o, z) of the kernels directly (the ops' kernel-level call), fp32 outputs, with gradients on
    both (dz reaches dp)."""
    from fla_tl.reference.based import parallel_based_torch, parallel_rebased_torch
    from fla_tl.registry import get_op

    q, k, v = (torch.randn(1, 130, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o, z = get_op("parallel_based" if based else "parallel_rebased").run("tilelang", q=q, k=k, v=v, scale=0.1)
    assert o.dtype == z.dtype == torch.float32 and o.shape == v.shape and z.shape == q.shape[:3]
    do, dz = torch.randn_like(o), torch.randn_like(z)
    grads = torch.autograd.grad((o, z), (q, k, v), (do, dz))
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    if based:
        # o, z of the reference: o from use_norm=False, z as the o of an all-ones v
        ro = parallel_based_torch(*r, scale=0.1, use_norm=False)
        rz = parallel_based_torch(r[0], r[1], torch.ones_like(r[2][..., :1]), scale=0.1, use_norm=False)[..., 0]
    else:
        ro, rz = parallel_rebased_torch(r[0] * 0.1, r[1], r[2], use_scale=False, return_both=True)
        ro, rz = ro.transpose(1, 2), rz.transpose(1, 2)
    rgrads = torch.autograd.grad((ro, rz), r, (do.double(), dz.double()))
    for name, a, b in zip(("o", "z", "dq", "dk", "dv"), (o, z, *grads), (ro, rz, *rgrads)):
        assert_close(name, a, b, torch.bfloat16)


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
