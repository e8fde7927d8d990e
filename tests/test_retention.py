"""Retention: every entry point against the token-by-token recurrence.

CPU (fp64): the `torch` backend (the chunked form, the attention form for parallel_retention) must match the
recurrence to 1e-10 for the output, the final state and every gradient, and parallel_retention's attention matrix the
one written out. GPU (`gpu` marker): the `tilelang` backend in bf16 / fp16 / fp32 against the fp32 references.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from utils import Case, assert_close, assert_matches, check_states

from fla_tl.ops import (
    BackendError,
    chunk_retention,
    fused_chunk_retention,
    fused_recurrent_retention,
    parallel_retention,
)
from fla_tl.reference import chunk_simple_gla_torch, recurrent_retention, recurrent_simple_gla
from fla_tl.reference.retention import parallel_retention_reference

OPS = {
    "chunk": chunk_retention,
    "fused_chunk": fused_chunk_retention,
    "fused_recurrent": fused_recurrent_retention,
}


def make_inputs(B, T, H, K, V, dtype, device="cpu", h0=True, state_v_first=False, N=None):
    """q, k (L2-normalised), v and an optional initial state; k is normalised so the recurrence stays tame."""
    q = torch.randn(B, T, H, K, dtype=torch.float32, device=device)
    k = F.normalize(torch.randn(B, T, H, K, dtype=torch.float32, device=device), dim=-1)
    v = torch.randn(B, T, H, V, dtype=torch.float32, device=device)
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    state = None
    if h0:
        shape = (N or B, H, V, K) if state_v_first else (N or B, H, K, V)
        state = torch.randn(shape, dtype=torch.float32, device=device).to(dtype).requires_grad_()
    return q, k, v, state


def check_against_reference(fn, q, k, v, h0, cu_seqlens=None, backend=None, **kwargs):
    """run `fn` and the fp32/fp64 recurrence on the same inputs; compare o, ht and dq, dk, dv, dh0."""
    check_states(fn, recurrent_retention, q, k, v, h0, cu_seqlens=cu_seqlens, backend=backend, **kwargs)


# ---------------------------------------------------------------- cpu: torch backend vs the recurrence in fp64

CPU_CASES = [
    pytest.param(*case, id="B{}-T{}-H{}-K{}-V{}-h0{}".format(*case))
    for case in [
        (2, 1, 2, 32, 32, True),
        (2, 63, 2, 32, 32, False),
        (1, 64, 3, 60, 100, True),
        (2, 65, 2, 100, 60, True),
        (1, 200, 4, 60, 100, True),
        (2, 200, 1, 16, 16, False),
    ]
]

VARLEN_CASES = [
    pytest.param(lens, h0, id=f"lens{'-'.join(map(str, lens))}-h0{h0}")
    for lens, h0 in [
        ((1, 63, 64, 65), True),
        ((130, 0, 7, 200), True),
        ((0, 100), False),
    ]
]


def _cu(lens, device="cpu"):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.long, device=device)


@pytest.mark.parametrize(("B", "T", "H", "K", "V", "h0"), CPU_CASES)
def test_chunk(B, T, H, K, V, h0):
    q, k, v, state = make_inputs(B, T, H, K, V, torch.float64, h0=h0)
    check_against_reference(chunk_retention, q, k, v, state, backend="torch")


@pytest.mark.parametrize(("B", "T", "H", "K", "V", "h0"), CPU_CASES)
def test_fused_chunk(B, T, H, K, V, h0):
    q, k, v, state = make_inputs(B, T, H, K, V, torch.float64, h0=h0)
    check_against_reference(fused_chunk_retention, q, k, v, state, backend="torch")


@pytest.mark.parametrize(("reverse", "state_v_first"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "h0"), CPU_CASES)
def test_fused_recurrent(B, T, H, K, V, h0, reverse, state_v_first):
    q, k, v, state = make_inputs(B, T, H, K, V, torch.float64, h0=h0, state_v_first=state_v_first)
    check_against_reference(
        fused_recurrent_retention, q, k, v, state, backend="torch", reverse=reverse, state_v_first=state_v_first
    )


@pytest.mark.parametrize(("lens", "h0"), VARLEN_CASES)
@pytest.mark.parametrize("op", ["chunk", "fused_chunk"])
def test_chunk_varlen(op, lens, h0):
    q, k, v, state = make_inputs(1, sum(lens), 2, 60, 100, torch.float64, h0=h0, N=len(lens))
    check_against_reference(OPS[op], q, k, v, state, cu_seqlens=_cu(lens), backend="torch")


@pytest.mark.parametrize(("reverse", "state_v_first"), [(False, False), (True, True)])
@pytest.mark.parametrize(("lens", "h0"), VARLEN_CASES)
def test_fused_recurrent_varlen(lens, h0, reverse, state_v_first):
    q, k, v, state = make_inputs(1, sum(lens), 2, 60, 100, torch.float64, h0=h0, state_v_first=state_v_first,
                                 N=len(lens))
    check_against_reference(
        fused_recurrent_retention, q, k, v, state, cu_seqlens=_cu(lens), backend="torch",
        reverse=reverse, state_v_first=state_v_first,
    )


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_simple_gla_reference(T):
    """the chunked form with a per-token gate plus a per-head constant, varlen, against the recurrence."""
    q, k, v, h0 = make_inputs(1, T, 3, 60, 100, torch.float64, N=2)
    g = F.logsigmoid(torch.randn(1, T, 3, dtype=torch.float64)).requires_grad_()
    g_gamma = torch.tensor([-0.01, -0.1, -0.5], dtype=torch.float64)
    cu = _cu((T // 3, T - T // 3))
    inputs = (q, k, v, g, h0)
    outs = []
    for fn in (recurrent_simple_gla, chunk_simple_gla_torch):
        o, ht = fn(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        grads = torch.autograd.grad((o, ht), inputs, (torch.ones_like(o), torch.ones_like(ht)))
        outs.append((o, ht, *grads))
    for name, a, b in zip(("o", "ht", "dq", "dk", "dv", "dg", "dh0"), outs[1], outs[0]):
        assert_close(name, a, b, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(OPS))
def test_torch_backend_dtypes(op, dtype):
    """the torch backend on low-precision inputs: o in q's dtype, ht in fp32, grads in the input dtypes."""
    q, k, v, state = make_inputs(2, 70, 2, 32, 48, dtype)
    check_against_reference(OPS[op], q, k, v, state, backend="torch")


