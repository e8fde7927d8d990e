"""GLA (a log gate per key channel): the torch backend against the token-by-token recurrence; the registry's refusals;
fused_recurrent_gla's TileLang kernels (gate "gk") against the fp32 recurrence on the GPU.

chunk_gla has no TileLang kernel yet: the registry says so, and CUDA inputs run the torch backend.
"""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import BackendError, chunk_gla, fused_chunk_gla, fused_recurrent_gla
from fla_tl.reference import recurrent_gla

from test_retention import _cu, make_inputs
from utils import check_op


def _gk(B, T, H, K, dtype=torch.float64, shift=2.0, device="cpu"):
    return F.logsigmoid(torch.randn(B, T, H, K, device=device) + shift).to(dtype).requires_grad_()


def _recurrent_gk(q, k, v, gk=None, **kw):
    return recurrent_gla(q, k, v, gk if gk is not None else torch.zeros_like(q), **kw)


@pytest.mark.parametrize(("B", "T", "H", "K", "V"), [(2, 1, 2, 16, 16), (2, 63, 2, 32, 16), (1, 130, 3, 20, 36)])
def test_chunk(B, T, H, K, V):
    q, k, v, h0 = make_inputs(B, T, H, K, V, torch.float64)
    check_op(chunk_gla, recurrent_gla, q, k, v, h0, backend="torch", grad_kwargs={"g": _gk(B, T, H, K)})


def test_chunk_strong_gates_stay_finite():
    """gates near -20 per token: within-chunk factors underflow to zero instead of overflowing."""
    q, k, v, h0 = make_inputs(1, 150, 2, 16, 16, torch.float64)
    g = (F.logsigmoid(torch.randn(1, 150, 2, 16) - 20)).double().requires_grad_()
    check_op(chunk_gla, recurrent_gla, q, k, v, h0, backend="torch", grad_kwargs={"g": g})


def test_chunk_varlen_state_v_first():
    lens = (1, 63, 0, 70)
    q, k, v, h0 = make_inputs(1, sum(lens), 2, 16, 24, torch.float64, N=len(lens), state_v_first=True)
    check_op(chunk_gla, recurrent_gla, q, k, v, h0, cu_seqlens=_cu(lens), backend="torch", state_v_first=True,
             grad_kwargs={"g": _gk(1, sum(lens), 2, 16)})


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gate", [True, False], ids=["gk", "no-gate"])
def test_fused_recurrent(gate, reverse):
    q, k, v, h0 = make_inputs(2, 70, 2, 16, 24, torch.float64)
    grad = {"gk": _gk(2, 70, 2, 16)} if gate else {}
    check_op(fused_recurrent_gla, _recurrent_gk, q, k, v, h0, backend="torch", grad_kwargs=grad, reverse=reverse)


def test_gate_dtype_and_bf16():
    q, k, v, h0 = make_inputs(2, 40, 2, 16, 16, torch.bfloat16)
    check_op(chunk_gla, recurrent_gla, q, k, v, h0, backend="torch",
             grad_kwargs={"g": _gk(2, 40, 2, 16, torch.float32)})


def test_bad_inputs():
    q, k, v, _ = make_inputs(2, 10, 2, 8, 8, torch.float32, h0=False)
    with pytest.raises(ValueError, match=r"`g` must have shape \[B, T, H, K\] = \[2, 10, 2, 8\], got \(2, 10, 2\)"):
        chunk_gla(q, k, v, torch.zeros(2, 10, 2))
    with pytest.raises(NotImplementedError, match="gv"):
        fused_recurrent_gla(q, k, v, gv=torch.zeros(2, 10, 2, 8))
    with pytest.raises(NotImplementedError, match="Please use `chunk_gla` instead"):
        fused_chunk_gla(q=q, k=k, v=v)


def test_registry_refusals():
    from fla_tl.registry import OpInputs, get_op

    h100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0), gate=True)
    assert get_op("chunk_gla").backend("tilelang").verifier(h100) == []
    assert get_op("fused_recurrent_gla").backend("tilelang").verifier(h100) == []
    assert get_op("chunk_gla").backend("torch").verifier(h100) == []
    for name in ("tilelang", "torch"):
        assert "use chunk_gla" in get_op("fused_chunk_gla").backend(name).verifier(h100)[-1]
    q, k, v, _ = make_inputs(1, 10, 2, 8, 8, torch.float32, h0=False)
    with pytest.raises(BackendError, match="needs a cuda tensor"):
        chunk_gla(q, k, v, torch.zeros(1, 10, 2, 8), backend="tilelang")


@pytest.mark.gpu
def test_cuda_torch_backend():
    q, k, v, h0 = make_inputs(2, 200, 2, 64, 64, torch.bfloat16, device="cuda")
    check_op(chunk_gla, recurrent_gla, q, k, v, h0, backend="torch",
             grad_kwargs={"g": _gk(2, 200, 2, 64, torch.float32, device="cuda")})


