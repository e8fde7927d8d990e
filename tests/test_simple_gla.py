"""Simple GLA: every entry point against the token-by-token recurrence, with a per-token gate `g`, a per-head constant
`g_gamma`, or both.

CPU (fp64): the `torch` backend (chunked form) against the recurrence to 1e-10, every gradient including dg.
GPU (`gpu` marker): the `tilelang` backend (constant decay `g_gamma`, the per-token gate `g`, both) in bf16 / fp32
against the fp32 recurrence.
"""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import BackendError, chunk_simple_gla, fused_chunk_simple_gla, fused_recurrent_simple_gla
from fla_tl.reference import recurrent_simple_gla

from test_retention import _cu, make_inputs
from utils import check_op

OPS = {
    "chunk": chunk_simple_gla,
    "fused_chunk": fused_chunk_simple_gla,
    "fused_recurrent": fused_recurrent_simple_gla,
}


def make_gates(B, T, H, dtype, device="cpu", kind="g"):
    """(grad kwargs, plain kwargs): a per-token log gate in (-inf, 0) as fla draws it, and/or a per-head constant."""
    grad, plain = {}, {}
    if "g" in kind.split("+"):
        grad["g"] = F.logsigmoid(torch.randn(B, T, H, device=device) + 2).to(dtype).requires_grad_()
    if "g_gamma" in kind.split("+"):
        plain["g_gamma"] = -torch.rand(H, device=device, dtype=torch.float32) * 0.3
    return grad, plain


CPU_CASES = [
    pytest.param(*case, id="B{}-T{}-H{}-K{}-V{}-h0{}".format(*case))
    for case in [
        (2, 1, 2, 32, 32, True),
        (2, 63, 2, 32, 32, False),
        (1, 64, 3, 60, 100, True),
        (2, 130, 2, 100, 60, True),
    ]
]
KINDS = ["g", "g_gamma", "g+g_gamma"]


# ---------------------------------------------------------------- cpu: torch backend vs the recurrence in fp64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "h0"), CPU_CASES)
@pytest.mark.parametrize("op", ["chunk", "fused_chunk"])
def test_chunk(op, B, T, H, K, V, h0, kind):
    q, k, v, state = make_inputs(B, T, H, K, V, torch.float64, h0=h0)
    grad, plain = make_gates(B, T, H, torch.float64, kind=kind)
    check_op(OPS[op], recurrent_simple_gla, q, k, v, state, backend="torch", grad_kwargs=grad, **plain)


@pytest.mark.parametrize(("reverse", "state_v_first"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "h0"), CPU_CASES[1:3])
def test_fused_recurrent(B, T, H, K, V, h0, kind, reverse, state_v_first):
    q, k, v, state = make_inputs(B, T, H, K, V, torch.float64, h0=h0, state_v_first=state_v_first)
    grad, plain = make_gates(B, T, H, torch.float64, kind=kind)
    check_op(fused_recurrent_simple_gla, recurrent_simple_gla, q, k, v, state, backend="torch", grad_kwargs=grad,
             reverse=reverse, state_v_first=state_v_first, **plain)


def test_chunk_state_v_first():
    q, k, v, state = make_inputs(2, 70, 2, 16, 24, torch.float64, state_v_first=True)
    grad, plain = make_gates(2, 70, 2, torch.float64, kind="g+g_gamma")
    check_op(chunk_simple_gla, recurrent_simple_gla, q, k, v, state, backend="torch", grad_kwargs=grad,
             state_v_first=True, **plain)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", list(OPS))
def test_varlen(op, kind):
    lens = (1, 63, 0, 130)
    q, k, v, state = make_inputs(1, sum(lens), 2, 60, 100, torch.float64, N=len(lens))
    grad, plain = make_gates(1, sum(lens), 2, torch.float64, kind=kind)
    check_op(OPS[op], recurrent_simple_gla, q, k, v, state, cu_seqlens=_cu(lens), backend="torch", grad_kwargs=grad,
             **plain)


@pytest.mark.parametrize("op", list(OPS))
def test_gate_dtype_differs_from_q(op):
    """fla draws g in fp32 next to bf16 q, k, v: dg comes back in g's dtype."""
    q, k, v, state = make_inputs(2, 40, 2, 16, 16, torch.bfloat16)
    grad, _ = make_gates(2, 40, 2, torch.float32)
    check_op(OPS[op], recurrent_simple_gla, q, k, v, state, backend="torch", grad_kwargs=grad)


