"""RWKV6 (GLA's per-key decayed state read before the current token, plus the bonus `u`): the torch backend against
the token-by-token recurrence (fp64, CPU); the shift-and-bonus glue of the TileLang path on CPU (GLA's launchers
replaced by the reference); validation and the registry's refusals; the kernels the TileLang path launches (compile);
every gradient of both ops through the TileLang kernels against the fp32 recurrence (GPU)."""

import pytest
import torch
import torch.nn.functional as F
from test_retention import _cu, make_inputs
from utils import Case, assert_matches

from fla_tl.ops import BackendError, chunk_rwkv6, fused_recurrent_rwkv6
from fla_tl.reference import chunk_rwkv6_torch, recurrent_rwkv6
from fla_tl.testing import reference_dtype


def _wu(B, T, H, K, dtype=torch.float64, device="cpu", strong=False):
    """per-key log decays (RWKV6's w = -exp(x) style: weak, or about -20 per token with `strong`) and the bonus."""
    x = torch.randn(B, T, H, K, device=device)
    w = F.logsigmoid(x * 8 - 4) if strong else F.logsigmoid(x * 2 + 1)
    u = torch.randn(H, K, device=device)
    return w.to(dtype).requires_grad_(), u.to(dtype).requires_grad_()


def _check(fn, B, T, H, K, V, dtype, *, lens=None, h0=True, device="cpu", backend="torch", w_dtype=None,
           strong=False, **kwargs):
    varlen = lens is not None
    N = len(lens) if varlen else B
    r, k, v, state = make_inputs(B, T, H, K, V, dtype, device=device, N=N, h0=h0)
    w, u = _wu(B, T, H, K, w_dtype or dtype, device, strong)
    args = dict(r=r, k=k, v=v, w=w, u=u, initial_state=state, output_final_state=True,
                cu_seqlens=_cu(lens, device) if varlen else None, **kwargs)
    case = Case(fn.__name__, args, ("r", "k", "v", "w", "u", "initial_state"), recurrent_rwkv6, dtype=dtype,
                out_dtypes={"o": dtype, "ht": reference_dtype(dtype)})
    assert_matches(fn, case, backend)


@pytest.mark.parametrize(("B", "T", "H", "K", "V"), [(2, 1, 2, 16, 16), (2, 63, 2, 32, 16), (1, 130, 3, 20, 36)])
def test_chunk(B, T, H, K, V):
    _check(chunk_rwkv6, B, T, H, K, V, torch.float64)


def test_chunk_strong_decays_stay_finite():
    """decays near -20 per token: the chunked form's factors underflow to zero instead of overflowing."""
    _check(chunk_rwkv6, 1, 150, 2, 16, 16, torch.float64, strong=True)


def test_chunk_varlen():
    lens = (1, 63, 0, 70)
    _check(chunk_rwkv6, 1, sum(lens), 2, 16, 24, torch.float64, lens=lens)


@pytest.mark.parametrize("reverse", [False, True])
def test_fused_recurrent(reverse):
    _check(fused_recurrent_rwkv6, 2, 70, 2, 16, 24, torch.float64, reverse=reverse)


def test_fused_recurrent_varlen_no_h0():
    lens = (5, 0, 66)
    _check(fused_recurrent_rwkv6, 1, sum(lens), 2, 16, 8, torch.float64, lens=lens, h0=False, reverse=True)


def test_bf16_with_fp32_decays():
    _check(chunk_rwkv6, 2, 40, 2, 16, 16, torch.bfloat16, w_dtype=torch.float32)


def test_chunked_reference_matches_recurrence():
    r, k, v, h0 = make_inputs(2, 150, 2, 8, 8, torch.float64)
    w, u = _wu(2, 150, 2, 8)
    o, ht = chunk_rwkv6_torch(r, k, v, w, u, initial_state=h0, output_final_state=True, chunk_size=16)
    ro, rht = recurrent_rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, ro)
    torch.testing.assert_close(ht, rht)


