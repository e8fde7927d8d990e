"""GSA (gated slot attention) and ABC: the torch backend and the chunked reference against the token-by-token
recurrence (CPU, fp64); validation and the registry's refusals; the tilelang backend (chunk_gla's stages composed in
`fla_tl.kernels.gsa`) against the fp32 recurrence on the GPU: o, both final states and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from test_retention import _cu
from utils import Case, assert_close, assert_matches

from fla_tl.ops import BackendError, chunk_abc, chunk_gsa, fused_recurrent_gsa
from fla_tl.reference import chunk_gsa_torch, recurrent_abc, recurrent_gsa, slot_gates
from fla_tl.testing import reference_dtype


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
    """fn against the fp32/fp64 recurrence (`fla_tl.testing`): o, both final states (fp32, fp64 for fp64 inputs), and
    the gradients of q, k, v, s, g, h0 in their inputs' dtypes."""
    dtype = q.dtype
    args = dict(q=q, k=k, v=v, s=s, initial_state=h0, output_final_state=True)
    if not abc:
        args.update(g=g, cu_seqlens=cu_seqlens, **kwargs)
    grad = ("q", "k", "v", "s") + (() if abc else ("g",)) + ("initial_state",)
    acc = reference_dtype(dtype)
    case = Case(fn.__name__, args, grad, recurrent_abc if abc else recurrent_gsa, outputs=("o", "hk", "hv"),
                dtype=dtype, out_dtypes={"o": dtype, "hk": acc, "hv": acc})
    assert_matches(fn, case, backend)


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
    with pytest.raises(TypeError, match=r"chunk_gsa\(\) got unexpected keyword arguments \['initial_states'\]"):
        chunk_gsa(q, k, v, s, g, initial_states=h0)
    with pytest.raises(DeprecationWarning, match="head_first"):
        chunk_gsa(q, k, v, s, g, head_first=False)
    with pytest.raises(ValueError, match="batch size B = 1"):
        chunk_gsa(q, k, v, s, g, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="`g` must be a floating-point"):
        chunk_gsa(q, k, v, s, g.long())


def test_registry_refusals():
    from fla_tl.registry import OpInputs, get_op

    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0), varlen=True,
                    initial_state=True, backward=True)
    assert "variable-length" in " ".join(get_op("chunk_abc").backend("tilelang").verifier(h100))
    # at most 256 slots (the chunk stages' tiles), a refusal of the tilelang backend only
    wide = OpInputs(**{**h100.__dict__, "options": {"M": 512}})
    for name in ("chunk_gsa", "fused_recurrent_gsa"):
        assert get_op(name).backend("tilelang").verifier(wide)[-1] == (
            "`s`: the tilelang backend takes at most M = 256 slots, got 512")
        assert get_op(name).backend("torch").verifier(wide) == []
    q, k, v, s, g, _ = make_gsa_inputs(1, 10, 2, 2, 8, 8, 4, torch.float32, h0=False)
    with pytest.raises(BackendError, match="needs a cuda tensor"):
        chunk_gsa(q, k, v, s, g, backend="tilelang")


GLUE_CASES = [
    # op, g given, initial states, varlen, reverse, output_final_state, query heads per key head
    pytest.param("chunk_abc", False, True, False, False, True, 1, id="abc"),
    pytest.param("chunk_abc", False, False, False, False, False, 1, id="abc-no-h0-no-ht"),
    pytest.param("chunk_gsa", True, True, True, False, True, 2, id="gsa-varlen-gqa"),
    pytest.param("chunk_gsa", False, True, True, False, True, 2, id="gsa-abc-gates-varlen-gqa"),
    pytest.param("chunk_gsa", True, False, False, False, False, 1, id="gsa-no-h0-no-ht"),
    pytest.param("fused_recurrent_gsa", True, True, True, True, True, 2, id="recurrent-varlen-reverse-gqa"),
    pytest.param("fused_recurrent_gsa", False, True, True, True, True, 1, id="recurrent-abc-gates-varlen-reverse"),
    pytest.param("fused_recurrent_gsa", True, True, False, True, False, 2, id="recurrent-reverse-gqa-no-ht"),
]