# ---------------------------------------------------------------- api


@pytest.mark.parametrize("op", list(OPS))
def test_api_returns_and_scale(op):
    fn = OPS[op]
    q, k, v, _ = make_inputs(2, 40, 2, 16, 24, torch.float32, h0=False)
    o, ht = fn(q, k, v)
    assert o.shape == (2, 40, 2, 24) and o.dtype == torch.float32 and ht is None
    o_default, _ = fn(q, k, v, scale=None)
    o_explicit, _ = fn(q, k, v, scale=16 ** -0.5)
    torch.testing.assert_close(o_default, o_explicit, rtol=0, atol=0)
    o_half, _ = fn(q, k, v, scale=0.5 * 16 ** -0.5)
    torch.testing.assert_close(o_half, 0.5 * o_default, rtol=1e-5, atol=1e-6)
    _, ht = fn(q, k, v, output_final_state=True)
    assert ht.shape == (2, 2, 16, 24) and ht.dtype == torch.float32


@pytest.mark.parametrize("op", list(OPS))
def test_api_empty_sequence(op):
    fn = OPS[op]
    q, k, v, h0 = make_inputs(2, 0, 2, 16, 24, torch.bfloat16)
    o, ht = fn(q, k, v)
    assert o.shape == (2, 0, 2, 24) and o.dtype == torch.bfloat16 and ht is None
    o, ht = fn(q, k, v, output_final_state=True)
    assert ht.shape == (2, 2, 16, 24) and ht.dtype == torch.float32 and not ht.any()
    o, ht = fn(q, k, v, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(ht, h0.float(), rtol=0, atol=0)
    assert ht.data_ptr() != h0.data_ptr()
    ht.sum().backward()
    assert torch.equal(h0.grad, torch.ones_like(h0))


def test_api_chunk_kwargs():
    q, k, v, _ = make_inputs(1, 10, 1, 8, 8, torch.float32, h0=False)
    with pytest.raises(DeprecationWarning, match="head_first"):
        chunk_retention(q, k, v, head_first=True)
    o, _ = chunk_retention(q, k, v, chunk_size=32)
    torch.testing.assert_close(o, chunk_retention(q, k, v)[0], rtol=0, atol=0)
    with pytest.raises(TypeError, match="bogus"):
        chunk_retention(q, k, v, bogus=1)


def test_api_transpose_state_layout():
    q, k, v, h0 = make_inputs(1, 10, 1, 8, 12, torch.float64, state_v_first=True)
    with pytest.warns(DeprecationWarning, match="state_v_first"):
        o, ht = fused_recurrent_retention(q, k, v, initial_state=h0, output_final_state=True,
                                          transpose_state_layout=True)
    o2, ht2 = fused_recurrent_retention(q, k, v, initial_state=h0, output_final_state=True, state_v_first=True)
    assert ht.shape == (1, 1, 12, 8)
    torch.testing.assert_close(ht, ht2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="transpose_state_layout"):
        fused_recurrent_retention(q, k, v, state_v_first=True, transpose_state_layout=True)


def test_api_no_grad_inputs():
    q, k, v, h0 = make_inputs(1, 20, 2, 8, 8, torch.float32)
    with torch.no_grad():
        o, ht = chunk_retention(q, k, v, initial_state=h0, output_final_state=True)
    assert not o.requires_grad and not ht.requires_grad


# ---------------------------------------------------------------- parallel_retention: the attention form


def check_parallel(q, k, v, cu_seqlens=None, backend=None, **kwargs):
    """parallel_retention against its reference: o against the recurrence, the attention matrix (when asked) against
    the one written out, and the gradients of q, k, v through both; o and attn in q's dtype."""
    attn = kwargs.get("output_attentions", False)
    case = Case("parallel_retention", dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, **kwargs), ("q", "k", "v"),
                parallel_retention_reference, outputs=("o", "attn") if attn else ("o",), dtype=q.dtype,
                out_dtypes={"o": q.dtype, "attn": q.dtype})
    assert_matches(parallel_retention, case, backend)