@pytest.fixture
def poisoned_cuda():
    from utils import poison_allocator

    poison_allocator("cuda")
    yield
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize(("reverse", "state_v_first"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("lens", "D", "dtype"), [
    pytest.param((1,), 64, torch.bfloat16, id="T1-D64-bf16"),
    pytest.param((500,), 128, torch.bfloat16, id="T500-D128-bf16"),
    pytest.param((300,), 100, torch.float32, id="T300-D100-fp32"),
    pytest.param((1, 300, 0, 77), 128, torch.bfloat16, id="varlen-D128-bf16"),
])
def test_tilelang_fused_recurrent(lens, D, dtype, reverse, state_v_first, poisoned_cuda):
    """fused_recurrent_gla on the tilelang backend: o, the final state and the gradients of q, k, v, h0 and gk (fp32,
    strong and weak gates) against the fp32 recurrence."""
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    N = len(lens) if varlen else B
    q, k, v, h0 = make_inputs(B, T, 2, D, D, dtype, device="cuda", N=N, state_v_first=state_v_first)
    gk = F.logsigmoid(torch.randn(B, T, 2, D, device="cuda") * 2 + 1).requires_grad_()
    check_op(fused_recurrent_gla, _recurrent_gk, q, k, v, h0, cu_seqlens=_cu(lens, "cuda") if varlen else None,
             backend="tilelang", grad_kwargs={"gk": gk}, reverse=reverse, state_v_first=state_v_first)


@pytest.mark.gpu
@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize(("lens", "K", "V", "dtype", "strong"), [
    pytest.param((1,), 64, 64, torch.bfloat16, False, id="T1-D64-bf16"),
    pytest.param((63,), 128, 128, torch.bfloat16, False, id="T63-D128-bf16"),
    pytest.param((500,), 128, 128, torch.bfloat16, False, id="T500-D128-bf16"),
    pytest.param((500,), 128, 128, torch.bfloat16, True, id="T500-D128-bf16-strong"),
    pytest.param((300,), 100, 100, torch.float32, False, id="T300-D100-fp32"),
    pytest.param((200,), 256, 256, torch.bfloat16, False, id="T200-D256-bf16"),
    pytest.param((1, 300, 0, 77), 128, 128, torch.bfloat16, False, id="varlen-D128-bf16"),
    pytest.param((130, 1, 64), 64, 16, torch.float32, True, id="varlen-K64V16-fp32-strong"),
    pytest.param((300,), 128, 64, torch.bfloat16, "mixed", id="T300-K128V64-bf16-mixed"),
])
def test_tilelang_chunk(lens, K, V, dtype, strong, state_v_first, poisoned_cuda):
    """chunk_gla on the tilelang backend: o, the final state and the gradients of q, k, v, h0 and g (fp32) against
    the fp32 recurrence. Weak gates take the one-matmul form of the intra-chunk scores; "strong" gates (about -20 per
    token: exp of the chunk's cumulative gate underflows) the 16-token sub-chunk form; "mixed" has strong gates in the
    first 64 key channels only, so the two forms meet in one chunk (one per key tile)."""
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    N = len(lens) if varlen else B
    q, k, v, h0 = make_inputs(B, T, 2, K, V, dtype, device="cuda", N=N, state_v_first=state_v_first)
    x = torch.randn(B, T, 2, K, device="cuda")
    g = F.logsigmoid(x * 2 + 1)
    if strong:
        g[..., : 64 if strong == "mixed" else K] = F.logsigmoid(x * 8 - 4)[..., : 64 if strong == "mixed" else K]
    g.requires_grad_()
    check_op(chunk_gla, recurrent_gla, q, k, v, h0, cu_seqlens=_cu(lens, "cuda") if varlen else None,
             backend="tilelang", grad_kwargs={"g": g}, state_v_first=state_v_first)


def test_per_key_gate_grad_glue(monkeypatch):
    """`common.cumsum.per_key_gate_grad` (the launcher glue, its sequence-scan kernel emulated in PyTorch) gives the
    reference's dg from the reference's dq, dk and the final-state term, varlen, both directions."""
    from fla_tl.kernels.common import cumsum
    from fla_tl.kernels.common.gates import state_term
    from fla_tl.kernels.common.utils import seq_meta

    def emulated(factory, target, reverse, out_dtype, BT, **config):
        def scan(x, offset, cu, y, use_offset):
            for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                seg = x[s:e].flip(0).cumsum(0).flip(0) if reverse else x[s:e].cumsum(0)
                y[s:e] = seg + (offset[n] if use_offset else 0)
        return scan

    monkeypatch.setattr(cumsum, "get_kernel", emulated)
    monkeypatch.setitem(cumsum.TORCH_TO_TL, torch.float64, "float64")
    lens = (5, 0, 70, 1)
    cu = _cu(lens)
    for reverse in (False, True):
        q, k, v, h0 = make_inputs(1, sum(lens), 2, 6, 4, torch.float64, N=len(lens))
        gk = _gk(1, sum(lens), 2, 6)
        o, ht = _recurrent_gk(q, k, v, gk=gk, initial_state=h0, output_final_state=True, reverse=reverse,
                              cu_seqlens=cu)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        dq, dk, dg = torch.autograd.grad((o, ht), (q, k, gk), (do, dht))
        meta = seq_meta(1, sum(lens), cu, 64, q.device)
        got = cumsum.per_key_gate_grad(q[0].detach(), k[0].detach(), dq[0], dk[0], meta=meta, reverse=reverse,
                                       dg_dtype=torch.float64, state_term=state_term(ht, dht, dims=-1))
        torch.testing.assert_close(got, dg[0], rtol=1e-5, atol=1e-5)


def test_per_key_gate_grad_chunk_glue(monkeypatch):
    """`common.cumsum.per_key_gate_grad_chunk` (chunk_gla's dg; its two kernels emulated in PyTorch) gives the
    reference's dg from the reference's dq, dk, the chunk states and their gradients, varlen."""
    from fla_tl.kernels.common import cumsum
    from fla_tl.kernels.common.utils import seq_meta

    BT = 16

    def emulated(factory, target, **kw):
        def state_dot(h, dh, ht, cu, chunk_indices, c):
            for i_c, (n, j) in enumerate(chunk_indices.tolist()):
                last = (j + 1) * BT >= int(cu[n + 1] - cu[n])
                c[i_c] = ((ht[n] if last else h[i_c + 1]) * dh[i_c]).sum(-1)

        def reverse_cumsum(x, c, cu, chunk_indices, y):
            for i_c, (n, j) in enumerate(chunk_indices.tolist()):
                t0, t1 = int(cu[n]) + j * BT, min(int(cu[n]) + (j + 1) * BT, int(cu[n + 1]))
                y[t0:t1] = x[t0:t1].flip(0).cumsum(0).flip(0) + c[i_c]

        return {"chunk_state_dot_kernel": state_dot, "chunk_reverse_cumsum_kernel": reverse_cumsum}[factory.__name__]

    monkeypatch.setattr(cumsum, "get_kernel", emulated)
    monkeypatch.setitem(cumsum.TORCH_TO_TL, torch.float64, "float64")
    lens = (5, 0, 40, 1, 16)
    cu = _cu(lens)
    q, k, v, h0 = make_inputs(1, sum(lens), 2, 6, 4, torch.float64, N=len(lens))
    gk = _gk(1, sum(lens), 2, 6)
    o, ht = _recurrent_gk(q, k, v, gk=gk, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    dq, dk, dg = torch.autograd.grad((o, ht), (q, k, gk), (do, dht))
    # the states entering each chunk and the gradients of the states leaving it, from the recurrence
    meta = seq_meta(1, sum(lens), cu, BT, q.device)
    hs, dhs = [], []
    for n, j in meta.chunk_indices.tolist():
        t0 = int(cu[n]) + j * BT
        t1 = min(t0 + BT, int(cu[n + 1]))
        seg = dict(initial_state=h0[n:n + 1].detach().requires_grad_(), output_final_state=True)
        hs.append(_recurrent_gk(q[:, cu[n]:t0], k[:, cu[n]:t0], v[:, cu[n]:t0], gk=gk[:, cu[n]:t0], **seg)[1][0])
        # the gradient of the state leaving the chunk: run the rest of the sequence from it
        e = int(cu[n + 1])
        if t1 == e:  # the sequence's last chunk: the state leaving it is the final state
            dhs.append(dht[n])
            continue
        s = _recurrent_gk(q[:, cu[n]:t1], k[:, cu[n]:t1], v[:, cu[n]:t1], gk=gk[:, cu[n]:t1], **seg)[1].detach()
        s.requires_grad_()
        o2, ht2 = _recurrent_gk(q[:, t1:e], k[:, t1:e], v[:, t1:e], gk=gk[:, t1:e], initial_state=s,
                                output_final_state=True)
        dhs.append(torch.autograd.grad((o2, ht2), s, (do[:, t1:e], dht[n:n + 1]))[0][0])
    h, dh = torch.stack(hs).detach(), torch.stack(dhs)
    r = (q * dq - k * dk)[0].detach()
    got = cumsum.per_key_gate_grad_chunk(r, h, dh, ht.detach(), meta=meta, dg_dtype=torch.float64, BT=BT)
    torch.testing.assert_close(got, dg[0], rtol=1e-6, atol=1e-6)
