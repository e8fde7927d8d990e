"""DeltaNet and Gated DeltaNet: the chunked WY torch form against the token-by-token recurrence (fp64), grouped value
heads, the in-kernel options (L2 norm, beta sigmoid, negative eigenvalues, gate activation), validation, refusals."""

import pytest
import torch
import torch.nn.functional as F

from fla_tl.ops import (
    BackendError,
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_chunk_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)
from fla_tl.reference.delta_rule import chunk_gated_delta_rule_torch, l2norm, recurrent_gated_delta_rule
from fla_tl.reference.kda import recurrent_kda

from test_retention import _cu
from utils import Case, assert_close, assert_matches


def _inputs(B=2, T=70, H=2, HV=2, K=16, V=12, N=None, dtype=torch.float64, gate=True, normalize_k=True,
            state_v_first=False):
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, H, K)
    k = F.normalize(k, dim=-1) if normalize_k else k
    v = torch.randn(B, T, HV, V)
    beta = torch.rand(B, T, HV)
    g = F.logsigmoid(torch.randn(B, T, HV) + 2) if gate else None
    h0 = torch.randn((N or B, HV, V, K) if state_v_first else (N or B, HV, K, V))
    return {n: (x.to(dtype).requires_grad_() if x is not None else None)
            for n, x in dict(q=q, k=k, v=v, beta=beta, g=g, h0=h0).items()}


def _check(fn, x, backend=None, **kwargs):
    """fn against the recurrence (`fla_tl.testing`'s harness) on the inputs `x` (h0 as the initial state) and
    `kwargs` (the same for both): o, the final state and the gradient of every input."""
    args = {n: x[n] for n in ("q", "k", "v", "beta", "g") if x[n] is not None}
    args.update(initial_state=x["h0"], output_final_state=True, **kwargs)
    dtype = x["q"].dtype
    grad = tuple(n for n in ("q", "k", "v", "beta", "g", "initial_state") if args.get(n) is not None)
    case = Case(fn.__name__, args, grad, recurrent_gated_delta_rule, dtype=dtype,
                out_dtypes={"o": dtype, "ht": torch.float64 if dtype == torch.float64 else torch.float32})
    assert_matches(fn, case, backend)


@pytest.mark.parametrize("T", [1, 63, 64, 130])
@pytest.mark.parametrize("fn", [chunk_delta_rule, fused_recurrent_delta_rule], ids=["chunk", "fused_recurrent"])
def test_delta_rule(fn, T):
    _check(fn, _inputs(T=T, gate=False))


@pytest.mark.parametrize("HV", [2, 4], ids=["HV=H", "GVA"])
@pytest.mark.parametrize("T", [1, 63, 130])
def test_chunk_gated(T, HV):
    _check(chunk_gated_delta_rule, _inputs(T=T, HV=HV))


@pytest.mark.parametrize("HV", [2, 4], ids=["HV=H", "GVA"])
def test_fused_recurrent_gated(HV):
    _check(fused_recurrent_gated_delta_rule, _inputs(HV=HV))


def test_per_key_gate_on_top_of_g():
    """fused_recurrent_gated_delta_rule with `g` and a per-key `gk`: KDA's recurrence with the summed log gate (the
    decays multiply, as fla applies both), every gradient, `g`'s summed over the key channels."""
    x = _inputs(HV=4)
    gk = F.logsigmoid(torch.randn(2, 70, 4, 16, dtype=torch.float64) + 2).requires_grad_()
    args = dict(initial_state=x["h0"], output_final_state=True)
    o, ht = fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], gk=gk, beta=x["beta"], **args)
    want_o, want_ht = recurrent_kda(x["q"], x["k"], x["v"], gk + x["g"][..., None], x["beta"], **args)
    torch.testing.assert_close(o, want_o)
    torch.testing.assert_close(ht, want_ht)
    inputs = [x["q"], x["k"], x["v"], x["g"], gk, x["beta"], x["h0"]]
    got = torch.autograd.grad(o.sum() + ht.sum(), inputs)
    want = torch.autograd.grad(want_o.sum() + want_ht.sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule],
                         ids=["chunk", "fused_recurrent"])