PARALLEL_CASES = [
    pytest.param(*case, id="B{}-T{}-H{}-K{}-V{}-scale{}".format(*case))
    for case in [
        (2, 1, 2, 32, 32, None),
        (2, 63, 2, 32, 32, 0.1),
        (1, 64, 3, 60, 100, None),
        (2, 65, 2, 100, 60, None),
        (1, 200, 4, 60, 100, 1.0),
        (2, 200, 1, 16, 16, None),
    ]
]
DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float64, torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output_attentions", [False, True], ids=["o", "attn"])
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "scale"), PARALLEL_CASES)
def test_parallel(B, T, H, K, V, scale, output_attentions, dtype):
    q, k, v, _ = make_inputs(B, T, H, K, V, dtype, h0=False)
    check_parallel(q, k, v, backend="torch", scale=scale, output_attentions=output_attentions)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [(1, 63, 64, 65), (130, 0, 7, 200), (0, 100)], ids=lambda x: "-".join(map(str, x)))
def test_parallel_varlen(lens, dtype):
    q, k, v, _ = make_inputs(1, sum(lens), 2, 60, 100, dtype, h0=False)
    check_parallel(q, k, v, cu_seqlens=_cu(lens), backend="torch")


def test_parallel_attention_matrix():
    """the attention matrix as fla defines it: scale * (q_i . k_j) * gamma_h ** (i - j), zero above the diagonal,
    [B, H, T, T]; o is attn @ v; the same o as chunk_retention."""
    q, k, v, _ = make_inputs(2, 50, 3, 16, 24, torch.float64, h0=False)
    o, attn = parallel_retention(q, k, v, scale=0.3, output_attentions=True)
    assert attn.shape == (2, 3, 50, 50) and attn.dtype == torch.float64
    assert torch.equal(attn.triu(1), torch.zeros_like(attn))
    # fla takes the log decay in fp32
    gamma = (1 - 2.0 ** (-5.0 - torch.arange(3, dtype=torch.float32))).log().double().exp()
    i, j = 7, 3
    want = 0.3 * (q[:, i] * k[:, j]).sum(-1) * gamma ** (i - j)  # [B, H]
    assert_close("attn[i, j]", attn[:, :, i, j], want, torch.float64)
    assert_close("o", o, torch.einsum("bhij,bjhv->bihv", attn, v), torch.float64)
    assert_close("o", o, chunk_retention(q, k, v, scale=0.3)[0], torch.float64)


