"""Titans (linear memory): the chunked torch form against the token-by-token recurrence (fp64), against fla's
`chunk_titans_linear_ref` (when its source is at /tmp/fla or $FLA_SRC), the kernel glue with the kernel emulated,
validation, refusals, kernel builds, and the TileLang op against the fp32 recurrence on a GPU."""

import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import BackendError, chunk_titans_linear
from fla_tl.reference.titans import recurrent_titans_linear
from fla_tl.registry import OpInputs, get_op

from utils import Case, assert_close, assert_matches

SM90A = {"kind": "cuda", "arch": "sm_90a"}
NAMES = ("q", "k", "v", "w", "b", "theta", "alpha", "eta", "h0")


def _inputs(B=2, T=37, H=2, D=16, dtype=torch.float64, device="cpu", h0=True, scalar_shape=1):
    """random inputs in a stable range: unit-norm keys, small learning rates (fla's vn grows like D)."""
    q = torch.randn(B, T, H, D)
    k = F.normalize(torch.randn(B, T, H, D), dim=-1)
    v = torch.randn(B, T, H, D)
    w, b = 1 + 0.1 * torch.randn(H, D), 0.1 * torch.randn(H, D)
    shape = (B, T, H, 1) if scalar_shape else (B, T, H)
    theta = 0.05 * torch.rand(shape) / D ** 0.5
    alpha, eta = 0.2 * torch.rand(shape), 0.5 + 0.5 * torch.rand(shape)
    m0 = 0.1 * torch.randn(B, H, D, D) if h0 else None
    xs = dict(zip(NAMES, (q, k, v, w, b, theta, alpha, eta, m0)))
    return {n: (x.to(device=device, dtype=dtype if n not in ("h0",) else torch.float32 if dtype != torch.float64
                    else dtype).requires_grad_() if x is not None else None) for n, x in xs.items()}


def _check(x, chunk_size=16, backend="torch", eps=1e-6):
    """the op on x against the fp32/fp64 recurrence: o (in q's dtype), the final memory (fp32, fp64 for fp64) and
    every gradient (in its input's dtype and shape)."""
    dtype = x["q"].dtype
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = {**{n: x[n] for n in NAMES[:8]}, "initial_state": x["h0"], "eps": eps, "chunk_size": chunk_size,
            "output_final_state": True}
    grad = [n for n in (*NAMES[:8], "initial_state") if args[n] is not None]
    assert_matches(chunk_titans_linear, Case("titans", args, tuple(grad), recurrent_titans_linear, dtype=dtype,
                                             out_dtypes={"o": dtype, "ht": ref_dtype}), backend)


# ---------------------------------------------------------------- CPU: the torch backend against the recurrence


@pytest.mark.parametrize(("T", "chunk_size"), [(1, 16), (15, 16), (16, 16), (37, 16), (63, 16), (40, 8), (70, 32)])
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "no-h0"])
def test_chunk(T, chunk_size, h0):
    _check(_inputs(T=T, h0=h0), chunk_size=chunk_size)


def test_chunk_scalars_without_last_dim_and_flat_w():
    x = _inputs(T=20, D=8, scalar_shape=0)
    x["w"] = x["w"].detach().reshape(-1).requires_grad_()
    _check(x)


def test_eps_and_fp32():
    _check(_inputs(T=33, dtype=torch.float32), eps=1e-3)


def test_empty_sequence():
    x = _inputs(T=0)
    o, ht = chunk_titans_linear(*(x[n] for n in NAMES[:8]), initial_state=x["h0"], output_final_state=True)
    assert o.shape == x["q"].shape and torch.equal(ht, x["h0"].detach())
    o, ht = chunk_titans_linear(*(x[n] for n in NAMES[:8]), output_final_state=True)
    assert ht.abs().sum() == 0