def test_varlen_state_v_first(fn):
    lens = (1, 63, 0, 70)
    x = _inputs(B=1, T=sum(lens), HV=4, N=len(lens), state_v_first=True)
    _check(fn, x, state_v_first=True, cu_seqlens=_cu(lens))


def test_qk_l2norm_with_raw_keys():
    _check(chunk_gated_delta_rule, _inputs(normalize_k=False), use_qk_l2norm_in_kernel=True)


def test_l2norm_matches_fla():
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(l2norm(x), x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_beta_sigmoid(allow_neg_eigval):
    x = _inputs()
    logits = torch.randn(2, 70, 2, dtype=torch.float64)
    o, ht = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], logits, initial_state=x["h0"],
                                   output_final_state=True, use_beta_sigmoid_in_kernel=True,
                                   allow_neg_eigval=allow_neg_eigval)
    beta = logits.sigmoid() * (2 if allow_neg_eigval else 1)
    ro, rht = recurrent_gated_delta_rule(x["q"], x["k"], x["v"], beta, x["g"], initial_state=x["h0"],
                                         output_final_state=True)
    assert_close("o", o, ro, torch.float64)
    assert_close("ht", ht, rht, torch.float64)


def test_gate_in_kernel():
    x = _inputs()
    raw = torch.randn(2, 70, 2, dtype=torch.float64)
    A_log, dt_bias = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    o, _ = fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], raw, beta=x["beta"], use_gate_in_kernel=True,
                                            A_log=A_log, dt_bias=dt_bias)
    g = -A_log.exp() * F.softplus(raw + dt_bias)
    ro, _ = recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], g)
    assert_close("o", o, ro, torch.float64)
    o2, _ = chunk_gated_delta_rule(x["q"], x["k"], x["v"], raw, x["beta"], use_gate_in_kernel=True, A_log=A_log,
                                   dt_bias=dt_bias)
    assert_close("o", o2, ro, torch.float64)


def test_fp32_and_bf16_accepted():
    for dtype in (torch.float32, torch.bfloat16):
        _check(chunk_gated_delta_rule, _inputs(dtype=dtype))


def test_empty_sequence_and_defaults():
    x = _inputs(T=0)
    o, ht = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], initial_state=x["h0"], output_final_state=True)
    assert o.shape == (2, 0, 2, 12) and torch.equal(ht, x["h0"].detach().float().double())
    x = _inputs(T=20, gate=False)
    o1, _ = fused_recurrent_delta_rule(x["q"], x["k"], x["v"])
    o2, _ = fused_recurrent_delta_rule(x["q"], x["k"], x["v"], torch.ones(2, 20, 2, dtype=torch.float64))
    torch.testing.assert_close(o1, o2)