def test_parallel_api():
    q, k, v, _ = make_inputs(2, 40, 2, 16, 24, torch.float32, h0=False)
    o, attn = parallel_retention(q, k, v)
    assert o.shape == (2, 40, 2, 24) and o.dtype == torch.float32 and attn is None
    torch.testing.assert_close(parallel_retention(q, k, v, scale=16 ** -0.5)[0], o, rtol=0, atol=0)
    _, attn = parallel_retention(q.bfloat16(), k.bfloat16(), v.bfloat16(), output_attentions=True)
    assert attn.shape == (2, 2, 40, 40) and attn.dtype == torch.bfloat16
    # T = 0
    o, attn = parallel_retention(q[:, :0], k[:, :0], v[:, :0], output_attentions=True)
    assert o.shape == (2, 0, 2, 24) and attn.shape == (2, 2, 0, 0)
    # fla's keywords
    torch.testing.assert_close(parallel_retention(q, k, v, chunk_size=64)[0], parallel_retention(q, k, v)[0])
    with pytest.raises(ValueError, match="power of 2"):
        parallel_retention(q, k, v, chunk_size=48)
    with pytest.raises(DeprecationWarning, match="head_first"):
        parallel_retention(q, k, v, head_first=True)
    with pytest.raises(TypeError, match="bogus"):
        parallel_retention(q, k, v, bogus=1)


def test_parallel_refusals(monkeypatch):
    """no attention matrix with cu_seqlens (as in fla); the tilelang backend refuses output_attentions with its
    reason, so the automatic choice takes the torch backend and a forced tilelang raises."""
    from fla_tl import registry
    from fla_tl.kernels.common.state_op import NO_ATTENTION
    from fla_tl.registry import OpInputs, get_op, select_backend

    q, k, v, _ = make_inputs(1, 30, 2, 16, 16, torch.float32, h0=False)
    with pytest.raises(ValueError, match="output_attentions"):
        parallel_retention(q, k, v, cu_seqlens=_cu((10, 20)), output_attentions=True)
    with pytest.raises(ValueError, match="batch size B = 1"):
        parallel_retention(*(x.expand(2, -1, -1, -1) for x in (q, k, v)), cu_seqlens=_cu((10, 20)))
    with pytest.raises(BackendError, match="materialise the attention"):
        parallel_retention(q, k, v, output_attentions=True, backend="tilelang")

    monkeypatch.setattr(registry, "module_missing", lambda name: False)
    monkeypatch.setattr(registry, "import_reason", lambda module: None)
    spec = get_op("parallel_retention")
    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0), varlen=True,
                    backward=True, options={"output_attentions": False})
    attn = OpInputs(**{**h100.__dict__, "varlen": False, "options": {"output_attentions": True}})
    assert spec.backend("tilelang").verifier(h100) == []
    assert select_backend(spec, h100).name == "tilelang"
    assert spec.backend("tilelang").verifier(attn) == [NO_ATTENTION]
    assert select_backend(spec, attn).name == "torch"
    assert "does not support an initial state" in spec.backend("tilelang").verifier(
        OpInputs(**{**h100.__dict__, "initial_state": True}))


def test_parallel_compile():
    """the attention matrix and its gradient inside torch.compile(fullgraph=True), through the custom ops."""
    q, k, v, _ = make_inputs(2, 70, 2, 16, 24, torch.float64, h0=False)
    torch._dynamo.reset()
    compiled = torch.compile(parallel_retention, fullgraph=True, backend="aot_eager")
    o, attn = compiled(q, k, v, output_attentions=True)
    ro, rattn = parallel_retention_reference(q, k, v, output_attentions=True)
    do, da = torch.randn_like(o), torch.randn_like(attn)
    grads = torch.autograd.grad((o, attn), (q, k, v), (do, da))
    rgrads = torch.autograd.grad((ro, rattn), (q, k, v), (do, da))
    for name, a, b in zip(("o", "attn", "dq", "dk", "dv"), (o, attn, *grads), (ro, rattn, *rgrads)):
        assert_close(name, a, b, torch.float64)


# ---------------------------------------------------------------- gpu: tilelang backend vs the fp32 recurrence