def _fla_naive():
    """fla's titans naive.py and log_impl.py, loaded on their own (fla's package import needs triton)."""
    root = os.environ.get("FLA_SRC", "/tmp/fla")
    path = os.path.join(root, "fla", "ops", "titans")
    if not os.path.exists(os.path.join(path, "naive.py")):
        pytest.skip(f"fla's source is not at {root} (set FLA_SRC)")
    saved = {n: sys.modules.get(n) for n in ("fla", "fla.ops", "fla.ops.titans", "fla.ops.titans.log_impl")}
    try:
        for name in ("fla", "fla.ops", "fla.ops.titans"):
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
        mods = {}
        for n in ("log_impl", "naive"):
            spec = importlib.util.spec_from_file_location(f"fla.ops.titans.{n}", os.path.join(path, f"{n}.py"))
            mods[n] = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mods[n]
            spec.loader.exec_module(mods[n])
        return mods["naive"]
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


@pytest.mark.parametrize(("T", "chunk_size", "h0"), [(32, 16, False), (48, 16, True), (40, 8, False), (37, 16, True)])
def test_matches_fla_reference(T, chunk_size, h0):
    """fla's chunk_titans_linear_ref (its chunk form and its token form), fp32, against ours in fp64. For T not a
    multiple of chunk_size only the outputs: fla pads the sequence and its final state includes the pad tokens."""
    naive = _fla_naive()
    x = {n: (t.detach() if t is not None else None) for n, t in _inputs(T=T, D=8, h0=h0).items()}
    ro, rht = recurrent_titans_linear(*(x[n] for n in NAMES[:8]), chunk_size=chunk_size, initial_state=x["h0"],
                                      output_final_state=True)
    f32 = [x[n].float() for n in NAMES[:8]]
    m0 = x["h0"].float() if h0 else None
    for use_chunk in (True, False):
        fo, fht = naive.chunk_titans_linear_ref(*f32, 1e-6, chunk_size, m0, True, use_chunk=use_chunk)
        assert_close("o", fo.double(), ro, torch.float32)
        if T % chunk_size == 0:
            assert_close("ht", fht.double(), rht, torch.float32)


# ---------------------------------------------------------------- CPU: the kernel glue, kernel emulated


def _ln(x, eps):
    xc = x - x.mean(-1, keepdim=True)
    s = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return xc / s, s


def _emulated_fwd(BT):
    """the forward kernel's signature and semantics in PyTorch (fp32, all sequences and heads at once)."""

    def run(q, k, v, w, bias, beta, f, A, gL, nL, cL, h0, o, ht, hm, hs, eps, use_h0, store_ht, store_h):
        B, T, H, D = q.shape
        NT = (T + BT - 1) // BT
        M = h0.view(B, H, D, D).clone() if use_h0 else q.new_zeros(B, H, D, D, dtype=torch.float32)
        S = torch.zeros_like(M)
        wv, bv = w[:, None], bias[:, None]
        for c, t0 in enumerate(range(0, T, BT)):
            L = min(BT, T - t0)
            if store_h:
                hm.view(B, H, NT, D, D)[:, :, c] = M.to(hm.dtype)
                hs.view(B, H, NT, D, D)[:, :, c] = S.to(hs.dtype)
            M, S = M.to(q.dtype).float(), S.to(q.dtype).float()  # the gemms see the states in q's dtype
            qc, kc, vc = (x[:, t0:t0 + L].float().transpose(1, 2) for x in (q, k, v))
            xh, std = _ln(kc @ M, eps)
            g = (wv * xh + bv - vc + kc) * wv
            vn = D * g - (g.sum(-1, keepdim=True) + xh * (g * xh).sum(-1, keepdim=True)) / (std * D)
            O = beta[:, :, c, :L, None] * (qc @ M) + f[:, :, c, :L, None] * (qc @ S) - 2 * A[:, :, c, :L, :L] @ vn
            o[:, t0:t0 + L] = (O + _ln(O, eps)[0] * wv + bv).transpose(1, 2).to(o.dtype)
            cc = cL[:, :, c, :, None, None]
            M, S = (cc[:, :, 0] * M + cc[:, :, 1] * S - 2 * (kc * gL[:, :, c, :L, None]).transpose(-1, -2) @ vn,
                    cc[:, :, 2] * S - 2 * (kc * nL[:, :, c, :L, None]).transpose(-1, -2) @ vn)
        if store_ht:
            ht.copy_(M.reshape(-1, D, D))

    return run