def test_bad_inputs():
    x = _inputs(HV=4)
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    with pytest.raises(ValueError, match="divisible by H = 2"):
        chunk_gated_delta_rule(q, k, v[:, :, :3], g[..., :3], beta[..., :3])
    with pytest.raises(ValueError, match=r"`beta` must have shape \[B, T, HV\] = \[2, 70, 4\]"):
        chunk_gated_delta_rule(q, k, v, g, beta[..., :2])
    with pytest.raises(ValueError, match=r"`initial_state` must have shape \[N, HV, K, V\]"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(2, 2, 16, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=128)
    with pytest.raises(ValueError, match="A_log"):
        chunk_gated_delta_rule(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(NotImplementedError, match="gv"):
        fused_recurrent_gated_delta_rule(q, k, v, gv=torch.zeros(2, 70, 4, 12))
    with pytest.raises(ValueError, match=r"`gk` must have shape \[B, T, HV, K\] = \[2, 70, 4, 16\]"):
        fused_recurrent_gated_delta_rule(q, k, v, gk=torch.zeros(2, 70, 4, 15, dtype=torch.float64), beta=beta)
    with pytest.raises(ValueError, match=r"`g` must have shape \[B, T, HV\] = \[2, 70, 4\]"):
        fused_recurrent_gated_delta_rule(q, k, v, g[..., :2], gk=torch.zeros(2, 70, 4, 16, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="cp_context"):
        chunk_gated_delta_rule(q, k, v, g, beta, cp_context=object())
    with pytest.raises(NotImplementedError, match="chunk_delta_rule instead"):
        fused_chunk_delta_rule(q=q)
    with pytest.raises(BackendError, match="tilelang"):
        chunk_delta_rule(q, k, v[:, :, :2], beta[..., :2], backend="tilelang")


# ---------------------------------------------------------------- the chunk backend's glue, stages emulated


def _packed_recurrence(q, k, v, beta, g, h0, scale, meta):
    """what the packed chunk stages compute: `[Ttot, HV, *]` q, k (repeated over the value heads), v, beta, g, the
    states `[N, HV, K, V]`; (o, final state) by the chunked PyTorch form (`torch.func` differentiates it)."""
    o, ht = chunk_gated_delta_rule_torch(q[None], k[None], v[None], beta[None], g[None] if g is not None else None,
                                       scale=scale, initial_state=h0, output_final_state=True,
                                       cu_seqlens=meta.cu.long())
    return o[0], ht


def _emulated_chunk(monkeypatch, op):
    """the chunk ops' tilelang backend on the CPU with the packed stages (`chunk.chunk_delta_rule_fwd` / `_bwd`)
    emulated in PyTorch: the backend's own glue runs (grouped value heads, L2 norm, state layouts, the WY
    inverse kept as the residual)."""
    pytest.importorskip("tilelang")
    from fla_tl.kernels.delta_rule import chunk as C
    from fla_tl.registry import get_op

    def fwd(q, k, v, beta, g, *, scale, initial_state, output_final_state, meta):
        o, ht = _packed_recurrence(q, k, v, beta, g, initial_state, scale, meta)
        # a stand-in for the WY inverse, with its shape and dtype
        return o.to(q.dtype), (ht if output_final_state else None), torch.full((*k.shape[:2], 64), 7.0, dtype=k.dtype)

    def bwd(q, k, v, beta, g, ai, do, dht, *, scale, initial_state, meta):
        assert ai.shape == (*k.shape[:2], 64) and ai.dtype == k.dtype and bool((ai == 7).all())
        xs = (q, k, v, beta, g, initial_state)

        def f(*present):
            found = iter(present)
            full = [next(found) if x is not None else None for x in xs]
            return _packed_recurrence(*full[:5], full[5], scale, meta)

        # torch.func: the backward also runs inside the custom op, where autograd records nothing
        (_, ht), vjp = torch.func.vjp(f, *(x for x in xs if x is not None))
        found = iter(vjp((do, dht if dht is not None else torch.zeros_like(ht))))
        return tuple(next(found) if x is not None else None for x in xs)

    monkeypatch.setattr(C, "chunk_delta_rule_fwd", fwd)
    monkeypatch.setattr(C, "chunk_delta_rule_bwd", bwd)
    # the backend's capabilities name CUDA: accept the CPU here
    monkeypatch.setattr(get_op(op.__name__).backend("tilelang"), "verifier", lambda inputs: [])


@pytest.mark.parametrize(("gated", "HV", "lens", "l2norm"), [
    pytest.param(False, 2, None, False, id="delta"),
    pytest.param(True, 4, None, True, id="gated-GVA-l2norm"),
    pytest.param(True, 4, (1, 63, 0, 70), False, id="gated-GVA-varlen-vfirst"),
])
def test_chunk_glue_with_emulated_stages(gated, HV, lens, l2norm, monkeypatch):
    op = chunk_gated_delta_rule if gated else chunk_delta_rule
    _emulated_chunk(monkeypatch, op)
    varlen = lens is not None
    x = _inputs(B=1 if varlen else 2, T=sum(lens) if varlen else 70, HV=HV, N=len(lens) if varlen else None,
                dtype=torch.float32, gate=gated, normalize_k=not l2norm, state_v_first=varlen)
    kw = dict(cu_seqlens=_cu(lens), state_v_first=True) if varlen else {}
    _check(op, x, backend="tilelang", use_qk_l2norm_in_kernel=l2norm, **kw)


def test_chunk_custom_ops_with_emulated_stages(monkeypatch):
    """the custom ops `fla_tl::chunk_gated_delta_rule_fwd` / `_bwd` on the tilelang backend: their fakes (the residual
    Ai) match the real outputs (`torch.library.opcheck`), and under torch.compile the op matches eager."""
    _emulated_chunk(monkeypatch, chunk_gated_delta_rule)
    x = _inputs(HV=4, dtype=torch.float32, normalize_k=False, state_v_first=True)
    args = (x["q"], x["k"], x["v"], x["beta"], x["g"], x["h0"], None, 0.3, True, True, True)
    torch.library.opcheck(torch.ops.fla_tl.chunk_gated_delta_rule_fwd.default, (*args, True, "tilelang"))

    def run(fn):
        o, ht = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=0.3, initial_state=x["h0"], output_final_state=True,
                   state_v_first=True, use_qk_l2norm_in_kernel=True, backend="tilelang")
        return (o, ht, *torch.autograd.grad((o * o).sum() + (ht * ht).sum(), [x["q"], x["beta"], x["g"], x["h0"]]))

    eager = run(chunk_gated_delta_rule)
    compiled = run(torch.compile(chunk_gated_delta_rule, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("D", "dtype"), [(128, torch.bfloat16), (64, torch.bfloat16), (64, torch.float32)],
                         ids=["D128-bf16", "D64-bf16", "D64-fp32"])
@pytest.mark.parametrize("name", ["chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_gated_delta_rule",
                                  "fused_recurrent_gated_delta_rule"])
def test_kernel_list_matches_the_launchers(name, D, dtype, monkeypatch):
    """`spec.kernels(D, dtype)` is exactly what the launchers build (factory and keywords), forward and backward, over
    every option the op takes and every grid size (the fused and the chunk-parallel forward, the small- and
    large-grid pass configs on a GPU of 132 multiprocessors): the launchers run on the CPU with `get_kernel`
    recording and the kernels doing nothing."""
    pytest.importorskip("tilelang")
    from fla_tl.autotune import resolve
    from fla_tl.autotune.configs import KERNELS
    from fla_tl.kernels.common import chunk_delta_h, chunk_o, cumsum, fused_chunk_delta, fused_recurrent_delta, wy
    from fla_tl.kernels.common.utils import TORCH_TO_TL
    from fla_tl.kernels.delta_rule import chunk
    from fla_tl.registry import get_op

    built = set()

    def record(factory, target, **kwargs):
        built.add((factory, tuple(sorted(kwargs.items()))))
        return lambda *args: None

    for module in (chunk_delta_h, chunk_o, cumsum, fused_chunk_delta, wy, fused_recurrent_delta):
        monkeypatch.setattr(module, "get_kernel", record)
    # the grid the passes' defaults depend on, as on a GPU of 132 multiprocessors
    monkeypatch.setattr(resolve, "launch_grid",
                        lambda name, ref, N: (N * ref.shape[1], 132) if KERNELS[name].grid else None)
    monkeypatch.setattr(chunk, "sm_count", lambda device: 132)
    spec = get_op(name)
    monkeypatch.setattr(spec.backend("tilelang"), "verifier", lambda inputs: [])
    gated = "gated" in name
    # sequences x value heads: 4 (chunk-parallel forward, small grid), 24 (fused at V = 128, small grid), 40 (fused
    # at V = 64 too, small grid), 100 (fused, large)
    for B, HV in ((2, 2), (6, 4), (10, 4), (25, 4)):
        for g_on, svf in [(g_on, svf) for g_on in (False, True) for svf in (False, True)] if gated else [(False,) * 2]:
            x = _inputs(B=B, T=3, H=2, HV=HV, K=D, V=D, dtype=dtype, gate=g_on, state_v_first=svf)
            kw = dict(initial_state=x["h0"], output_final_state=True, backend="tilelang")
            if gated:
                o, ht = spec.fn(x["q"], x["k"], x["v"], x["g"], beta=x["beta"], state_v_first=svf, **kw)
            else:
                o, ht = spec.fn(x["q"], x["k"], x["v"], x["beta"], **kw)
            torch.autograd.grad((o.float().sum() + ht.sum()), [x["q"]])
    listed = {(k.factory, tuple(sorted(k.kwargs.items()))) for k in spec.kernels(D, TORCH_TO_TL[dtype])}
    name_of = lambda ks: sorted((f.__name__, kw) for f, kw in ks)  # noqa: E731
    assert built == listed, (f"built, not listed: {name_of(built - listed)}; "
                             f"listed, not built: {name_of(listed - built)}")


# ---------------------------------------------------------------- the WY stages (`fla_tl.kernels.common.wy`)


def _wy_reference(k, v, beta, g, cu, BT):
    """(w, u, Ai) per chunk by `torch.linalg.solve_triangular`, packed `[Ttot, H, *]` inputs, fp64."""
    Ttot, H, K = k.shape
    w, u, ai = torch.zeros_like(k), torch.zeros_like(v), k.new_zeros(Ttot, H, BT)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t0 in range(s, e, BT):
            n = min(e, t0 + BT) - t0
            kc, vc, bc = k[t0:t0 + n].transpose(0, 1), v[t0:t0 + n].transpose(0, 1), beta[t0:t0 + n].T  # [H, n, *]
            b = g[t0:t0 + n].T.cumsum(-1) if g is not None else torch.zeros_like(bc)
            a = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * (b[..., :, None] - b[..., None, :]).exp()).tril(-1)
            inv = torch.linalg.inv(torch.eye(n, dtype=k.dtype) + a)
            ai[t0:t0 + n, :, :n] = inv.transpose(0, 1)
            w[t0:t0 + n] = (inv @ (kc * (bc * b.exp())[..., None])).transpose(0, 1)
            u[t0:t0 + n] = (inv @ (vc * bc[..., None])).transpose(0, 1)
    return w, u, ai


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize(("lens", "D", "dtype"), [
    pytest.param((500,), 128, torch.bfloat16, id="T500-D128-bf16"),
    pytest.param((1, 300, 0, 77), 100, torch.float32, id="varlen-D100-fp32"),
])
def test_wy_kernels(lens, D, dtype, gate):
    """the WY kernel (the inverse and the pair) against solve-by-inverse in fp64 on the same (rounded) inputs."""
    from fla_tl.kernels.common.cumsum import chunk_gate_cumsum
    from fla_tl.kernels.common.utils import seq_meta
    from fla_tl.kernels.common.wy import wy_repr

    Ttot, H = sum(lens), 4
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    meta = seq_meta(1, Ttot, cu, 64, torch.device("cuda"))
    k = torch.nn.functional.normalize(torch.randn(Ttot, H, D, device="cuda"), dim=-1).to(dtype)
    v = torch.randn(Ttot, H, D, device="cuda").to(dtype)
    beta = torch.rand(Ttot, H, device="cuda").to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(Ttot, H, device="cuda") + 2) if gate else None
    gc = chunk_gate_cumsum(g, torch.zeros(H, device="cuda"), meta) if gate else None
    w, u, ai = wy_repr(k, v, beta, meta=meta, gc=gc)
    rw, ru, rai = _wy_reference(*(x.double().cpu() for x in (k, v, beta)), g.double().cpu() if gate else None,
                                cu.cpu(), 64)
    from utils import Case, assert_close, assert_matches

    assert_close("Ai", ai.float().cpu(), rai, dtype)
    assert_close("w", w.cpu(), rw, dtype)
    assert_close("u", u.cpu(), ru, dtype)


def _state_pass_reference(q, k, w, u, do, gc, cu, scale, BT=64):
    """the state passes in fp64 from the WY pair: (h entering each chunk, v_new, dh leaving each chunk, dv_new)."""
    q, k, w, u, do = (x.double() for x in (q, k, w, u, do))
    H, K, V = k.shape[1], k.shape[2], u.shape[2]
    b = gc.double() if gc is not None else torch.zeros(k.shape[:2], dtype=torch.float64, device=k.device)
    v_new, dv_new, hs, dhs = torch.zeros_like(u), torch.zeros_like(u), [], []
    for n in range(len(cu) - 1):
        starts = [(t0, min(t0 + BT, int(cu[n + 1]))) for t0 in range(int(cu[n]), int(cu[n + 1]), BT)]
        S = torch.zeros(H, K, V, dtype=torch.float64, device=k.device)
        for t0, t1 in starts:
            hs.append(S.clone())
            bc, bl = b[t0:t1], b[t1 - 1]
            v_new[t0:t1] = u[t0:t1] - torch.einsum("thk,hkv->thv", w[t0:t1], S)
            S = S * torch.exp2(bl)[:, None, None] + torch.einsum(
                "thk,thv->hkv", k[t0:t1] * torch.exp2(bl - bc)[..., None], v_new[t0:t1])
        dS, seq_dhs = torch.zeros_like(S), []
        for t0, t1 in reversed(starts):
            seq_dhs.append(dS.clone())
            bc, bl = b[t0:t1], b[t1 - 1]
            s = (torch.einsum("ihk,jhk->hij", q[t0:t1], k[t0:t1]) * scale
                 * torch.exp2(bc.T[:, :, None] - bc.T[:, None, :])).tril()
            dv_new[t0:t1] = torch.einsum("hij,ihv->jhv", s, do[t0:t1]) + torch.einsum(
                "jhk,hkv->jhv", k[t0:t1] * torch.exp2(bl - bc)[..., None], dS)
            dS = (dS * torch.exp2(bl)[:, None, None]
                  + torch.einsum("ihk,ihv->hkv", q[t0:t1] * (scale * torch.exp2(bc))[..., None], do[t0:t1])
                  - torch.einsum("jhk,jhv->hkv", w[t0:t1], dv_new[t0:t1]))
        dhs.extend(reversed(seq_dhs))
    return torch.stack(hs, 1), v_new, torch.stack(dhs, 1), dv_new


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["none", "g"])
@pytest.mark.parametrize(("lens", "dtype", "K", "V", "config"), [
    pytest.param((200, 130), torch.bfloat16, 128, 128, {}, id="bf16-K128-default"),
    pytest.param((200, 130), torch.bfloat16, 128, 128, dict(BV=128, threads=256), id="bf16-K128-BV128-thr256"),
    pytest.param((200, 130), torch.bfloat16, 128, 128, dict(BV=64, threads=256), id="bf16-K128-BV64-thr256"),
    pytest.param((200, 130), torch.bfloat16, 128, 128, dict(BV=32, threads=128), id="bf16-K128-BV32"),
    pytest.param((200, 130), torch.bfloat16, 128, 128, dict(BV=32, threads=256), id="bf16-K128-BV32-thr256"),
    pytest.param((1, 130, 0, 77), torch.float32, 64, 48, {}, id="varlen-fp32-K64-V48"),
    pytest.param((1, 130, 0, 77), torch.float32, 64, 48, dict(num_stages=2), id="varlen-fp32-K64-V48-stages2"),
    pytest.param((70, 64), torch.float16, 100, 72, {}, id="fp16-K100-V72"),
])
def test_state_passes(lens, dtype, K, V, config, gate):
    """the two state passes (forming the WY pair from the inverse) at each tile config the launchers pick, against
    the passes in fp64 on the WY pair of `wy_repr`: the states, v_new, the state gradients and dv_new."""
    from fla_tl.kernels.common.chunk_delta_h import chunk_delta_bwd_dhu, chunk_delta_fwd_h
    from fla_tl.kernels.common.cumsum import chunk_gate_cumsum
    from fla_tl.kernels.common.utils import seq_meta
    from fla_tl.kernels.common.wy import wy_repr

    Ttot, H = sum(lens), 4
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    meta = seq_meta(1, Ttot, cu, 64, torch.device("cuda"))
    q = torch.randn(Ttot, H, K, device="cuda").to(dtype)
    k = torch.nn.functional.normalize(torch.randn(Ttot, H, K, device="cuda"), dim=-1).to(dtype)
    v, do = torch.randn(Ttot, H, V, device="cuda").to(dtype), torch.randn(Ttot, H, V, device="cuda").to(dtype)
    beta = torch.rand(Ttot, H, device="cuda")
    # gates near 1 (about 0.995 a token): the states carry across chunks, so w S matters in v_new
    g = torch.nn.functional.logsigmoid(torch.randn(Ttot, H, device="cuda") + 5) if gate == "g" else None
    gc = chunk_gate_cumsum(g, torch.zeros(H, device="cuda"), meta) if gate == "g" else None
    w, u, ai = wy_repr(k, v, beta, meta=meta, gc=gc)
    kw = dict(gate=gate, gc=gc, meta=meta, **config)
    h, v_new, _ = chunk_delta_fwd_h(k, v, beta, ai, initial_state=None, output_final_state=False, **kw)
    dh, dv_new, _ = chunk_delta_bwd_dhu(q, k, beta, ai, do, None, scale=K ** -0.5, need_dh0=False, **kw)
    rh, rv, rdh, rdv = _state_pass_reference(q, k, w, u, do, gc, cu.tolist(), K ** -0.5)
    from fla_tl.testing import compare

    # every output compared before the verdict (the two passes are independent)
    results = {name: compare(a, b, dtype) for name, a, b in (
        ("h", h.transpose(0, 1), rh), ("v_new", v_new, rv), ("dh", dh.transpose(0, 1), rdh), ("dv_new", dv_new, rdv))}
    assert all(ok for ok, _ in results.values()), "; ".join(f"{n}: {d}" for n, (ok, d) in results.items() if not ok)