D_VALUES = [64, 100, 128, 256]
T_VALUES = [1, 63, 64, 500, 2048]


def _gpu_cases():
    cases = []
    # the full T x D grid in bf16 at H = 4 with an initial state
    for T in T_VALUES:
        for D in D_VALUES:
            cases.append((1 if T == 2048 else 2, T, 4, D, torch.bfloat16, True))
    # a thinner grid for fp32, H = 1 and no initial state
    for T in (63, 500):
        for D in (64, 128):
            cases.append((2, T, 1, D, torch.float32, False))
    cases += [(2, 500, 4, 100, torch.float32, True), (1, 500, 4, 256, torch.float32, True)]
    cases += [(2, 64, 1, 100, torch.bfloat16, False), (1, 2048, 4, 128, torch.float32, True)]
    return [
        pytest.param(B, T, H, D, dtype, h0, id=f"B{B}-T{T}-H{H}-D{D}-{str(dtype)[6:]}-h0{h0}")
        for B, T, H, D, dtype, h0 in cases
    ]


GPU_CASES = _gpu_cases()


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "T", "H", "D", "dtype", "h0"), GPU_CASES)
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang(op, B, T, H, D, dtype, h0, poisoned_cuda):
    q, k, v, state = make_inputs(B, T, H, D, D, dtype, device="cuda", h0=h0)
    check_against_reference(OPS[op], q, k, v, state, backend="tilelang")


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang_kv_differ(op, poisoned_cuda):
    q, k, v, state = make_inputs(2, 200, 2, 64, 128, torch.bfloat16, device="cuda")
    check_against_reference(OPS[op], q, k, v, state, backend="tilelang")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang_varlen(op, dtype, poisoned_cuda):
    lens = (1, 300, 0, 64, 1000, 77)
    q, k, v, state = make_inputs(1, sum(lens), 4, 128, 128, dtype, device="cuda", N=len(lens))
    check_against_reference(OPS[op], q, k, v, state, cu_seqlens=_cu(lens, "cuda"), backend="tilelang")


