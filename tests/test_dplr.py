"""The generalized delta rule (DPLR, IPLR) and RWKV-7: the PyTorch recurrence (`fla_tl.reference.dplr`) against the
matrix update written out in fp64, reverse processing, the ops' argument mapping (RWKV-7's names and defaults, the
`fused_mul` form's low-rank pair), every gradient through the ops, T = 0, the validation and the registry's refusal of
the TileLang kernels (not built yet)."""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import (
    chunk_dplr_delta_rule,
    chunk_iplr_delta_rule,
    chunk_rwkv7,
    fused_mul_recurrent_rwkv7,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_iplr_delta_rule,
    fused_recurrent_rwkv7,
)
from fla_tl.reference.dplr import chunk_dplr_torch, recurrent_dplr
from fla_tl.registry import BackendError

pytestmark = pytest.mark.filterwarnings("ignore::fla_tl.registry.FallbackWarning")


def _inputs(lens=None, B=2, T=23, H=2, K=6, V=5, gated=True, seed=0):
    from fla_tl.kernels.dplr.ops import dplr_inputs  # after fla_tl.ops: the registry lists ops in import order

    torch.manual_seed(seed)
    x = dplr_inputs(B, T, H, K, V, device="cpu", lens=lens, gated=gated)
    return {n: t.double() if t.is_floating_point() else t for n, t in x.items()}


def _matrix_update(q, k, v, a, b, gk, scale, h0):
    """one sequence `[T, H, *]`: S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t),
    with explicit [K, K] transition matrices, in fp64."""
    T, H, K = q.shape
    S, outs = h0.clone(), []
    for t in range(T):
        o_t = []
        for h in range(H):
            decay = torch.diag(gk[t, h].exp()) if gk is not None else torch.eye(K, dtype=torch.float64)
            S[h] = (decay + torch.outer(b[t, h], a[t, h])) @ S[h] + torch.outer(k[t, h], v[t, h])
            o_t.append(S[h].T @ (scale * q[t, h]))
        outs.append(torch.stack(o_t))
    return (torch.stack(outs) if outs else v.new_zeros(0, *v.shape[1:])), S


@pytest.mark.parametrize("gated", [True, False], ids=["dplr", "iplr"])
def test_recurrence_is_the_matrix_update(gated):
    """packed sequences (an empty and a one-token one), an initial state."""
    lens = (7, 0, 1, 12)
    x = _inputs(lens, gated=gated)
    o, ht = recurrent_dplr(**x, scale=0.3, output_final_state=True)
    cu = x["cu_seqlens"].tolist()
    for n in range(len(lens)):
        seq = {name: x[name][0, cu[n]:cu[n + 1]] if x.get(name) is not None else None
               for name in ("q", "k", "v", "a", "b", "gk")}
        want_o, want_h = _matrix_update(**seq, scale=0.3, h0=x["initial_state"][n])
        torch.testing.assert_close(o[0, cu[n]:cu[n + 1]], want_o)
        torch.testing.assert_close(ht[n], want_h)