def test_empty_sequence():
    r, k, v, h0 = make_inputs(2, 0, 2, 8, 8, torch.float32)
    w, u = _wu(2, 0, 2, 8, torch.float32)
    o, ht = chunk_rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 2, 8)
    torch.testing.assert_close(ht, h0.float())


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_shift_glue(varlen, reverse):
    """`kernels.rwkv6.bonus.rwkv6_fwd` / `rwkv6_bwd` (the one-token query shift, the first token's read of h0 and
    the bonus) with GLA's launchers replaced by the GLA reference give RWKV6's outputs and every gradient."""
    from fla_tl.kernels.rwkv6.bonus import rwkv6_bwd, rwkv6_fwd, shifted_fwd
    from fla_tl.reference import recurrent_gla

    def gla_fwd(q, k, v, *, g_gamma, scale, initial_state, output_final_state, cu_seqlens, g, **kw):
        o, ht = recurrent_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens, **kw)
        return o.to(q.dtype), ht

    def gla_bwd(q, k, v, do, dht, *, g_gamma, scale, initial_state, cu_seqlens, g, ht=None, **kw):
        xs = [x.detach().requires_grad_() for x in (q, k, v, g, initial_state) if x is not None]
        with torch.enable_grad():
            o, h = recurrent_gla(*xs[:4], scale=scale, initial_state=xs[4] if len(xs) > 4 else None,
                                 output_final_state=True, cu_seqlens=cu_seqlens, **kw)
            loss = (o * do).sum() + ((h * dht).sum() if dht is not None else 0)
            grads = torch.autograd.grad(loss, xs)
        return grads[0], grads[1], grads[2], grads[4] if len(grads) > 4 else None, grads[3]

    extra = lambda rev: {"reverse": rev}  # noqa: E731
    launchers = (shifted_fwd(gla_fwd, extra), gla_bwd, extra)
    lens = (1, 0, 16, 23)
    B, T, N = (1, sum(lens), len(lens)) if varlen else (2, 23, 2)
    cu = _cu(lens) if varlen else None
    for use_h0 in (False, True):
        r, k, v, h0 = make_inputs(B, T, 2, 8, 6, torch.float64, N=N, h0=use_h0)
        w, u = _wu(B, T, 2, 8)
        xs = [r, k, v, w, u] + ([h0] if use_h0 else [])
        with torch.no_grad():
            o, ht, kept = rwkv6_fwd(launchers, r, k, v, w, u, scale=0.3, initial_state=h0, output_final_state=True,
                                    reverse=reverse, cu_seqlens=cu, keep=True)
            do, dht = torch.randn_like(o), torch.randn_like(ht)
            grads = rwkv6_bwd(launchers, r, k, v, w, u, do, dht, scale=0.3, initial_state=h0, reverse=reverse,
                              cu_seqlens=cu, ht=ht, kept=kept)
        grads = grads[:5] + ((grads[5],) if use_h0 else ())
        ro, rht = recurrent_rwkv6(r, k, v, w, u, scale=0.3, initial_state=h0, output_final_state=True,
                                  reverse=reverse, cu_seqlens=cu)
        rgrads = torch.autograd.grad((ro, rht), xs, (do, dht))
        # the glue computes in fp32
        for name, a, b in zip(["o", "ht", "dr", "dk", "dv", "dw", "du", "dh0"], (o, ht, *grads), (ro, rht, *rgrads)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_inputs():
    r, k, v, _ = make_inputs(2, 10, 2, 8, 8, torch.float32, h0=False)
    w, u = _wu(2, 10, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"`w` must have shape \[B, T, H, K\] = \[2, 10, 2, 8\], got \(2, 10, 2\)"):
        chunk_rwkv6(r, k, v, torch.zeros(2, 10, 2), u)
    with pytest.raises(TypeError, match="`w` must be a torch.Tensor"):
        fused_recurrent_rwkv6(r, k, v, None, u)
    with pytest.raises(ValueError, match=r"`u` must have shape \[H, K\] = \[2, 8\], got \(2, 8, 1\)"):
        chunk_rwkv6(r, k, v, w, u[..., None])
    with pytest.raises(TypeError, match="`u` must be a floating-point torch.Tensor"):
        chunk_rwkv6(r, k, v, w, [1.0])
    with pytest.raises(TypeError, match="`r` must be a floating-point tensor"):
        chunk_rwkv6(r.int(), k, v, w, u)
    with pytest.raises(ValueError, match="`r` must have batch size B = 1"):
        chunk_rwkv6(r, k, v, w, u, cu_seqlens=torch.tensor([0, 10, 20]))
    with pytest.raises(ValueError, match=r"`initial_state` must have shape \[N, H, K, V\]"):
        fused_recurrent_rwkv6(r, k, v, w, u, initial_state=torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="`chunk_size` must be a power of 2, got 48"):
        chunk_rwkv6(r, k, v, w, u, chunk_size=48)
    with pytest.raises(DeprecationWarning, match="head_first"):
        chunk_rwkv6(r, k, v, w, u, head_first=False)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        chunk_rwkv6(r, k, v, w, u, chunk_sise=64)


def test_registry_refusals():
    from fla_tl.registry import OpInputs, get_op

    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0), gate=True)
    for name in ("chunk_rwkv6", "fused_recurrent_rwkv6"):
        assert get_op(name).backend("torch").verifier(h100) == []
        tl = get_op(name).backend("tilelang")
        assert tl.capabilities.dtypes == (torch.bfloat16, torch.float16, torch.float32)
        assert any("compute capability" in x for x in tl.verifier(
            OpInputs(device_type="cuda", dtype=torch.bfloat16, K=64, V=64, compute_capability=(8, 0), gate=True)))
        assert any("head dim" in x or "K" in x for x in tl.verifier(
            OpInputs(device_type="cuda", dtype=torch.bfloat16, K=512, V=64, compute_capability=(9, 0), gate=True)))
    assert not get_op("chunk_rwkv6").backend("tilelang").capabilities.reverse
    assert get_op("fused_recurrent_rwkv6").backend("tilelang").capabilities.reverse
    r, k, v, _ = make_inputs(1, 10, 2, 8, 8, torch.float32, h0=False)
    w, u = _wu(1, 10, 2, 8, torch.float32)
    with pytest.raises(BackendError, match="needs a cuda tensor"):
        chunk_rwkv6(r, k, v, w, u, backend="tilelang")
    with pytest.raises(BackendError, match="float64"):
        fused_recurrent_rwkv6(*(x.double() for x in (r, k, v, w, u)), backend="tilelang")


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize(("op", "reverse"), [("chunk_rwkv6", False), ("fused_recurrent_rwkv6", True)])
def test_compile_fullgraph(op, reverse, varlen):
    """the op inside `torch.compile(fullgraph=True)` (its custom ops `fla_tl::<op>_fwd` / `_bwd`) gives eager's
    outputs and gradients of every input; `torch.library.opcheck` of the forward custom op."""
    import fla_tl.ops as ops

    fn = getattr(ops, op)
    lens = (20, 0, 50)
    B, T, N = (1, sum(lens), len(lens)) if varlen else (2, 40, 2)
    cu = _cu(lens) if varlen else None
    r, k, v, h0 = make_inputs(B, T, 2, 8, 6, torch.float64, N=N)
    w, u = _wu(B, T, 2, 8)
    xs = [r, k, v, w, u, h0]
    kwargs = {"reverse": True} if reverse else {}

    def run(*xs):
        o, ht = fn(*xs[:5], initial_state=xs[5], output_final_state=True, cu_seqlens=cu, **kwargs)
        return o, ht

    torch._dynamo.reset()
    outs = [run(*xs), torch.compile(run, fullgraph=True, backend="aot_eager")(*xs)]
    cot = [torch.randn_like(x) for x in outs[0]]
    grads = [torch.autograd.grad(out, xs, cot) for out in outs]
    for a, b in zip([*outs[0], *grads[0]], [*outs[1], *grads[1]]):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(getattr(torch.ops.fla_tl, f"{op}_fwd").default,
                          (*xs[:5], h0, cu, 0.3, True, reverse, True, "torch"))