@pytest.mark.gpu
@pytest.mark.parametrize(("reverse", "state_v_first"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("T", "D", "dtype"), [
    pytest.param(63, 64, torch.bfloat16, id="T63-D64-bf16"),
    pytest.param(500, 128, torch.bfloat16, id="T500-D128-bf16"),
    pytest.param(500, 100, torch.float32, id="T500-D100-fp32"),
])
def test_tilelang_fused_recurrent_options(T, D, dtype, reverse, state_v_first, poisoned_cuda):
    q, k, v, state = make_inputs(2, T, 4, D, D, dtype, device="cuda", state_v_first=state_v_first)
    check_against_reference(
        fused_recurrent_retention, q, k, v, state, backend="tilelang", reverse=reverse, state_v_first=state_v_first
    )
    lens = (5, 0, 300, 195) if T == 500 else (30, 33)
    q, k, v, state = make_inputs(1, sum(lens), 4, D, D, dtype, device="cuda", state_v_first=state_v_first,
                                 N=len(lens))
    check_against_reference(
        fused_recurrent_retention, q, k, v, state, cu_seqlens=_cu(lens, "cuda"), backend="tilelang",
        reverse=reverse, state_v_first=state_v_first,
    )


@pytest.mark.gpu
def test_tilelang_auto_choice():
    """on a Hopper GPU the automatic choice is tilelang, and it agrees with the forced torch backend."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the tilelang backend needs compute capability >= 9.0")
    from fla_tl.registry import describe_inputs, get_op, select_backend

    q, k, v, state = make_inputs(2, 100, 2, 64, 64, torch.bfloat16, device="cuda")
    assert select_backend(get_op("chunk_retention"), describe_inputs(q, v, state)).name == "tilelang"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, ht = chunk_retention(q, k, v, initial_state=state, output_final_state=True)
    o_ref, ht_ref = chunk_retention(q, k, v, initial_state=state, output_final_state=True, backend="torch")
    assert_close("o", o, o_ref.float(), torch.bfloat16)
    assert_close("ht", ht, ht_ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["parallel", "fused"])
def test_tilelang_chunk_schedules(impl, poisoned_cuda):
    """both schedules of chunk_retention (picked by grid size in the op) against the recurrence, varlen with h0."""
    from fla_tl.kernels.retention.ops import retention_decay
    from fla_tl.kernels.simple_gla.chunk import chunk_simple_gla_bwd, chunk_simple_gla_fwd

    lens = (1, 300, 0, 64, 1000, 77)
    q, k, v, h0 = make_inputs(1, sum(lens), 4, 128, 128, torch.bfloat16, device="cuda", N=len(lens))
    cu = _cu(lens, "cuda")
    scale = 128 ** -0.5
    kw = dict(scale=scale, initial_state=h0.detach(), cu_seqlens=cu, impl=impl,
              g_gamma=retention_decay(4, q.device))
    o, ht = chunk_simple_gla_fwd(q.detach(), k.detach(), v.detach(), output_final_state=True, **kw)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = chunk_simple_gla_bwd(q.detach(), k.detach(), v.detach(), do, dht, **kw)[:4]

    ref = [x.detach().float().requires_grad_() for x in (q, k, v, h0)]
    ref_o, ref_ht = recurrent_retention(*ref[:3], scale=scale, initial_state=ref[3], output_final_state=True,
                                        cu_seqlens=cu)
    ref_grads = torch.autograd.grad((ref_o, ref_ht), ref, (do.float(), dht))
    assert_close("o", o, ref_o, torch.bfloat16)
    assert_close("ht", ht, ref_ht, torch.bfloat16)
    for name, g, rg in zip(("dq", "dk", "dv", "dh0"), grads, ref_grads):
        assert_close(name, g, rg, torch.bfloat16)


PARALLEL_GPU_CASES = [
    pytest.param(B, T, H, K, V, dtype, id=f"B{B}-T{T}-H{H}-K{K}-V{V}-{str(dtype)[6:]}")
    for B, T, H, K, V, dtype in [
        (2, 1, 4, 64, 64, torch.bfloat16),
        (2, 63, 4, 64, 64, torch.bfloat16),
        (2, 65, 4, 128, 128, torch.bfloat16),
        (2, 1000, 4, 128, 128, torch.bfloat16),
        (1, 1000, 4, 256, 256, torch.bfloat16),
        (2, 500, 2, 100, 100, torch.bfloat16),
        (2, 200, 2, 64, 128, torch.bfloat16),
        (2, 63, 4, 64, 64, torch.float16),
        (2, 1000, 4, 128, 128, torch.float16),
        (2, 1, 1, 64, 64, torch.float32),
        (2, 65, 4, 64, 64, torch.float32),
        (1, 1000, 4, 128, 128, torch.float32),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "dtype"), PARALLEL_GPU_CASES)
def test_tilelang_parallel(B, T, H, K, V, dtype, poisoned_cuda):
    q, k, v, _ = make_inputs(B, T, H, K, V, dtype, device="cuda", h0=False)
    check_parallel(q, k, v, backend="tilelang")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_tilelang_parallel_varlen(dtype, poisoned_cuda):
    lens = (1, 300, 0, 64, 1000, 77)
    q, k, v, _ = make_inputs(1, sum(lens), 4, 128, 128, dtype, device="cuda", h0=False)
    check_parallel(q, k, v, cu_seqlens=_cu(lens, "cuda"), backend="tilelang")


@pytest.mark.gpu
def test_tilelang_parallel_attentions(poisoned_cuda):
    """on a Hopper GPU the automatic choice runs tilelang, and the torch backend when the attention matrix is asked
    for; a forced tilelang refuses it."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the tilelang backend needs compute capability >= 9.0")
    from fla_tl.registry import describe_inputs, get_op, select_backend

    q, k, v, _ = make_inputs(2, 300, 4, 64, 64, torch.bfloat16, device="cuda", h0=False)
    spec = get_op("parallel_retention")
    assert select_backend(spec, describe_inputs(q, v, output_attentions=False)).name == "tilelang"
    assert select_backend(spec, describe_inputs(q, v, output_attentions=True)).name == "torch"
    with pytest.raises(BackendError, match="materialise the attention"):
        parallel_retention(q, k, v, output_attentions=True, backend="tilelang")
    check_parallel(q, k, v, output_attentions=True)
    o, _ = parallel_retention(q, k, v)
    o_attn, _ = parallel_retention(q, k, v, output_attentions=True)
    assert_close("o", o, o_attn.float(), torch.bfloat16)
