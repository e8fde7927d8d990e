"""GSA (gated slot attention) and ABC: the torch backend and the chunked reference against the token-by-token
recurrence (CPU, fp64); validation and the registry's refusals; the tilelang backend (chunk_gla's stages composed in
`fla_tl.kernels.gsa`) against the fp32 recurrence on the GPU: o, both final states and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from test_retention import _cu
from utils import assert_close

from fla_tl.ops import BackendError, chunk_abc, chunk_gsa, fused_recurrent_gsa
from fla_tl.reference import chunk_gsa_torch, recurrent_abc, recurrent_gsa, slot_gates


def make_gsa_inputs(B, T, HQ, H, K, V, M, dtype, device="cpu", N=None, gate=True, h0=True, strong=False):
    """q `[B, T, HQ, K]`, k (L2-normalised), v, s, log gates g (or None) and the pair of initial states."""
    q = torch.randn(B, T, HQ, K, device=device)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v, s = torch.randn(B, T, H, V, device=device), torch.randn(B, T, H, M, device=device)
    x = torch.randn(B, T, H, M, device=device)
    g = F.logsigmoid(x * 8 - 4) if strong else F.logsigmoid(x * 2 + 1)
    xs = [t.to(dtype).requires_grad_() for t in (q, k, v, s)]
    # the gate in fp32 (fp64 on the fp64 path), as fla's tests pass it
    g = g.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_() if gate else None
    states = None
    if h0:
        states = tuple(torch.randn(shape, device=device).to(dtype).requires_grad_()
                       for shape in ((N or B, H, K, M), (N or B, H, M, V)))
    return (*xs, g, states)


def check_gsa(fn, q, k, v, s, g, h0, *, abc=False, backend=None, cu_seqlens=None, **kwargs):
    """fn against the fp32/fp64 recurrence: o, both final states, and the gradients of q, k, v, s, g, h0."""
    dtype = q.dtype
    if abc:
        o, ht = fn(q, k, v, s, initial_state=h0, output_final_state=True, backend=backend)
    else:
        o, ht = fn(q, k, v, s, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend,
                   **kwargs)
    assert o.dtype == dtype
    assert all(h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for h in ht)
    inputs = [q, k, v, s] + ([g] if g is not None else []) + (list(h0) if h0 is not None else [])
    names = ["q", "k", "v", "s"] + (["g"] if g is not None else []) + (["hk0", "hv0"] if h0 is not None else [])
    douts = [torch.randn_like(o), torch.randn_like(ht[0]), torch.randn_like(ht[1])]
    grads = torch.autograd.grad((o, *ht), inputs, douts)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    r = [x.detach().to(ref_dtype).requires_grad_() for x in inputs]
    rd = dict(zip(names, r))
    rh0 = (rd["hk0"], rd["hv0"]) if h0 is not None else None
    if abc:
        ro, rht = recurrent_abc(rd["q"], rd["k"], rd["v"], rd["s"], initial_state=rh0, output_final_state=True)
    else:
        ro, rht = recurrent_gsa(rd["q"], rd["k"], rd["v"], rd["s"], rd.get("g"), initial_state=rh0,
                                output_final_state=True, cu_seqlens=cu_seqlens, **kwargs)
    rgrads = torch.autograd.grad((ro, *rht), r, [d.to(ref_dtype) for d in douts])
    assert_close("o", o, ro, dtype)
    assert_close("hk", ht[0], rht[0], dtype)
    assert_close("hv", ht[1], rht[1], dtype)
    for name, a, b, x in zip(names, grads, rgrads, inputs):
        assert a.dtype == x.dtype, f"d{name}: dtype {a.dtype} != {x.dtype}"
        assert_close(f"d{name}", a, b, dtype)


# ---------------------------------------------------------------- CPU: the torch backend, fp64


@pytest.mark.parametrize(("B", "T", "HQ", "H", "K", "V", "M", "gate"), [
    pytest.param(2, 1, 2, 2, 16, 16, 8, True, id="T1"),
    pytest.param(2, 63, 4, 2, 16, 12, 8, True, id="T63-gqa"),
    pytest.param(1, 130, 2, 2, 20, 12, 6, True, id="T130-odd-dims"),
    pytest.param(2, 70, 2, 2, 16, 12, 8, False, id="T70-abc-gates"),
])
def test_chunk_gsa(B, T, HQ, H, K, V, M, gate):
    q, k, v, s, g, h0 = make_gsa_inputs(B, T, HQ, H, K, V, M, torch.float64, gate=gate)
    check_gsa(chunk_gsa, q, k, v, s, g, h0, backend="torch")


def test_chunk_gsa_varlen_strong_gates():
    lens = (1, 63, 0, 70)
    q, k, v, s, g, h0 = make_gsa_inputs(1, sum(lens), 2, 2, 16, 12, 8, torch.float64, N=len(lens), strong=True)
    check_gsa(chunk_gsa, q, k, v, s, g, h0, backend="torch", cu_seqlens=_cu(lens))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gate", [True, False], ids=["g", "abc-gates"])
def test_fused_recurrent_gsa(gate, reverse):
    q, k, v, s, g, h0 = make_gsa_inputs(2, 70, 2, 2, 16, 12, 8, torch.float64, gate=gate)
    check_gsa(fused_recurrent_gsa, q, k, v, s, g, h0, backend="torch", reverse=reverse)


def test_fused_recurrent_gsa_varlen_reverse_gqa():
    lens = (40, 1, 29)
    q, k, v, s, g, h0 = make_gsa_inputs(1, sum(lens), 4, 2, 16, 12, 8, torch.float64, N=len(lens))
    check_gsa(fused_recurrent_gsa, q, k, v, s, g, h0, backend="torch", cu_seqlens=_cu(lens), reverse=True)


@pytest.mark.parametrize(("T", "h0"), [(1, True), (63, True), (130, False)])
def test_chunk_abc(T, h0):
    q, k, v, s, _, states = make_gsa_inputs(2, T, 2, 2, 16, 12, 8, torch.float64, gate=False, h0=h0)
    check_gsa(chunk_abc, q, k, v, s, None, states, abc=True, backend="torch")


def test_abc_is_gsa_without_gate():
    """chunk_abc equals chunk_gsa without g, and both equal GSA on explicitly derived gates."""
    q, k, v, s, _, h0 = make_gsa_inputs(2, 50, 2, 2, 16, 12, 8, torch.float64, gate=False)
    o1, ht1 = chunk_abc(q, k, v, s, initial_state=h0, output_final_state=True, backend="torch")
    o2, ht2 = chunk_gsa(q, k, v, s, initial_state=h0, output_final_state=True, backend="torch")
    sn, g = slot_gates(s)
    o3, ht3 = recurrent_gsa(q, k, v, sn, g, initial_state=h0, output_final_state=True)
    for a, b in ((o1, o2), (o1, o3), (ht1[0], ht2[0]), (ht1[1], ht3[1])):
        torch.testing.assert_close(a, b)
    assert isinstance(ht1, tuple) and isinstance(ht2, list)


def test_slot_gates_varlen():
    """the derived gates restart at each sequence: g = 0 at every start, exp(s - z) = 1 there."""
    s = torch.randn(1, 20, 2, 4, dtype=torch.float64)
    sn, g = slot_gates(s, torch.tensor([0, 7, 20]))
    for t in (0, 7):
        assert torch.all(g[0, t] == 0) and torch.allclose(sn[0, t], torch.ones_like(sn[0, t]))
    sn7, g7 = slot_gates(s[:, 7:])
    torch.testing.assert_close(sn[:, 7:], sn7)
    torch.testing.assert_close(g[:, 7:], g7)


def test_chunked_reference_matches_recurrence():
    q, k, v, s, g, h0 = make_gsa_inputs(2, 100, 4, 2, 8, 6, 5, torch.float64)
    for cs in (16, 64):
        o, ht = chunk_gsa_torch(q, k, v, s, g, initial_state=h0, output_final_state=True, chunk_size=cs)
        ro, rht = recurrent_gsa(q, k, v, s, g, initial_state=h0, output_final_state=True)
        torch.testing.assert_close(o, ro)
        torch.testing.assert_close(ht[0], rht[0])
        torch.testing.assert_close(ht[1], rht[1])


def test_returns_without_final_state_and_empty():
    q, k, v, s, g, _ = make_gsa_inputs(2, 10, 2, 2, 8, 8, 4, torch.float32, h0=False)
    assert chunk_gsa(q, k, v, s, g, backend="torch")[1] == [None, None]
    assert fused_recurrent_gsa(q, k, v, s, g, backend="torch")[1] == [None, None]
    assert chunk_abc(q, k, v, s, backend="torch")[1] is None
    e = [x[:, :0] for x in (q, k, v, s, g)]
    o, (hk, hv) = chunk_gsa(*e, output_final_state=True, backend="torch")
    assert o.shape == (2, 0, 2, 8) and hk.shape == (2, 2, 8, 4) and hv.shape == (2, 2, 4, 8)
    assert not hk.any() and not hv.any()


def test_bf16_torch_backend():
    q, k, v, s, g, h0 = make_gsa_inputs(2, 40, 2, 2, 16, 16, 8, torch.bfloat16)
    check_gsa(chunk_gsa, q, k, v, s, g, h0, backend="torch")


def test_bad_inputs():
    q, k, v, s, g, h0 = make_gsa_inputs(2, 10, 4, 2, 8, 8, 4, torch.float32)
    with pytest.raises(ValueError, match=r"`g` must have the shape of `s` \(2, 10, 2, 4\)"):
        chunk_gsa(q, k, v, s, g[..., :3])
    with pytest.raises(ValueError, match=r"`s` must have shape \[B, T, H, M\]"):
        chunk_gsa(q, k, v, s[:, :5], g)
    with pytest.raises(ValueError, match="multiple of the H = 2"):
        chunk_gsa(q[:, :, :3], k, v, s, g)
    with pytest.raises(ValueError, match="no grouped query heads"):
        chunk_abc(q, k, v, s)
    with pytest.raises(TypeError, match="`s` must have the dtype of `q`"):
        chunk_gsa(q, k, v, s.double(), g)
    with pytest.raises(TypeError, match="`initial_state` must be a pair"):
        chunk_gsa(q, k, v, s, g, initial_state=h0[0])
    with pytest.raises(ValueError, match=r"`initial_state\[1\]` must have shape \[2, 2, 4, 8\]"):
        chunk_gsa(q, k, v, s, g, initial_state=(h0[0], h0[1][..., :3]))
    with pytest.raises(ValueError, match="`chunk_size` must be a power of 2"):
        chunk_gsa(q, k, v, s, g, chunk_size=48)
    with pytest.raises(ValueError, match="`checkpoint_level`"):
        chunk_gsa(q, k, v, s, g, checkpoint_level=3)
    with pytest.raises(ValueError, match="batch size B = 1"):
        chunk_gsa(q, k, v, s, g, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="`g` must be a floating-point"):
        chunk_gsa(q, k, v, s, g.long())


def test_registry_refusals():
    from fla_tl.registry import OpInputs, get_op

    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0), varlen=True,
                    initial_state=True, backward=True)
    assert "variable-length" in " ".join(get_op("chunk_abc").backend("tilelang").verifier(h100))
    q, k, v, s, g, _ = make_gsa_inputs(1, 10, 2, 2, 8, 8, 4, torch.float32, h0=False)
    with pytest.raises(BackendError, match="needs a cuda tensor"):
        chunk_gsa(q, k, v, s, g, backend="tilelang")


# ---------------------------------------------------------------- GPU: the tilelang backend vs the fp32 recurrence


@pytest.fixture
def poisoned_cuda():
    from utils import poison_allocator

    poison_allocator("cuda")
    yield
    torch.cuda.synchronize()


# two kernel sets (bf16 at K = V = 128, M = 64 as fla's benchmarks; fp32 at padded K = 100, V = 60, M = 32) so the
# device compiles (or loads) few kernels
BF16_DIMS, FP32_DIMS = (128, 128, 64), (100, 60, 32)
GPU_CASES = [
    pytest.param((1,), 2, BF16_DIMS, torch.bfloat16, False, id="T1-bf16"),
    pytest.param((63,), 4, BF16_DIMS, torch.bfloat16, False, id="T63-gqa-bf16"),
    pytest.param((500,), 2, BF16_DIMS, torch.bfloat16, False, id="T500-bf16"),
    pytest.param((500,), 2, BF16_DIMS, torch.bfloat16, True, id="T500-bf16-strong"),
    pytest.param((300,), 2, FP32_DIMS, torch.float32, False, id="T300-odd-dims-fp32"),
    pytest.param((1, 300, 0, 77), 2, BF16_DIMS, torch.bfloat16, False, id="varlen-bf16"),
    pytest.param((130, 1, 64), 4, FP32_DIMS, torch.float32, True, id="varlen-gqa-fp32-strong"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("lens", "HQ", "dims", "dtype", "strong"), GPU_CASES)
def test_tilelang_chunk_gsa(lens, HQ, dims, dtype, strong, poisoned_cuda):
    K, V, M = dims
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    q, k, v, s, g, h0 = make_gsa_inputs(B, T, HQ, 2, K, V, M, dtype, device="cuda", N=len(lens) if varlen else B,
                                        strong=strong)
    check_gsa(chunk_gsa, q, k, v, s, g, h0, backend="tilelang", cu_seqlens=_cu(lens, "cuda") if varlen else None)


@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("lens", "gate", "dtype"), [
    pytest.param((500,), True, torch.bfloat16, id="T500-bf16"),
    pytest.param((1, 300, 0, 77), True, torch.bfloat16, id="varlen-bf16"),
    pytest.param((63,), False, torch.float32, id="T63-abc-gates-fp32"),
])
def test_tilelang_fused_recurrent_gsa(lens, gate, dtype, reverse, poisoned_cuda):
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    K, V, M = BF16_DIMS if dtype == torch.bfloat16 else FP32_DIMS
    q, k, v, s, g, h0 = make_gsa_inputs(B, T, 2, 2, K, V, M, dtype, device="cuda", N=len(lens) if varlen else B,
                                        gate=gate)
    check_gsa(fused_recurrent_gsa, q, k, v, s, g, h0, backend="tilelang",
              cu_seqlens=_cu(lens, "cuda") if varlen else None, reverse=reverse)


@pytest.mark.gpu
@pytest.mark.parametrize(("T", "dtype"), [(1, torch.bfloat16), (500, torch.bfloat16), (256, torch.float32)])
def test_tilelang_chunk_abc(T, dtype, poisoned_cuda):
    K, V, M = BF16_DIMS if dtype == torch.bfloat16 else FP32_DIMS
    q, k, v, s, _, h0 = make_gsa_inputs(2, T, 2, 2, K, V, M, dtype, device="cuda", gate=False)
    check_gsa(chunk_abc, q, k, v, s, None, h0, abc=True, backend="tilelang")


@pytest.mark.gpu
@pytest.mark.parametrize(("lens", "M", "dtype"), [
    pytest.param((1,), 64, torch.bfloat16, id="T1-bf16"),
    pytest.param((700,), 64, torch.bfloat16, id="T700-bf16"),
    pytest.param((1, 130, 0, 77), 64, torch.bfloat16, id="varlen-bf16"),
    pytest.param((300, 45), 30, torch.float32, id="varlen-odd-M-fp32"),
])
def test_tilelang_slot_normaliser(lens, M, dtype, poisoned_cuda):
    """ABC's slot normaliser on its TileLang scans (`kernels/gsa/normaliser.py`) against `slot_gates` in fp64: the
    normalised slots, the gates and ds, with logits spread over +-8 (so z jumps and decays)."""
    from fla_tl.kernels.gsa.normaliser import slot_gates_tl

    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    cu = _cu(lens, "cuda") if varlen else None
    s = (4 * torch.randn(B, T, 3, M, device="cuda")).to(dtype).requires_grad_()
    sn, g = slot_gates_tl(s, cu, dtype)
    assert sn.dtype == dtype and g.dtype == torch.float32
    dsn, dg = torch.randn_like(sn), torch.randn_like(g)
    (ds,) = torch.autograd.grad((sn, g), s, (dsn, dg))
    r = s.detach().double().requires_grad_()
    rsn, rg = slot_gates(r, cu)
    (rds,) = torch.autograd.grad((rsn, rg), r, (dsn.double(), dg.double()))
    for name, a, b in (("sn", sn, rsn), ("g", g, rg), ("ds", ds, rds)):
        assert_close(name, a, b, dtype)


# ---------------------------------------------------------------- compile: the chunk_gla stages at GSA's shapes


def _compile_specs():
    try:
        from fla_tl.kernels.common.chunk_h import chunk_fwd_h_kernel
        from fla_tl.kernels.gla import chunk as gla
        from fla_tl.kernels.gsa import normaliser
    except Exception:  # noqa: BLE001 - without tilelang the module does not import; the marker skips these
        return [pytest.param(None, id="tilelang-missing")]
    # pass 1 runs chunk_gla's dq/dk kernel with the M = 64 slots as its key dim and K = 128 as its value dim, on the
    # states of chunk_fwd_h over (s, k) with gate "gk"
    return [
        pytest.param((gla.chunk_gla_bwd_dqk_kernel, dict(K=64, V=128, dtype="bfloat16", h_dtype="bfloat16", BT=64)),
                     id="chunk_gla_bwd_dqk_kernel-M64-K128-bf16"),
        pytest.param((chunk_fwd_h_kernel, dict(K=64, V=128, gate="gk", dtype="bfloat16", h_dtype="bfloat16", BT=64,
                                               **gla.STATE_CONFIG)), id="chunk_fwd_h_kernel-M64-K128-gk"),
        # ABC's slot normaliser, forward and backward (16-byte vectors of bf16)
        pytest.param((normaliser.slot_normaliser_fwd_kernel, dict(dtype="bfloat16", out_dtype="bfloat16", VEC=8)),
                     id="slot_normaliser_fwd-bf16"),
        pytest.param((normaliser.slot_normaliser_bwd_kernel, dict(dtype="bfloat16", dsn_dtype="bfloat16", VEC=8)),
                     id="slot_normaliser_bwd-bf16"),
    ]


@pytest.mark.compile
@pytest.mark.parametrize("spec", _compile_specs())
def test_kernel_builds_for_sm90a(spec):
    if spec is None:
        pytest.skip("tilelang is not installed")
    from fla_tl.kernels.common.utils import get_kernel

    factory, kwargs = spec
    assert "__global__" in get_kernel(factory, {"kind": "cuda", "arch": "sm_90a"}, **kwargs).get_kernel_source()