@pytest.mark.compile
@pytest.mark.compile_all
@pytest.mark.parametrize(("stage", "K", "V", "dtype", "reverse"), [
    ("fwd", 128, 128, "bfloat16", False),
    ("bwd", 100, 36, "float32", True),
    ("chunk_o", 100, 36, "float32", False),
])
def test_kernels_build_for_sm90a(stage, K, V, dtype, reverse):
    """RWKV6's own TileLang kernels (the shifted read of GLA's output / dq plus the bonus, forward and backward) and
    the bonus form of GLA's output kernel (chunk_rwkv6's forward) lower and build for sm_90a; the other GLA kernels
    they compose with are compile-tested in `test_kernels_compile.py`."""
    from fla_tl.kernels.common.utils import get_kernel
    from fla_tl.kernels.gla.chunk import chunk_gla_fwd_o_kernel
    from fla_tl.kernels.rwkv6 import bonus

    tgt = {"kind": "cuda", "arch": "sm_90a"}
    if stage == "chunk_o":
        kernel = get_kernel(chunk_gla_fwd_o_kernel, tgt, K=K, V=V, dtype=dtype, h_dtype=dtype, BT=64, bonus=True)
    else:
        factory = bonus.rwkv6_fwd_bonus_kernel if stage == "fwd" else bonus.rwkv6_bwd_bonus_kernel
        kernel = get_kernel(factory, tgt, K=K, V=V, dtype=dtype, reverse=reverse, BT=64)
    assert "__global__" in kernel.get_kernel_source()