@pytest.mark.parametrize("gated", [True, False], ids=["dplr", "iplr"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_chunked_form_matches_the_recurrence(gated, reverse):
    """partial chunks, varlen with an empty and a one-token sequence, strong decays (a chunk's products underflow),
    fp64; outputs, final states and the gradients of every input."""
    x = _inputs((1, 70, 0, 45), H=2, K=8, V=6, gated=gated)
    if gated:
        x["gk"] = x["gk"] * 6
    x = {n: t.requires_grad_() if t.is_floating_point() else t for n, t in x.items()}
    got = chunk_dplr_torch(**x, output_final_state=True, reverse=reverse, chunk_size=16)
    want = recurrent_dplr(**x, output_final_state=True, reverse=reverse)
    leaves = [t for t in x.values() if t.is_floating_point()]
    cot = [torch.randn_like(t) for t in want]
    for a, b in zip([*got, *torch.autograd.grad(got, leaves, cot)], [*want, *torch.autograd.grad(want, leaves, cot)]):
        torch.testing.assert_close(a, b)


def test_reverse_runs_each_sequence_backwards():
    x = _inputs((9, 14))
    o, ht = fused_recurrent_dplr_delta_rule(**x, reverse=True, output_final_state=True)
    cu = x["cu_seqlens"].tolist()
    for n in range(2):
        seq = {name: x[name][:, cu[n]:cu[n + 1]].flip(1) for name in ("q", "k", "v", "a", "b", "gk")}
        want_o, want_h = recurrent_dplr(**seq, initial_state=x["initial_state"][n:n + 1], output_final_state=True)
        torch.testing.assert_close(o[:, cu[n]:cu[n + 1]], want_o.flip(1))
        torch.testing.assert_close(ht[n], want_h[0])


def test_ops_match_the_recurrence_and_each_other():
    """chunk and fused_recurrent DPLR; IPLR = DPLR with a zero decay; RWKV-7's ops = DPLR with q = r, gk = w (and
    their own default scales: 1.0 for chunk_rwkv7 and fused_mul_recurrent_rwkv7, K ** -0.5 for fused_recurrent_rwkv7,
    which also returns the final state by default); fused_mul_recurrent_rwkv7 = DPLR with (a, b) = (-kk, kk * a)."""
    x = _inputs()
    K = x["q"].shape[-1]
    want = recurrent_dplr(**x, output_final_state=True)
    for fn in (chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule):
        for got, ref in zip(fn(**x, output_final_state=True), want):
            torch.testing.assert_close(got, ref)
    no_gate = {n: t for n, t in x.items() if n != "gk"}
    zero = recurrent_dplr(**{**x, "gk": torch.zeros_like(x["gk"])}, output_final_state=True)
    for fn in (chunk_iplr_delta_rule, fused_recurrent_iplr_delta_rule):
        for got, ref in zip(fn(**no_gate, output_final_state=True), zero):
            torch.testing.assert_close(got, ref)
    r, w, k, v, a, b, h0 = (x[n] for n in ("q", "gk", "k", "v", "a", "b", "initial_state"))
    unit = recurrent_dplr(**x, scale=1.0, output_final_state=True)
    for got, ref in zip(chunk_rwkv7(r, w, k, v, a, b, initial_state=h0, output_final_state=True), unit):
        torch.testing.assert_close(got, ref)
    for got, ref in zip(fused_recurrent_rwkv7(r, w, k, v, a, b, initial_state=h0), want):
        torch.testing.assert_close(got, ref)
    kk, rate = -a, torch.rand_like(a)
    o, ht = fused_mul_recurrent_rwkv7(r, w, k, v, kk, rate, initial_state=h0)
    assert ht is None
    torch.testing.assert_close(o, recurrent_dplr(r, k, v, -kk, kk * rate, w, scale=1.0, initial_state=h0)[0])
    assert K ** -0.5 != 1.0


@pytest.mark.parametrize("op", ["chunk_dplr", "fused_recurrent_dplr_reverse", "iplr", "rwkv7", "fused_mul_rwkv7"])
def test_every_gradient(op):
    """torch.autograd.gradcheck of each op (varlen, an initial state) in every floating input."""
    x = _inputs((3, 0, 4), K=3, V=2, H=1, gated=op != "iplr")
    cu = x.pop("cu_seqlens")
    if op == "chunk_dplr":
        fn, names = lambda **t: chunk_dplr_delta_rule(**t, cu_seqlens=cu, output_final_state=True), list(x)
    elif op == "fused_recurrent_dplr_reverse":
        fn = lambda **t: fused_recurrent_dplr_delta_rule(**t, cu_seqlens=cu, reverse=True,  # noqa: E731
                                                         output_final_state=True)
        names = list(x)
    elif op == "iplr":
        fn, names = lambda **t: chunk_iplr_delta_rule(**t, cu_seqlens=cu, output_final_state=True), list(x)
    elif op == "rwkv7":
        x = dict(r=x.pop("q"), w=x.pop("gk"), **x)
        fn, names = lambda **t: chunk_rwkv7(**t, cu_seqlens=cu, output_final_state=True), list(x)
    else:
        x = dict(r=x.pop("q"), w=x.pop("gk"), kk=-x.pop("a"), **x)
        x["a"] = torch.rand_like(x.pop("b"))
        fn = lambda **t: fused_mul_recurrent_rwkv7(**t, cu_seqlens=cu, output_final_state=True)  # noqa: E731
        names = list(x)
    leaves = [x[n].clone().requires_grad_() for n in names]
    torch.autograd.gradcheck(lambda *t: fn(**dict(zip(names, t))), leaves)


def test_empty_sequence_batch():
    """T = 0: empty outputs, the final state a copy of the initial one, zero gradients through backward."""
    x = _inputs(B=2, T=0)
    x = {n: t.requires_grad_() if t.is_floating_point() else t for n, t in x.items()}
    o, ht = chunk_dplr_delta_rule(**x, output_final_state=True)
    assert o.shape == (2, 0, 2, 5)
    torch.testing.assert_close(ht, x["initial_state"].detach())
    (ht.sum()).backward()
    assert torch.equal(x["initial_state"].grad, torch.ones_like(x["initial_state"]))
    assert x["q"].grad is not None and x["q"].grad.shape == x["q"].shape


def test_bad_inputs():
    x = _inputs()
    q, k, v, a, b, gk = (x[n] for n in ("q", "k", "v", "a", "b", "gk"))
    with pytest.raises(ValueError, match=r"`a` must have shape \[B, T, H, K\]"):
        chunk_dplr_delta_rule(q, k, v, a[..., :-1], b, gk)
    with pytest.raises(ValueError, match=r"`gk` must have shape"):
        fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk[..., 0])
    with pytest.raises(ValueError, match=r"`w` must have shape"):
        chunk_rwkv7(q, gk[..., 0], k, v, a, b)
    with pytest.raises(TypeError, match="`b`"):
        chunk_iplr_delta_rule(q, k, v, a, b.long())
    with pytest.raises(ValueError, match="power of 2"):
        chunk_dplr_delta_rule(q, k, v, a, b, gk, chunk_size=48)
    with pytest.raises(ValueError, match="power of 2"):
        chunk_iplr_delta_rule(q, k, v, a, b, chunk_size=24)
    with pytest.raises(ValueError, match="lower_bound"):
        chunk_rwkv7(q, gk, k, v, a, b, lower_bound=0.0)
    with pytest.raises(NotImplementedError, match="cp_context"):
        chunk_dplr_delta_rule(q, k, v, a, b, gk, cp_context=object())
    with pytest.raises(DeprecationWarning, match="head_first"):
        chunk_dplr_delta_rule(q, k, v, a, b, gk, head_first=False)
    with pytest.raises(TypeError, match="bogus"):
        chunk_iplr_delta_rule(q, k, v, a, b, bogus=1)
    with pytest.raises(ValueError, match="scale"):
        fused_recurrent_iplr_delta_rule(q, k, v, a, b, scale=-1.0)
    with pytest.raises(TypeError, match="`kk`"):
        fused_mul_recurrent_rwkv7(q, gk, k, v, None, a)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_dplr_delta_rule(q, k, v, a, b, gk, initial_state=x["initial_state"][:1])


def test_tilelang_refuses_until_built():
    x = {n: t.float() for n, t in _inputs().items()}
    with pytest.raises(BackendError, match="not built yet"):
        chunk_dplr_delta_rule(**x, backend="tilelang")
    o, _ = chunk_dplr_delta_rule(**x, backend="torch")
    assert o.dtype == torch.float32 and torch.isfinite(o).all()


def test_logsigmoid_gates_are_stable_over_long_sequences():
    """the transition with normalised kk and rates in [0, 1) and decays < 1 keeps the state bounded (T = 2000)."""
    torch.manual_seed(4)
    B, T, H, K = 1, 2000, 1, 8
    kk = F.normalize(torch.randn(B, T, H, K), dim=-1)
    o, ht = fused_mul_recurrent_rwkv7(torch.randn(B, T, H, K), F.logsigmoid(torch.randn(B, T, H, K)),
                                      torch.randn(B, T, H, K) / K, torch.randn(B, T, H, K), kk,
                                      torch.rand(B, T, H, K), output_final_state=True)
    assert torch.isfinite(o).all() and ht.abs().max() < 1e3