def _emulated_bwd(BT):
    """the backward kernel's signature and semantics in PyTorch: the reverse sweep over the stored states."""

    def run(q, k, v, do, w, bias, beta, f, A, gL, nL, cL, hm, hs, dht, dq, dk, dv, dout, vn_out, dbeta, df, dgL,
            dnL, dcL, dwb, dh0, eps, use_dht):
        B, T, H, D = q.shape
        NT = (T + BT - 1) // BT
        wv, bv = w[:, None], bias[:, None]
        dM = dht.view(B, H, D, D).clone() if use_dht else q.new_zeros(B, H, D, D, dtype=torch.float32)
        dS = torch.zeros_like(dM)
        dw, db = q.new_zeros(B, H, D, dtype=torch.float32), q.new_zeros(B, H, D, dtype=torch.float32)
        for c in reversed(range(NT)):
            t0 = c * BT
            L = min(BT, T - t0)
            M, S = (x.view(B, H, NT, D, D)[:, :, c].float() for x in (hm, hs))
            qc, kc, vc, doc = (x[:, t0:t0 + L].float().transpose(1, 2) for x in (q, k, v, do))
            bc, fc, Ac = beta[:, :, c, :L, None], f[:, :, c, :L, None], A[:, :, c, :L, :L]
            gc, nc = gL[:, :, c, :L, None], nL[:, :, c, :L, None]
            dcL[:, :, c, 0], dcL[:, :, c, 1], dcL[:, :, c, 2] = ((x * y).sum((-1, -2)) for x, y in
                                                                 ((dM, M), (dM, S), (dS, S)))
            xh, s = _ln(kc @ M, eps)
            U = wv * xh + bv - vc + kc
            g = U * wv
            s1, s2 = g.sum(-1, keepdim=True), (g * xh).sum(-1, keepdim=True)
            ci = 1 / (s * D)
            vn = D * g - (s1 + xh * s2) * ci
            QM, QS = qc @ M, qc @ S
            oh, so = _ln(bc * QM + fc * QS - 2 * Ac @ vn, eps)
            doh = doc * wv
            dO = doc + (doh - doh.mean(-1, keepdim=True) - oh * (doh * oh).mean(-1, keepdim=True)) / so
            dw += (doc * oh).sum(2)
            db += doc.sum(2)
            dbeta[:, :, c, :L], df[:, :, c, :L] = (dO * QM).sum(-1), (dO * QS).sum(-1)
            dvn = -2 * Ac.transpose(-1, -2) @ dO - 2 * (kc * gc) @ dM - 2 * (kc * nc) @ dS
            P, R = vn @ dM.transpose(-1, -2), vn @ dS.transpose(-1, -2)
            dgL[:, :, c, :L], dnL[:, :, c, :L] = -2 * (kc * P).sum(-1), -2 * (kc * R).sum(-1)
            p, r = dvn.sum(-1, keepdim=True), (dvn * xh).sum(-1, keepdim=True)
            dg = D * dvn - ci * (p + xh * r)
            dU = dg * wv
            dxh = -ci * s2 * dvn - ci * r * g + dU * wv
            dX = ((dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True)) / s
                  + ci * (p * s1 + r * s2) / s * xh / D)
            dw += (dg * U + dU * xh).sum(2)
            db += dU.sum(2)
            for out, val in ((dv, -dU), (dout, dO), (vn_out, vn),
                             (dk, dX @ M.transpose(-1, -2) + dU - 2 * gc * P - 2 * nc * R),
                             (dq, (bc * dO) @ M.transpose(-1, -2) + (fc * dO) @ S.transpose(-1, -2))):
                out[:, t0:t0 + L] = val.transpose(1, 2)
            cc = cL[:, :, c, :, None, None]
            dM, dS = (cc[:, :, 0] * dM + kc.transpose(-1, -2) @ dX + qc.transpose(-1, -2) @ (bc * dO),
                      cc[:, :, 1] * dM + cc[:, :, 2] * dS + qc.transpose(-1, -2) @ (fc * dO))
        dh0.copy_(dM.reshape(-1, D, D))
        dwb.copy_(torch.stack([dw, db], 2).reshape(-1, 2, D))

    return run