@pytest.mark.parametrize(("name", "gate", "h0", "varlen", "reverse", "final", "NG"), GLUE_CASES)
def test_composition_glue(name, gate, h0, varlen, reverse, final, NG, monkeypatch):
    """the tilelang backend's forward and backward (`kernels.gsa.chunk.gsa_fwd` / `gsa_bwd`: ABC's slot gates,
    grouped query heads, reverse by flips, the final states' and gradients' plumbing) with the two passes and the
    normaliser replaced by the reference give GSA's outputs, final states and every gradient (fp64, CPU)."""
    pytest.importorskip("tilelang")
    import fla_tl.kernels.gsa.chunk as C
    import fla_tl.kernels.gsa.normaliser as NZ
    from fla_tl.registry import get_op

    def passes_fwd(q, k, v, s, g, *, scale, initial_state, output_final_state, cu_seqlens):
        o, ht = recurrent_gsa(q, k, v, s, g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return o, q.new_zeros(*q.shape[:3], s.shape[-1]), *(ht if ht is not None else (None, None))

    def passes_bwd(q, k, v, s, g, ok, do, dhkt, dhvt, *, scale, initial_state, cu_seqlens):
        xs = [x.detach().requires_grad_() for x in (q, k, v, s, g, *(initial_state or ()))]
        with torch.enable_grad():
            o, (hk, hv) = recurrent_gsa(*xs[:5], scale=scale, initial_state=tuple(xs[5:]) or None,
                                        output_final_state=True, cu_seqlens=cu_seqlens)
            loss = (o * do).sum() + sum((h * d).sum() for h, d in ((hk, dhkt), (hv, dhvt)) if d is not None)
            grads = torch.autograd.grad(loss, xs)
        return (*grads[:5], *(grads[5:] or (None, None)))

    def gates_fwd(s, cu_seqlens=None, out_dtype=None):
        sn, g = slot_gates(s, cu_seqlens)
        return sn.to(out_dtype), g, torch.zeros_like(g)

    def gates_bwd(s, z, dsn, dg, cu_seqlens=None):
        x = s.detach().requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(slot_gates(x, cu_seqlens), x, (dsn, dg))[0]

    for module, attr, fn in ((C, "chunk_gsa_fwd", passes_fwd), (C, "chunk_gsa_bwd", passes_bwd),
                             (NZ, "slot_normaliser_fwd", gates_fwd), (NZ, "slot_normaliser_bwd", gates_bwd)):
        monkeypatch.setattr(module, attr, fn)
    lens = (9, 0, 14, 1)
    B, T = (1, sum(lens)) if varlen else (2, 11)
    N = len(lens) if varlen else B
    q, k, v, s, g, states = make_gsa_inputs(B, T, 2 * NG, 2, 6, 7, 5, torch.float64, N=N, gate=gate, h0=h0)
    args = dict(q=q, k=k, v=v, s=s, g=g, hk0=states[0] if h0 else None, hv0=states[1] if h0 else None,
                cu_seqlens=_cu(lens) if varlen else None, scale=0.3, output_final_state=final, reverse=reverse)
    tl = get_op(name).backend("tilelang")
    with torch.no_grad():
        o, hk, hv, *residuals = tl.fwd(**args, requires_grad=True)
        do = torch.randn_like(o)
        dht = [torch.randn_like(hk), torch.randn_like(hv)] if final else [None, None]
        found = tl.bwd(args, [o, q.new_empty(0), q.new_empty(0), *residuals], [do, *dht])
    assert (hk is None) == (hv is None) == (not final)
    names = [n for n in ("q", "k", "v", "s", "g", "hk0", "hv0") if args[n] is not None]
    ro, rht = recurrent_gsa(q, k, v, s, g, scale=0.3, initial_state=states, output_final_state=True,
                            reverse=reverse, cu_seqlens=args["cu_seqlens"])
    loss = (ro * do).sum() + (sum((h * d).sum() for h, d in zip(rht, dht)) if final else 0)
    expected = dict(zip(names, torch.autograd.grad(loss, [args[n] for n in names])))
    torch.testing.assert_close(o, ro)
    if final:
        torch.testing.assert_close(hk, rht[0])
        torch.testing.assert_close(hv, rht[1])
    if not gate:
        assert found["g"] is None
    for n in names:
        torch.testing.assert_close(found[n], expected[n], msg=f"d{n}")


COMPILE_CASES = [
    # op, g given, varlen, reverse, output_final_state, query heads per key head
    pytest.param("chunk_abc", False, False, False, True, 1, id="abc"),
    pytest.param("chunk_gsa", True, True, False, True, 2, id="gsa-varlen-gqa"),
    pytest.param("chunk_gsa", False, False, False, True, 2, id="gsa-abc-gates-gqa"),
    pytest.param("fused_recurrent_gsa", True, True, True, True, 2, id="recurrent-varlen-reverse-gqa"),
    # two absent outputs (each its own empty placeholder: a custom op's outputs may not alias)
    pytest.param("chunk_gsa", True, False, False, False, 1, id="gsa-no-final-state"),
]


@pytest.mark.parametrize(("name", "gate", "varlen", "reverse", "final", "NG"), COMPILE_CASES)
def test_compile_fullgraph(name, gate, varlen, reverse, final, NG):
    """the op inside `torch.compile(fullgraph=True)` (its custom ops `fla_tl::<op>_fwd` / `_bwd`) gives eager's
    outputs and gradients of every input; `torch.library.opcheck` of the forward custom op."""
    import fla_tl.ops as ops

    fn = getattr(ops, name)
    lens = (20, 0, 50)
    B, T = (1, sum(lens)) if varlen else (2, 40)
    N = len(lens) if varlen else B
    cu = _cu(lens) if varlen else None
    q, k, v, s, g, h0 = make_gsa_inputs(B, T, 2 * NG, 2, 8, 6, 5, torch.float64, N=N, gate=gate)
    xs = [q, k, v, s, *h0] + ([g] if gate else [])
    kwargs = {} if name == "chunk_abc" else {"cu_seqlens": cu, **({"reverse": True} if reverse else {})}

    def run(q, k, v, s, hk0, hv0, g=None):
        args = (q, k, v, s) if name == "chunk_abc" else (q, k, v, s, g)
        o, ht = fn(*args, initial_state=(hk0, hv0), output_final_state=final, **kwargs)
        return (o, *ht) if final else (o,)

    torch._dynamo.reset()
    outs = [run(*xs), torch.compile(run, fullgraph=True, backend="aot_eager")(*xs)]
    cot = [torch.randn_like(x) for x in outs[0]]
    grads = [torch.autograd.grad(out, xs, cot) for out in outs]
    for a, b in zip([*outs[0], *grads[0]], [*outs[1], *grads[1]]):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(getattr(torch.ops.fla_tl, f"{name}_fwd").default,
                          (q, k, v, s, g, *h0, cu, 0.3, final, reverse, True, "torch"))


# ---------------------------------------------------------------- GPU: the tilelang backend vs the fp32 recurrence


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
    from fla_tl.kernels.gsa.normaliser import slot_normaliser_bwd, slot_normaliser_fwd

    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    cu = _cu(lens, "cuda") if varlen else None
    s = (4 * torch.randn(B, T, 3, M, device="cuda")).to(dtype)
    sn, g, z = slot_normaliser_fwd(s, cu, dtype)
    assert sn.dtype == dtype and g.dtype == torch.float32
    dsn, dg = torch.randn_like(sn), torch.randn_like(g)
    ds = slot_normaliser_bwd(s, z, dsn, dg, cu)
    assert ds.dtype == dtype
    r = s.detach().double().requires_grad_()
    rsn, rg = slot_gates(r, cu)
    (rds,) = torch.autograd.grad((rsn, rg), r, (dsn.double(), dg.double()))
    for name, a, b in (("sn", sn, rsn), ("g", g, rg), ("ds", ds, rds)):
        assert_close(name, a, b, dtype)


# ---------------------------------------------------------------- compile: the chunk_gla stages at GSA's shapes


def _compile_specs():
    try:
        from fla_tl.autotune.resolve import heuristic_config
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
                                               **heuristic_config("chunk_fwd_h", 64, 128, "bfloat16", "gk"))),
                     id="chunk_fwd_h_kernel-M64-K128-gk"),
        # ABC's slot normaliser, forward and backward (16-byte vectors of bf16)
        pytest.param((normaliser.slot_normaliser_fwd_kernel, dict(dtype="bfloat16", out_dtype="bfloat16", VEC=8)),
                     id="slot_normaliser_fwd-bf16"),
        pytest.param((normaliser.slot_normaliser_bwd_kernel, dict(dtype="bfloat16", dsn_dtype="bfloat16", VEC=8)),
                     id="slot_normaliser_bwd-bf16"),
    ]


@pytest.mark.compile
@pytest.mark.compile_all
@pytest.mark.parametrize("spec", _compile_specs())
def test_kernel_builds_for_sm90a(spec):
    if spec is None:
        pytest.skip("tilelang is not installed")
    from fla_tl.kernels.common.utils import get_kernel

    factory, kwargs = spec
    assert "__global__" in get_kernel(factory, {"kind": "cuda", "arch": "sm_90a"}, **kwargs).get_kernel_source()