def test_wy_reference_matches_the_chunked_form():
    """the test's solve-by-inverse WY pair reproduces the chunked form's states: with S = 0 entering a chunk, u - w S
    is u, the corrected values (I + A)^-1 diag(beta) V, so k^T u is the state after one chunk from zero."""
    torch.manual_seed(0)
    T, H, K = 40, 2, 8
    k = torch.nn.functional.normalize(torch.randn(T, H, K, dtype=torch.float64), dim=-1)
    v, beta = torch.randn(T, H, K, dtype=torch.float64), torch.rand(T, H, dtype=torch.float64)
    _, u, _ = _wy_reference(k, v, beta, None, torch.tensor([0, T]), 64)
    h = torch.zeros(H, K, K, dtype=torch.float64)
    for t in range(T):  # the delta rule, token by token
        h = h + torch.einsum("hk,hv->hkv", k[t], beta[t, :, None] * (v[t] - torch.einsum("hkv,hk->hv", h, k[t])))
    torch.testing.assert_close(torch.einsum("thk,thv->hkv", k, u), h)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize(("lens", "dtype", "state_v_first"), [
    pytest.param((300,), torch.bfloat16, False, id="T300-bf16"),
    pytest.param((1, 130, 0, 64), torch.float32, True, id="varlen-fp32-vfirst"),
])
def test_tilelang_fused_recurrent_ops(lens, dtype, state_v_first, gated):
    """the public fused_recurrent ops on the tilelang backend (grouped value heads, L2 norm in the op), every
    gradient against the recurrence in fp64."""
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2, lens[0])
    state_v_first = state_v_first and gated  # fused_recurrent_delta_rule takes no state_v_first (as fla)
    x = _inputs(B=B, T=T, H=2, HV=4, K=64, V=48, N=len(lens) if varlen else None, dtype=torch.float32, gate=gated,
                normalize_k=False, state_v_first=state_v_first)
    x = {n: (t.detach().to("cuda", dtype if n in ("q", "k", "v") else torch.float32).requires_grad_()
             if t is not None else None) for n, t in x.items()}
    kw = dict(backend="tilelang", use_qk_l2norm_in_kernel=True, cu_seqlens=_cu(lens, "cuda") if varlen else None)
    if gated:
        _check(fused_recurrent_gated_delta_rule, x, state_v_first=state_v_first, **kw)
    else:
        _check(fused_recurrent_delta_rule, x, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize(("lens", "dtype", "state_v_first", "H", "HV", "K", "V"), [
    pytest.param((300,), torch.bfloat16, False, 2, 4, 64, 48, id="T300-bf16-GVA-K64-V48"),
    pytest.param((1, 130, 0, 64), torch.float32, True, 2, 4, 64, 48, id="varlen-fp32-vfirst"),
    pytest.param((500,), torch.bfloat16, False, 2, 2, 128, 128, id="T500-bf16-K128"),
    pytest.param((63,), torch.float16, False, 1, 1, 100, 72, id="T63-fp16-K100-V72"),
    pytest.param((200,), torch.bfloat16, False, 1, 2, 256, 256, id="T200-bf16-K256"),
    pytest.param((1000,), torch.bfloat16, False, 2, 2, 128, 128, id="T1000-bf16-K128"),
    pytest.param((130,), torch.float32, False, 1, 1, 128, 128, id="T130-fp32-K128"),
])
@pytest.mark.parametrize("schedule", ["fused", "parallel"])
def test_tilelang_chunk_ops(lens, dtype, state_v_first, H, HV, K, V, gated, schedule, monkeypatch):
    """the public chunk ops on the tilelang backend (the chunked WY kernels, the fused and the chunk-parallel forward;
    L2 norm in the op), every gradient against the recurrence in fp64."""
    from fla_tl.kernels.delta_rule import chunk as delta_chunk

    monkeypatch.setattr(delta_chunk, "FUSED_MIN_BLOCKS_PER_SM", 0 if schedule == "fused" else float("inf"))
    varlen = len(lens) > 1
    B, T = (1, sum(lens)) if varlen else (2 if lens[0] < 1000 else 1, lens[0])
    state_v_first = state_v_first and gated  # chunk_delta_rule takes no state_v_first (as fla)
    x = _inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, N=len(lens) if varlen else None, dtype=torch.float32, gate=gated,
                normalize_k=False, state_v_first=state_v_first)
    x = {n: (t.detach().to("cuda", dtype if n in ("q", "k", "v") else torch.float32).requires_grad_()
             if t is not None else None) for n, t in x.items()}
    kw = dict(backend="tilelang", use_qk_l2norm_in_kernel=True, cu_seqlens=_cu(lens, "cuda") if varlen else None)
    if gated:
        _check(chunk_gated_delta_rule, x, state_v_first=state_v_first, **kw)
    else:
        _check(chunk_delta_rule, x, **kw)