def _emulated_kernel(factory, target, **config):
    return (_emulated_bwd if "bwd" in factory.__name__ else _emulated_fwd)(config["BT"])


@pytest.mark.parametrize(("T", "chunk_size"), [(1, 16), (37, 16), (64, 16), (70, 32)])
@pytest.mark.parametrize("tl_backward", [True, False], ids=["tl-bwd", "torch-bwd"])
def test_kernel_glue_emulated(T, chunk_size, tl_backward, monkeypatch):
    """the launchers and the PyTorch glue (coefficients, in-chunk attention, their backward) with the kernels
    emulated in PyTorch; bf16 takes the TileLang backward, so bf16 inputs here (compared at the bf16 tolerance)."""
    pytest.importorskip("tilelang")
    from fla_tl.kernels.titans import chunk as C

    monkeypatch.setattr(C, "get_kernel", _emulated_kernel)
    monkeypatch.setattr(C, "TL_BACKWARD", tl_backward)
    x = _inputs(T=T, D=16, dtype=torch.bfloat16)
    args = {**{n: x[n].detach() for n in NAMES[:8]}, "initial_state": x["h0"].detach(), "eps": 1e-6,
            "chunk_size": chunk_size, "output_final_state": True}
    # the tilelang backend's forward and backward (its launchers and glue) as the registry runs them
    tl = get_op("chunk_titans_linear").backend("tilelang")
    outputs = list(tl.fwd(**args, requires_grad=True))
    assert len(outputs) == (4 if tl_backward else 2)  # o, ht, then the stored states (hm, hs) for the TileLang bwd
    o, ht = outputs[:2]
    r = [t.detach().float().requires_grad_() for t in (*(x[n] for n in NAMES[:8]), x["h0"])]
    ro, rht = recurrent_titans_linear(*r[:8], chunk_size=chunk_size, initial_state=r[8], output_final_state=True)
    assert_close("o", o, ro, torch.bfloat16)
    assert_close("ht", ht, rht, torch.bfloat16)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    found = tl.bwd(args, outputs, [do, dht])
    grads = [found[n] for n in (*NAMES[:8], "initial_state")]
    rgrads = torch.autograd.grad((ro, rht), r, (do.float(), dht))
    for n, a, e in zip(NAMES, grads, rgrads):
        assert a.dtype == x[n].dtype and a.shape == x[n].shape
        assert_close(f"d{n}", a, e, torch.bfloat16)


# ---------------------------------------------------------------- CPU: validation, registry, refusals


def _call(**change):
    x = {n: (t.detach() if t is not None else None) for n, t in _inputs(T=8, D=8).items()}
    kw = dict(q=x["q"], k=x["k"], v=x["v"], w=x["w"], b=x["b"], theta=x["theta"], alpha=x["alpha"], eta=x["eta"])
    kw.update(change)
    return chunk_titans_linear(**kw)


@pytest.mark.parametrize(("change", "error", "match"), [
    (dict(q=torch.randn(2, 8, 2)), ValueError, "`q` must have shape"),
    (dict(k=torch.randn(2, 8, 2, 4, dtype=torch.float64)), ValueError, "`k` must have the shape of `q`"),
    (dict(v=torch.randn(2, 8, 2, 8)), TypeError, "`v` must have the dtype of `q`"),
    (dict(w=torch.randn(3, 8, dtype=torch.float64)), ValueError, "`w` must have H \\* D = 16"),
    (dict(b=[1.0]), TypeError, "`b` must be a floating-point"),
    (dict(theta=torch.rand(2, 8, 3, 1, dtype=torch.float64)), ValueError, "`theta` must have shape"),
    (dict(eta=torch.ones(2, 8, 2, 1, dtype=torch.int64)), TypeError, "`eta` must be a floating-point"),
    (dict(eps=0.0), ValueError, "`eps` must be a positive number"),
    (dict(chunk_size=0), ValueError, "`chunk_size` must be a positive int"),
    (dict(chunk_size=16.0), ValueError, "`chunk_size` must be a positive int"),
    (dict(initial_state=torch.randn(2, 2, 8, 4)), ValueError, "`initial_state` must have shape"),
    (dict(backend="nope"), ValueError, "`backend` must be one of"),
])
def test_bad_inputs(change, error, match):
    with pytest.raises(error, match=match):
        _call(**change)