def test_no_gate_is_linear_attention():
    q, k, v, _ = make_inputs(1, 50, 2, 16, 16, torch.float64, h0=False)
    o, _ = chunk_simple_gla(q, k, v, backend="torch")
    o_ref, _ = recurrent_simple_gla(q, k, v)
    torch.testing.assert_close(o, o_ref)


# ---------------------------------------------------------------- api and validation


@pytest.mark.parametrize("op", list(OPS))
def test_bad_gates(op):
    q, k, v, _ = make_inputs(2, 10, 3, 8, 8, torch.float32, h0=False)
    with pytest.raises(ValueError, match=r"`g` must have shape \[B, T, H\] = \[2, 10, 3\], got \(2, 10\)"):
        OPS[op](q, k, v, g=torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"`g_gamma` must have shape \[H\] = \[3\], got \(2,\)"):
        OPS[op](q, k, v, g_gamma=torch.zeros(2))
    with pytest.raises(TypeError, match="`g` must be a floating-point tensor"):
        OPS[op](q, k, v, g=torch.zeros(2, 10, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="`g_gamma` must be a torch.Tensor"):
        OPS[op](q, k, v, g_gamma=0.5)


def test_chunk_size_kwarg():
    q, k, v, _ = make_inputs(1, 10, 1, 8, 8, torch.float32, h0=False)
    o, _ = chunk_simple_gla(q, k, v, chunk_size=32)
    with pytest.raises(ValueError, match="power of 2"):
        chunk_simple_gla(q, k, v, chunk_size=48)
    with pytest.raises(DeprecationWarning, match="head_first"):
        chunk_simple_gla(q, k, v, head_first=True)


def test_tilelang_takes_the_per_token_gate():
    """on an H100 the tilelang backend accepts a per-token gate; CPU tensors still refuse it, naming the device."""
    from fla_tl.registry import OpInputs, get_op

    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0), gate=True)
    for name in ("chunk_simple_gla", "fused_chunk_simple_gla", "fused_recurrent_simple_gla"):
        assert get_op(name).backend("tilelang").verifier(h100) == [], name
    q, k, v, _ = make_inputs(1, 10, 2, 8, 8, torch.float32, h0=False)
    g, _ = make_gates(1, 10, 2, torch.float32)
    with pytest.raises(BackendError, match="tilelang"):
        chunk_simple_gla(q, k, v, backend="tilelang", **g)


# ---------------------------------------------------------------- gpu: tilelang backend vs the fp32 recurrence


GPU_CASES = [
    pytest.param(B, T, H, D, dtype, id=f"B{B}-T{T}-H{H}-D{D}-{str(dtype)[6:]}")
    for B, T, H, D, dtype in [
        (2, 1, 4, 64, torch.bfloat16),
        (2, 63, 4, 128, torch.bfloat16),
        (2, 500, 4, 100, torch.bfloat16),
        (1, 2048, 4, 256, torch.bfloat16),
        (2, 500, 1, 128, torch.float32),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "T", "H", "D", "dtype"), GPU_CASES)
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang(op, B, T, H, D, dtype, poisoned_cuda):
    """constant decay g_gamma (strong decay on some heads: -3 per token, every within-chunk factor underflows)."""
    q, k, v, state = make_inputs(B, T, H, D, D, dtype, device="cuda")
    g_gamma = torch.tensor([-3.0, -0.5, -0.01, 0.0][:H], device="cuda")
    check_op(OPS[op], recurrent_simple_gla, q, k, v, state, backend="tilelang", g_gamma=g_gamma)


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang_varlen(op, poisoned_cuda):
    lens = (1, 300, 0, 64, 1000, 77)
    q, k, v, state = make_inputs(1, sum(lens), 4, 128, 128, torch.bfloat16, device="cuda", N=len(lens))
    g_gamma = -torch.rand(4, device="cuda")
    check_op(OPS[op], recurrent_simple_gla, q, k, v, state, cu_seqlens=_cu(lens, "cuda"), backend="tilelang",
             g_gamma=g_gamma)