GPU_CASES = [
    pytest.param((1,), 64, torch.bfloat16, False, id="T1-D64-bf16"),
    pytest.param((63,), 128, torch.bfloat16, False, id="T63-D128-bf16"),
    pytest.param((500,), 128, torch.bfloat16, False, id="T500-D128-bf16"),
    pytest.param((500,), 100, torch.float32, False, id="T500-D100-fp32"),
    pytest.param((500,), 128, torch.bfloat16, True, id="T500-D128-bf16-strong"),
    pytest.param((1, 300, 0, 77), 128, torch.bfloat16, False, id="varlen-D128-bf16"),
    pytest.param((130, 1, 64), 100, torch.float32, True, id="varlen-D100-fp32-strong"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize(("lens", "D", "dtype", "strong"), GPU_CASES)
def test_tilelang_chunk(lens, D, dtype, strong, h0, poisoned_cuda):
    """chunk_rwkv6 on the tilelang backend: o, the final state and dr, dk, dv, dw (fp32), du, dh0 against the fp32
    recurrence."""
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    _check(chunk_rwkv6, B, T, 2, D, D, dtype, lens=lens if varlen else None, h0=h0, device="cuda",
           backend="tilelang", w_dtype=torch.float32, strong=strong)


@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("lens", "D", "dtype", "strong"), GPU_CASES)
def test_tilelang_fused_recurrent(lens, D, dtype, strong, reverse, poisoned_cuda):
    """fused_recurrent_rwkv6 on the tilelang backend, both directions, against the fp32 recurrence."""
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    _check(fused_recurrent_rwkv6, B, T, 2, D, D, dtype, lens=lens if varlen else None, device="cuda",
           backend="tilelang", w_dtype=torch.float32, strong=strong, reverse=reverse)


@pytest.mark.gpu
def test_check_op_table_on_cuda():
    """`python -m fla_tl check`'s cases of both ops on the tilelang backend (varlen, h0, reverse)."""
    from fla_tl.registry import get_op
    from fla_tl.testing import run_check

    for name in ("chunk_rwkv6", "fused_recurrent_rwkv6"):
        spec = get_op(name)
        for dtype in (torch.bfloat16, torch.float32):
            for case in spec.cases(torch.device("cuda"), dtype):
                failed = [(r.name, r.detail) for r in run_check(spec.fn, case, "tilelang") if not r.passed]
                assert not failed, f"{name} {dtype} {case.label}: {failed}"