def test_registry_and_refusals(monkeypatch):
    from fla_tl import registry

    spec = get_op("chunk_titans_linear")
    assert spec.fn is chunk_titans_linear and [b.name for b in spec.backends] == ["tilelang", "torch"]
    with pytest.raises(BackendError, match="needs a cuda tensor"):
        _call(backend="tilelang")
    with pytest.raises(BackendError, match="chunk_size = 8 is not one of"):
        _call(backend="tilelang", chunk_size=8)
    monkeypatch.setattr(registry, "module_missing", lambda name: False)
    monkeypatch.setattr(registry, "import_reason", lambda module: None)
    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0),
                    initial_state=True, backward=True)
    tl = spec.backend("tilelang")
    assert tl.verifier(h100) == []
    reasons = tl.verifier(OpInputs(**{**h100.__dict__, "K": 72, "V": 72, "varlen": True}))
    assert any("cu_seqlens" in r for r in reasons) and any("D = 72" in r for r in reasons)
    assert any("exceeds 128" in r for r in tl.verifier(OpInputs(**{**h100.__dict__, "K": 256, "V": 256})))


# ---------------------------------------------------------------- compile: the kernels build for sm_90a


@pytest.mark.compile
@pytest.mark.compile_all
@pytest.mark.parametrize(("name", "config"), [
    ("titans_fwd_chunk_kernel", dict(D=128, dtype="bfloat16", BT=16)),
    ("titans_bwd_chunk_kernel", dict(D=64, dtype="float16", BT=16)),
], ids=["fwd-D128-bf16-BT16", "bwd-D64-fp16-BT16"])
def test_kernel_builds_for_sm90a(name, config):
    from fla_tl.kernels.common.utils import get_kernel
    from fla_tl.kernels.titans import chunk

    kernel = get_kernel(getattr(chunk, name), SM90A, **config)
    source = kernel.get_kernel_source()
    assert "__global__" in source and "producer_ws" not in source


# ---------------------------------------------------------------- GPU: the TileLang op against the fp32 recurrence


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "T", "H", "D", "chunk_size", "dtype", "h0"), [
    pytest.param(2, 1, 2, 64, 16, torch.bfloat16, True, id="T1-D64-bf16"),
    pytest.param(2, 63, 2, 128, 16, torch.bfloat16, True, id="T63-D128-bf16"),
    pytest.param(1, 500, 3, 128, 16, torch.bfloat16, False, id="T500-D128-bf16-noh0"),
    # fp16: dtheta sums vn ~ D over tokens; at T = 256 (D = 64 and 128) it overflows fp16
    pytest.param(2, 64, 2, 64, 16, torch.float16, True, id="T64-D64-fp16"),
    pytest.param(2, 300, 2, 64, 32, torch.float32, True, id="T300-D64-fp32-C32"),
    pytest.param(1, 100, 2, 128, 16, torch.float32, True, id="T100-D128-fp32"),
    pytest.param(1, 200, 2, 128, 64, torch.bfloat16, True, id="T200-D128-bf16-C64"),
])
def test_tilelang_chunk(B, T, H, D, chunk_size, dtype, h0, poisoned_cuda):
    _check(_inputs(B, T, H, D, dtype=dtype, device="cuda", h0=h0), chunk_size=chunk_size, backend="tilelang")


@pytest.mark.gpu
def test_cuda_torch_backend():
    _check(_inputs(2, 100, 2, 64, dtype=torch.bfloat16, device="cuda"), backend="torch")