@pytest.mark.gpu
@pytest.mark.parametrize(("K", "V"), [(128, 1), (100, 100), (64, 16)], ids=["K128-V1", "K100-V100", "K64-V16"])
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang_varlen_unaligned(op, K, V, poisoned_cuda):
    """varlen with head dims off the 64-wide tiles (masked loads), down to V = 1."""
    lens = (1, 300, 0, 64, 1000, 77)
    q, k, v, state = make_inputs(1, sum(lens), 4, K, V, torch.bfloat16, device="cuda", N=len(lens))
    check_op(OPS[op], recurrent_simple_gla, q, k, v, state, cu_seqlens=_cu(lens, "cuda"), backend="tilelang",
             g_gamma=-torch.rand(4, device="cuda"))


@pytest.mark.gpu
def test_tilelang_chunk_state_v_first(poisoned_cuda):
    q, k, v, state = make_inputs(2, 200, 2, 64, 128, torch.bfloat16, device="cuda", state_v_first=True)
    check_op(chunk_simple_gla, recurrent_simple_gla, q, k, v, state, backend="tilelang", state_v_first=True,
             g_gamma=-torch.rand(2, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang_per_token_gate(op, varlen, poisoned_cuda):
    """the public ops with a per-token gate `g` (fp32, with a gradient) and `g_gamma` on the tilelang backend."""
    lens = (1, 300, 0, 64, 77)
    B, T = (1, sum(lens)) if varlen else (2, 300)
    cu = _cu(lens, "cuda") if varlen else None
    q, k, v, state = make_inputs(B, T, 2, 128, 128, torch.bfloat16, device="cuda", N=len(lens) if varlen else B)
    grad, _ = make_gates(B, T, 2, torch.float32, device="cuda")
    check_op(OPS[op], recurrent_simple_gla, q, k, v, state, backend="tilelang", grad_kwargs=grad, cu_seqlens=cu,
             g_gamma=torch.tensor([-0.1, 0.0], device="cuda"))


# ---------------------------------------------------------------- gpu: the per-token gate kernels, launcher level
#
# These drive the TileLang launchers directly, both schedules of the chunk form included.

GATE_CASES = [
    pytest.param(B, lens, D, dtype, id=f"B{B}-T{'+'.join(map(str, lens))}-D{D}-{str(dtype)[6:]}")
    for B, lens, D, dtype in [
        (2, (1,), 64, torch.bfloat16),
        (2, (63,), 128, torch.bfloat16),
        (2, (500,), 100, torch.bfloat16),
        (1, (2048,), 128, torch.bfloat16),
        (2, (200,), 128, torch.float32),
        (1, (1, 300, 0, 64, 1000, 77), 128, torch.bfloat16),
    ]
]


def _launchers(mode, impl=None):
    import importlib

    S = importlib.import_module(f"fla_tl.kernels.simple_gla.{mode}")
    fwd, bwd = getattr(S, f"{mode}_simple_gla_fwd"), getattr(S, f"{mode}_simple_gla_bwd")
    if impl is None:
        return fwd, bwd
    return (lambda *a, **kw: fwd(*a, impl=impl, **kw)), (lambda *a, **kw: bwd(*a, impl=impl, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "lens", "D", "dtype"), GATE_CASES)
@pytest.mark.parametrize(("mode", "impl", "reverse"), [
    ("chunk", "parallel", False), ("chunk", "fused", False), ("fused_chunk", None, False),
    ("fused_recurrent", None, False), ("fused_recurrent", None, True),
])
def test_tilelang_gate_kernels(mode, impl, reverse, B, lens, D, dtype, poisoned_cuda):
    varlen = len(lens) > 1
    T = sum(lens) if varlen else lens[0]
    N = len(lens) if varlen else B
    cu = _cu(lens, "cuda") if varlen else None
    H = 4
    q, k, v, h0 = (x.detach() for x in make_inputs(B, T, H, D, D, dtype, device="cuda", N=N))
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 2)  # fp32, as fla draws it
    g_gamma = torch.tensor([-0.2, -0.05, 0.0, -0.01], device="cuda")
    scale = D ** -0.5
    fwd, bwd = _launchers(mode, impl)
    extra = {"reverse": reverse, "state_v_first": False} if mode == "fused_recurrent" else {}
    o, ht = fwd(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=h0, output_final_state=True,
                cu_seqlens=cu, **extra)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    dq, dk, dv, dh0, dg = bwd(q, k, v, do, dht, g=g, g_gamma=g_gamma, scale=scale, initial_state=h0, cu_seqlens=cu,
                              ht=ht, **extra)
    ref = [x.float().requires_grad_() for x in (q, k, v, h0, g)]
    ro, rht = recurrent_simple_gla(ref[0], ref[1], ref[2], g=ref[4], g_gamma=g_gamma, scale=scale,
                                   initial_state=ref[3], output_final_state=True, reverse=reverse, cu_seqlens=cu)
    rgrads = torch.autograd.grad((ro, rht), ref, (do.float(), dht))
    from utils import assert_close

    assert_close("o", o, ro, dtype)
    assert_close("ht", ht, rht, dtype)
    for name, a, b in zip(("dq", "dk", "dv", "dh0", "dg"), (dq, dk, dv, dh0, dg), rgrads):
        assert_close(name, a, b, dtype)
    assert dg.dtype == g.dtype


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_gate_gradient_identity(varlen, reverse):
    """the identity `common.cumsum.gate_grad` computes, in fp64 on the reference: dg_t = sum over the steps from t to
    the end (processing order) of (q . dq - k . dk), plus <ht, dht>; with an initial state and a constant decay."""
    lens = (5, 0, 70, 1) if varlen else (70,)
    B = 1 if varlen else 2
    T = sum(lens) if varlen else lens[0]
    N = len(lens) if varlen else B
    cu = _cu(lens) if varlen else None
    q, k, v, h0 = make_inputs(B, T, 3, 8, 6, torch.float64, N=N)
    g = F.logsigmoid(torch.randn(B, T, 3, dtype=torch.float64)).requires_grad_()
    g_gamma = torch.tensor([-0.1, 0.0, -0.3], dtype=torch.float64)
    o, ht = recurrent_simple_gla(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0, output_final_state=True,
                                 reverse=reverse, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    dq, dk, dg = torch.autograd.grad((o, ht), (q, k, g), (do, dht))
    r = (q * dq - k * dk).sum(-1)  # [B, T, H]
    term = (ht * dht).sum((-2, -1))  # [N, H]
    want = torch.empty_like(r)
    bounds = [(b, 0, T) for b in range(B)] if cu is None else [(0, s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    for n, (b, s, e) in enumerate(bounds):
        seg = r[b, s:e]
        acc = seg.flip(0).cumsum(0).flip(0) if not reverse else seg.cumsum(0)
        want[b, s:e] = acc + term[n]
    torch.testing.assert_close(dg, want)


def test_gate_gradient_chunk_local_identity():
    """the chunk-local form `common.cumsum.gate_grad_chunk` computes, in fp64 on a hand-written recurrence: dg_t = sum
    of (q . dq - k . dk) over the rest of t's chunk + <S_c, dS_c>, S_c the state leaving the chunk and dS_c its
    gradient through the later chunks and the final state (what `chunk_bwd_dh` stores: not the chunk's own last
    output, which the chunk form computes from the state entering the chunk)."""
    torch.manual_seed(0)
    T, C, K, V = 150, 64, 6, 5
    q, k, v = (torch.randn(T, K if i < 2 else V, dtype=torch.float64, requires_grad=True) for i in range(3))
    g = F.logsigmoid(torch.randn(T, dtype=torch.float64)).requires_grad_()
    h = torch.randn(K, V, dtype=torch.float64)
    states, outs = [], []
    for t in range(T):
        h = g[t].exp() * h + k[t, :, None] * v[t, None, :]
        h.retain_grad()
        states.append(h)
        outs.append(h.t() @ q[t])
    o = torch.stack(outs)
    do, dht = torch.randn_like(o), torch.randn(K, V, dtype=torch.float64)
    ((o * do).sum() + (h * dht).sum()).backward()
    r = (q * q.grad - k * k.grad).sum(-1)
    want = torch.empty(T, dtype=torch.float64)
    for s in range(0, T, C):
        e = min(s + C, T)
        S = states[e - 1]
        dS = S.grad - q[e - 1, :, None] * do[e - 1, None, :]  # less the chunk's own last output, o = S^T q
        want[s:e] = r[s:e].flip(0).cumsum(0).flip(0) + (S * dS).sum()
    torch.testing.assert_close(g.grad, want)


def test_gate_chunks_layout():
    """`common.gates.gate_chunks`: the cumulative gates `[Ttot, H]` chunk-major `[H * NT, BT]` (the fused kernels' one
    bulk copy per chunk), rows past a sequence's end repeating its last value, varlen with an empty sequence."""
    from fla_tl.kernels.common.gates import gate_chunks
    from fla_tl.kernels.common.utils import seq_meta

    BT, H = 16, 3
    lens = (5, 0, 40, 16, 1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    gc = torch.randn(sum(lens), H)
    meta = seq_meta(1, sum(lens), cu, BT, gc.device)
    got = gate_chunks(gc, meta, H, BT, gc).view(H, meta.NT, BT)
    assert meta.NT == 1 + 0 + 3 + 1 + 1
    for c, (n, j) in enumerate(meta.chunk_indices.tolist()):
        bos, eos = int(cu[n]), int(cu[n + 1])
        for r in range(BT):
            t = min(bos + j * BT + r, eos - 1)
            torch.testing.assert_close(got[:, c, r], gc[t])
    assert gate_chunks(None, meta, H, BT, gc).shape == (1, BT)


# ---------------------------------------------------------------- cpu: the tilelang backend's glue, launchers emulated


def _emulated_launchers(mode):
    """PyTorch stand-ins with the contract of the simple-GLA launchers of `mode` (states `[K, V]` in the chunk modes)."""
    from fla_tl.reference import chunk_simple_gla_torch

    def fwd(q, k, v, *, g_gamma, scale, initial_state, output_final_state, cu_seqlens, g=None, **options):
        with torch.no_grad():
            return chunk_simple_gla_torch(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, **options)

    def bwd(q, k, v, do, dht, *, g_gamma, scale, initial_state, cu_seqlens, g=None, ht=None, **options):
        assert ht is not None or g is None or dht is None, "the gate's gradient needs the final state"
        given = [x for x in (q, k, v, initial_state, g) if x is not None]

        def form(q, k, v, *rest):
            rest = list(rest)
            h0 = rest.pop(0) if initial_state is not None else None
            gate = rest.pop(0) if g is not None else None
            o, h = chunk_simple_gla_torch(q, k, v, g=gate, g_gamma=g_gamma, scale=scale, initial_state=h0,
                                          output_final_state=dht is not None, cu_seqlens=cu_seqlens, **options)
            return (o, h) if dht is not None else (o,)

        # torch.func: the compiled path runs this inside a custom op, below autograd
        _, vjp = torch.func.vjp(form, *given)
        grads = iter(vjp((do, dht) if dht is not None else (do,)))
        return tuple(next(grads) if x is not None else None for x in (q, k, v, initial_state, g))

    return fwd, bwd


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("op", "options"), [
    ("chunk", {"state_v_first": True}), ("fused_chunk", {}), ("fused_recurrent", {"reverse": True, "state_v_first": True}),
])
def test_tilelang_glue_with_emulated_launchers(op, options, compiled, monkeypatch):
    """the tilelang backend's glue (contiguity, state transposes, gates, the final state for dg, the eager and custom-op
    paths) on the CPU, each launcher replaced by a PyTorch stand-in of its contract, against the recurrence."""
    import importlib

    from fla_tl.registry import get_op

    module = importlib.import_module(f"fla_tl.kernels.simple_gla.{op}")
    fwd, bwd = _emulated_launchers(op)
    monkeypatch.setattr(module, f"{op}_simple_gla_fwd", fwd)
    monkeypatch.setattr(module, f"{op}_simple_gla_bwd", bwd)
    monkeypatch.setattr(get_op(f"{op}_simple_gla").backend("tilelang"), "verifier", lambda inputs: [])
    fn = torch.compile(OPS[op], fullgraph=True, backend="aot_eager") if compiled else OPS[op]
    torch._dynamo.reset()
    lens = (1, 63, 0, 70)
    q, k, v, state = make_inputs(1, sum(lens), 2, 16, 24, torch.float64, N=len(lens),
                                 state_v_first=options.get("state_v_first", False))
    grad, plain = make_gates(1, sum(lens), 2, torch.float64, kind="g+g_gamma")
    check_op(fn, recurrent_simple_gla, q, k, v, state, cu_seqlens=_cu(lens), backend="tilelang", grad_kwargs=grad,
             **plain, **options)
