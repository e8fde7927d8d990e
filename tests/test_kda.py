"""KDA: the PyTorch reference (`fla_tl.reference.kda`; the token-by-token recurrence against the paper's matrix update
written out in fp64, the chunked form against the recurrence, the gate and beta activations, the argument checks),
and the ops `fused_recurrent_kda` / `chunk_kda`: on the CPU the tilelang backend's glue with its kernels emulated in
PyTorch, serving from a state pool (tilelang emulated and torch), the validation; the kernel list and its builds for
sm_90a; on the GPU the TileLang kernels against the fp32 recurrence, o, the final state and every gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_delta_rule_fused_recurrent import SM90A, _emulated
from utils import Case, assert_close, assert_matches, rms

from fla_tl.ops import chunk_kda, fused_recurrent_kda
from fla_tl.reference.delta_rule import recurrent_gated_delta_rule
from fla_tl.reference.kda import kda_beta, kda_gate, recurrent_kda
from fla_tl.registry import get_op


def _paper_update(q, k, v, g, beta, scale, h0):
    """one sequence `[T, H, K]` q, k, `[T, HV, V]` v, `[T, HV, K]` g, `[T, HV]` beta, `h0` `[HV, K, V]`:
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t, in fp64."""
    T, H, K = q.shape
    HV = v.shape[1]
    S = h0.clone()
    eye = torch.eye(K, dtype=torch.float64)
    outs = []
    for t in range(T):
        o_t = []
        for j in range(HV):
            kt, qt = k[t, j // (HV // H)], q[t, j // (HV // H)]
            S[j] = (eye - beta[t, j] * torch.outer(kt, kt)) @ torch.diag(g[t, j].exp()) @ S[j] \
                + beta[t, j] * torch.outer(kt, v[t, j])
            o_t.append(scale * S[j].T @ qt)
        outs.append(torch.stack(o_t))
    return (torch.stack(outs) if outs else v.new_zeros(0, HV, v.shape[-1])), S


@pytest.mark.parametrize("state_v_first", [False, True])
def test_recurrence_is_the_paper_update(state_v_first):
    """varlen (an empty sequence too), GVA (4 value heads on 2 key heads), an initial state, both state layouts."""
    lens = (5, 0, 17, 9)
    T, H, HV, K, V = sum(lens), 2, 4, 6, 5
    torch.manual_seed(0)
    q, k = torch.randn(1, T, H, K, dtype=torch.float64), torch.randn(1, T, H, K, dtype=torch.float64) / K ** 0.5
    v = torch.randn(1, T, HV, V, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(1, T, HV, K, dtype=torch.float64))
    beta = torch.rand(1, T, HV, dtype=torch.float64)
    h0 = torch.randn(len(lens), HV, K, V, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    o, ht = recurrent_kda(q, k, v, g, beta, scale=0.3, output_final_state=True, cu_seqlens=cu,
                          initial_state=h0.transpose(-1, -2) if state_v_first else h0, state_v_first=state_v_first)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want_o, want_h = _paper_update(q[0, bos:eos], k[0, bos:eos], v[0, bos:eos], g[0, bos:eos], beta[0, bos:eos],
                                       0.3, h0[n])
        torch.testing.assert_close(o[0, bos:eos], want_o)
        torch.testing.assert_close(ht[n].transpose(-1, -2) if state_v_first else ht[n], want_h)


def test_a_gate_equal_over_keys_is_the_gated_delta_rule():
    torch.manual_seed(1)
    q, k = torch.randn(2, 30, 2, 8, dtype=torch.float64), torch.randn(2, 30, 2, 8, dtype=torch.float64)
    v, beta = torch.randn(2, 30, 2, 4, dtype=torch.float64), torch.rand(2, 30, 2, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(2, 30, 2, dtype=torch.float64))
    got = recurrent_kda(q, k, v, g[..., None].expand(-1, -1, -1, 8), beta, output_final_state=True,
                        use_qk_l2norm_in_kernel=True)
    want = recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True, use_qk_l2norm_in_kernel=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gradients_flow_to_every_input():
    """the reference is differentiable (the torch backend and the gradient tests rely on it), the gate included."""
    torch.manual_seed(2)
    shapes = dict(q=(1, 12, 1, 4), k=(1, 12, 1, 4), v=(1, 12, 2, 3), g=(1, 12, 2, 4), beta=(1, 12, 2))
    x = {n: torch.randn(s, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
    h0 = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, g, beta, h0):
        o, ht = recurrent_kda(q, k, v, F.logsigmoid(g), beta.sigmoid(), initial_state=h0, output_final_state=True)
        return o, ht

    torch.autograd.gradcheck(f, (*x.values(), h0))


def test_gate_activation():
    torch.manual_seed(3)
    g = torch.randn(1, 7, 3, 4, dtype=torch.float64) * 3
    A_log, dt_bias = torch.randn(3, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    soft = kda_gate(g, A_log, dt_bias)
    torch.testing.assert_close(soft, -A_log.exp()[:, None] * F.softplus(g + dt_bias.view(3, 4)))
    assert (soft <= 0).all()
    bounded = kda_gate(g, A_log, dt_bias, lower_bound=-5.0)
    torch.testing.assert_close(bounded, -5.0 * torch.sigmoid(A_log.exp()[:, None] * (g + dt_bias.view(3, 4))))
    assert ((bounded > -5.0) & (bounded < 0)).all()
    torch.testing.assert_close(kda_gate(g, None, None, lower_bound=-2.0), -2.0 * torch.sigmoid(g))
    assert kda_gate(g.float(), A_log, dt_bias).dtype == torch.float32
    with pytest.raises(ValueError, match="A_log is required"):
        kda_gate(g, None, dt_bias)


def test_beta_activation():
    beta = torch.randn(2, 5, 3)
    assert kda_beta(beta, False, True) is beta  # allow_neg_eigval only with the sigmoid, as in fla
    torch.testing.assert_close(kda_beta(beta, True, False), beta.sigmoid())
    torch.testing.assert_close(kda_beta(beta, True, True), 2 * beta.sigmoid())


def test_gate_shape_is_checked():
    q = k = torch.randn(1, 5, 2, 4)
    v, beta = torch.randn(1, 5, 2, 3), torch.rand(1, 5, 2)
    with pytest.raises(ValueError, match=r"g must be \[B, T, HV, K\]"):
        recurrent_kda(q, k, v, torch.randn(1, 5, 2), beta)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_form_matches_the_recurrence(chunk_size):
    """the chunked form (partial chunks, varlen with an empty sequence, GVA, an initial state, strong gates whose
    products over a chunk underflow) against the recurrence, outputs, final states and gradients, in fp64."""
    from fla_tl.reference.kda import chunk_kda_torch

    torch.manual_seed(4)
    lens = (37, 0, 70, 1)
    T, H, HV, K, V = sum(lens), 1, 2, 8, 4
    x = dict(q=torch.randn(1, T, H, K), k=torch.randn(1, T, H, K), v=torch.randn(1, T, HV, V),
             g=F.logsigmoid(torch.randn(1, T, HV, K) * 4) * 3, beta=torch.rand(1, T, HV))
    x = {n: t.double().requires_grad_() for n, t in x.items()}
    h0 = torch.randn(len(lens), HV, K, V, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    got = chunk_kda_torch(*x.values(), chunk_size=chunk_size, **kw)
    want = recurrent_kda(*x.values(), **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    dout = [torch.randn_like(t) for t in want]
    inputs = [*x.values(), h0]
    for a, b in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- fused_recurrent_kda: inputs and the reference

def _reference(q, k, v, g, beta, A_log=None, dt_bias=None, use_gate_in_kernel=False, lower_bound=None,
               use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, **kwargs):
    """`fused_recurrent_kda`'s math by the reference: the gate and beta activations (`kda_gate`, `kda_beta`), then
    `recurrent_kda` (in the inputs' dtype, at least fp32); differentiable in every tensor."""
    if use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    return recurrent_kda(q, k, v, g, kda_beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval), **kwargs)


def _kda_args(lens, H, HV, K, V, *, dtype, device="cpu", varlen=False, h0=True, output_final_state=True,
              **options) -> tuple[dict, tuple[str, ...]]:
    """the arguments of `fused_recurrent_kda` (dense for one length repeated, B = len(lens); packed for varlen, B = 1)
    and the names of those that get gradients: q, k, v in `dtype` (k L2-normalised unless the kernel normalises it),
    log gates `F.logsigmoid(randn + 2)` in fp32, or the raw gate input in `dtype` with `A_log` `[HV]`, `dt_bias`
    `[HV * K]` fp32 for `use_gate_in_kernel`; betas in [0, 1) (logits with `use_beta_sigmoid_in_kernel`); an fp32
    initial state; `options` passed on."""
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    N = len(lens)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    k = k if options.get("use_qk_l2norm_in_kernel") else F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V)
    beta = torch.randn(B, T, HV) if options.get("use_beta_sigmoid_in_kernel") else torch.rand(B, T, HV)
    args = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), beta=beta.to(dtype))
    if options.get("use_gate_in_kernel"):
        args.update(g=(torch.randn(B, T, HV, K) - 2).to(dtype), A_log=torch.randn(HV) * 0.5,
                    dt_bias=torch.randn(HV * K) * 0.5)
    else:
        args["g"] = F.logsigmoid(torch.randn(B, T, HV, K) + 2)
    svf = options.get("state_v_first", False)
    args["initial_state"] = torch.randn((N, HV, V, K) if svf else (N, HV, K, V)) if h0 else None
    args["cu_seqlens"] = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]) if varlen else None
    args = {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in args.items()}
    args.update(output_final_state=output_final_state, **options)
    grad = tuple(n for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state")
                 if isinstance(args.get(n), torch.Tensor))
    return args, grad


def _leaf(x, grad: bool, dtype=None):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    x = x.detach().to(dtype or x.dtype)
    return x.requires_grad_() if grad else x


def _check_against_fp64(args: dict, grad: tuple[str, ...], backend: str, tol: float = 2e-5) -> None:
    """`fused_recurrent_kda(**args)` against `_reference` in fp64 on the same values: o (q's dtype), the final state
    (fp32) and the gradient of every argument in `grad` (its dtype), each to a relative RMS error of `tol`."""
    x = {n: _leaf(t, n in grad) for n, t in args.items()}
    ref = {n: _leaf(t, n in grad, torch.float64) for n, t in args.items()}
    got = [t for t in fused_recurrent_kda(**x, backend=backend) if t is not None]
    want = [t for t in _reference(**ref) if t is not None]
    assert len(got) == len(want) == (2 if args["output_final_state"] else 1)
    cotangents = [torch.randn_like(t) for t in want]
    got_grads = torch.autograd.grad(got, [x[n] for n in grad], [c.to(t.dtype) for c, t in zip(cotangents, got)])
    want_grads = torch.autograd.grad(want, [ref[n] for n in grad], cotangents)
    names = ["o", "ht"][:len(got)] + [f"d{n}" for n in grad]
    dtypes = [args["q"].dtype, torch.float32][:len(got)] + [args[n].dtype for n in grad]
    failed = []
    for name, dtype, a, b in zip(names, dtypes, [*got, *got_grads], [*want, *want_grads]):
        if a.dtype != dtype or a.shape != b.shape:
            failed.append(f"{name}: {a.dtype} {tuple(a.shape)}, want {dtype} {tuple(b.shape)}")
            continue
        err = rms(a.double() - b) / max(rms(b), 1e-30)
        if not (torch.isfinite(a).all() and err <= tol):
            failed.append(f"{name}: relative rms error {err:.2e}")
    assert not failed, "; ".join(failed)


def _kda_emulated(monkeypatch) -> dict:
    """fused_recurrent_kda's tilelang backend on the CPU with the token-by-token kernels emulated in PyTorch
    (`test_delta_rule_fused_recurrent._emulated`); returns the head dims to test at."""
    config = _emulated(monkeypatch)
    # the backend's capabilities name CUDA: accept the CPU here
    monkeypatch.setattr(get_op("fused_recurrent_kda").backend("tilelang"), "verifier", lambda inputs: [])
    return config


# ---------------------------------------------------------------- the tilelang backend's glue on the CPU

GLUE_CASES = {
    "dense-gva": dict(lens=(40, 40), H=2, HV=4),
    "varlen-svf": dict(lens=(1, 50, 0, 23), H=1, HV=2, varlen=True, state_v_first=True),
    "l2norm-raw-keys": dict(lens=(37, 37), H=2, HV=2, use_qk_l2norm_in_kernel=True),
    "no-states": dict(lens=(30,), H=1, HV=2, h0=False, output_final_state=False),
    "gate-in-kernel": dict(lens=(33, 33), H=2, HV=4, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True),
    "gate-lower-bound-varlen": dict(lens=(1, 40, 0, 9), H=1, HV=2, varlen=True, use_gate_in_kernel=True,
                                    lower_bound=-5.0, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True),
}


@pytest.mark.parametrize("case", list(GLUE_CASES.values()), ids=list(GLUE_CASES))
def test_fused_recurrent_glue_with_emulated_kernels(case, monkeypatch):
    """the tilelang backend's forward, residuals and backward (the grouped value heads, the L2 norm, both state
    layouts, the gate and beta activations) with its kernels emulated in fp32, at a padded head dim (K = 12) and two
    backward V tiles (V = 40), against the reference in fp64: o, the final state and the gradients of q, k, v, beta
    and the initial state."""
    config = _kda_emulated(monkeypatch)
    args, grad = _kda_args(K=config["K"], V=config["V"], dtype=torch.float32, **case)
    _check_against_fp64(args, grad, "tilelang")


# ---------------------------------------------------------------- serving from a state pool on the CPU


def _serve_reference(args: dict, pool, slots, accepted):
    """(o `[B, T, HV, V]` fp64, the pool after the call in fp64, the slots written) by the reference in fp64, token by
    token from each sequence's starting slot (zero for a negative one)."""
    q, k, v, g, beta = (args[n].double() for n in ("q", "k", "v", "g", "beta"))
    B, T = q.shape[:2]
    cu = args["cu_seqlens"].tolist() if args.get("cu_seqlens") is not None else [n * T for n in range(B + 1)]
    flat = [x.reshape(B * T, 1, *x.shape[2:]) for x in (q, k, v, g, beta)]
    after, written = pool.double().clone(), set()
    o = torch.empty(B * T, *v.shape[2:], dtype=torch.float64)
    rows = slots.view(len(cu) - 1, -1).tolist()
    for n, (bos, eos) in enumerate(zip(cu[:-1], cu[1:])):
        start = rows[n][int(accepted[n]) - 1] if accepted is not None else rows[n][0]
        h = pool[start].double() if start >= 0 else torch.zeros_like(pool[0], dtype=torch.float64)
        for t in range(bos, eos):
            out, h = recurrent_kda(*(x[t:t + 1] for x in flat), initial_state=h[None], output_final_state=True,
                                   state_v_first=args.get("state_v_first", False),
                                   use_qk_l2norm_in_kernel=args.get("use_qk_l2norm_in_kernel", False))
            o[t], h = out[0, 0], h[0]
            if len(rows[n]) > 1 and rows[n][t - bos] >= 0:
                after[rows[n][t - bos]] = h
                written.add(rows[n][t - bos])
        if len(rows[n]) == 1 and start >= 0:
            after[start] = h
            written.add(start)
    return o.view(B, T, *v.shape[2:]), after, written


# (lens, H, HV, varlen, slots, num_accepted_tokens, options)
SERVE_CASES = {
    "decode": ((1, 1, 1), 2, 4, False, [5, -1, 2], None, {}),
    "speculative-l2norm": ((3, 3), 1, 2, False, [[6, 0, 3], [1, -1, 4]], [2, 1], {"use_qk_l2norm_in_kernel": True}),
    "varlen-svf": ((3, 0, 5, 1), 2, 2, True, [6, 1, -1, 3], None, {"state_v_first": True}),
}


@pytest.mark.parametrize("backend", ["tilelang", "torch"])
@pytest.mark.parametrize("case", list(SERVE_CASES.values()), ids=list(SERVE_CASES))
def test_fused_recurrent_serving(case, backend, monkeypatch):
    """`ssm_state_indices`: each sequence starts from its slot (`num_accepted_tokens`: the slot of its last accepted
    token; a negative slot: a zero state) and writes back in place its final state (`[N]` slots) or the state after
    each token (`[N, T]`); a negative slot and every slot not named are left as they were; the pool is returned."""
    lens, H, HV, varlen, slots, accepted, options = case
    config = _kda_emulated(monkeypatch) if backend == "tilelang" else {"K": 12, "V": 40}
    K, V = config["K"], config["V"]
    args, _ = _kda_args(lens, H, HV, K, V, dtype=torch.float32, varlen=varlen, h0=False, **options)
    pool = torch.randn((8, HV, V, K) if options.get("state_v_first") else (8, HV, K, V))
    before = pool.clone()
    slots = torch.tensor(slots)
    accepted = torch.tensor(accepted) if accepted is not None else None
    want_o, want_pool, written = _serve_reference(args, before, slots, accepted)
    with torch.no_grad():
        o, ht = fused_recurrent_kda(**{**args, "initial_state": pool}, ssm_state_indices=slots,
                                    num_accepted_tokens=accepted, backend=backend)
    assert ht is pool
    assert o.dtype == torch.float32 and o.shape == want_o.shape
    torch.testing.assert_close(o.double(), want_o, rtol=1e-5, atol=1e-5)
    for slot in range(pool.shape[0]):
        if slot in written:
            torch.testing.assert_close(pool[slot].double(), want_pool[slot], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(pool[slot], before[slot]), f"slot {slot} was written"


# ---------------------------------------------------------------- chunk_kda's glue with emulated kernels


def _chunks(cu, chunk_indices, BT=64):
    """(chunk index, sequence, first token, valid rows) of every chunk."""
    cu, ci = cu.tolist(), chunk_indices.tolist()
    return [(i, n, cu[n] + c * BT, min(cu[n + 1] - cu[n] - c * BT, BT)) for i, (n, c) in enumerate(ci)]


def _emulate_chunk(factory, **kw):
    """a PyTorch stand-in (fp64 inside) with the signature and semantics of each kernel chunk_kda launches: the
    cumulative gates (log2), the per-key WY inverse, the state passes with gate "gk", GLA's output stage, the dq / dk
    / dw pass, the WY backward and the gate gradient's stages. Outputs are written only where the kernels write."""
    name = factory.__name__
    BT = kw.get("BT", 64)
    d = torch.float64

    def scores(a, b, G, lower):
        # sum_k a_i b_j 2^(G_i - G_j), masked (j < i, or j <= i)
        s = (a[:, None, :] * b[None, :, :] * torch.exp2(G[:, None, :] - G[None, :, :])).sum(-1)
        return torch.tril(s, -1 if lower == "strict" else 0)

    if name == "chunk_gate_cumsum_kernel":
        def run(g, g_gamma, A_log, dt_bias, cu, chunk_indices, gc, lower_bound):
            act, group = kw.get("act", ""), kw.get("group", 1)
            x = g.to(d)
            if act:
                x, a = x + dt_bias.to(d), A_log.to(d).exp().repeat_interleave(group)
                x = -a * F.softplus(x) if act == "softplus" else lower_bound * torch.sigmoid(a * x)
            for _, _, t0, nv in _chunks(cu, chunk_indices):
                gc[t0:t0 + nv] = ((x[t0:t0 + nv] + g_gamma.to(d)) * math.log2(math.e)).cumsum(0).to(gc.dtype)
    elif name == "wy_fwd_kernel":
        def run(k, v, beta, g_gamma, gc, cu, chunk_indices, ai, w, u):
            for _, _, t0, nv in _chunks(cu, chunk_indices):
                for h in range(k.shape[1]):
                    kk, G = k[t0:t0 + nv, h].to(d), gc[t0:t0 + nv, h].to(d)
                    A = beta[t0:t0 + nv, h].to(d)[:, None] * scores(kk, kk, G, "strict")
                    inv = torch.linalg.inv(torch.eye(nv, dtype=d) + A)
                    ai[t0:t0 + nv, h] = 0
                    ai[t0:t0 + nv, h, :nv] = inv.to(ai.dtype)
    elif name == "chunk_delta_fwd_h_kernel":
        def run(k, v, ai, betac, g_gamma, gc, h0, cu, chunk_offsets, h, v_new, ht, use_h0, store_ht):
            H, K, V = k.shape[1], k.shape[2], v.shape[2]
            for n in range(cu.numel() - 1):
                bos, eos, boc = int(cu[n]), int(cu[n + 1]), int(chunk_offsets[n])
                for hh in range(H):
                    S = h0[n * H + hh].to(d).clone() if use_h0 else torch.zeros(K, V, dtype=d)
                    for c, t0 in enumerate(range(bos, eos, BT)):
                        nv = min(eos - t0, BT)
                        kk, vv, G = k[t0:t0 + nv, hh].to(d), v[t0:t0 + nv, hh].to(d), gc[t0:t0 + nv, hh].to(d)
                        aw = ai[t0:t0 + nv, hh, :nv].to(d) * betac[hh, boc + c, :nv].to(d)[None]
                        h[boc + c, hh] = S.to(h.dtype)
                        vn = aw @ vv - aw @ (kk * torch.exp2(G)) @ S
                        v_new[t0:t0 + nv, hh] = vn.to(v_new.dtype)
                        S = torch.exp2(G[-1])[:, None] * S + (kk * torch.exp2(G[-1] - G)).T @ vn
                    if store_ht:
                        ht[n * H + hh] = S.to(ht.dtype)
    elif name == "chunk_gla_fwd_o_kernel":
        def run(q, k, v, h, gc, cu, chunk_indices, o, A, u, scale, store_A):
            for i, _, t0, nv in _chunks(cu, chunk_indices):
                for hh in range(q.shape[1]):
                    qq, kk, G = q[t0:t0 + nv, hh].to(d), k[t0:t0 + nv, hh].to(d), gc[t0:t0 + nv, hh].to(d)
                    Aq = scale * scores(qq, kk, G, "causal")
                    o[t0:t0 + nv, hh] = (scale * (qq * torch.exp2(G)) @ h[i, hh].to(d)
                                         + Aq @ v[t0:t0 + nv, hh].to(d)).to(o.dtype)
                    if store_A:
                        A[t0:t0 + nv, hh] = 0
                        A[t0:t0 + nv, hh, :nv] = Aq.to(A.dtype)
    elif name == "chunk_delta_bwd_dhu_kernel":
        def run(q, k, ai, betac, do, g_gamma, gc, aqk, dht, cu, chunk_offsets, dh, dv_new, dh0, scale, use_dht,
                store_dh0):
            H, K, V = q.shape[1], q.shape[2], do.shape[2]
            for n in range(cu.numel() - 1):
                bos, eos, boc = int(cu[n]), int(cu[n + 1]), int(chunk_offsets[n])
                for hh in range(H):
                    dS = dht[n * H + hh].to(d).clone() if use_dht else torch.zeros(K, V, dtype=d)
                    starts = list(range(bos, eos, BT))
                    for c in reversed(range(len(starts))):
                        t0 = starts[c]
                        nv = min(eos - t0, BT)
                        qq, kk, G = q[t0:t0 + nv, hh].to(d), k[t0:t0 + nv, hh].to(d), gc[t0:t0 + nv, hh].to(d)
                        dO = do[t0:t0 + nv, hh].to(d)
                        aw = ai[t0:t0 + nv, hh, :nv].to(d) * betac[hh, boc + c, :nv].to(d)[None]
                        dh[boc + c, hh] = dS.to(dh.dtype)
                        dvn = aqk[t0:t0 + nv, hh, :nv].to(d).T @ dO + (kk * torch.exp2(G[-1] - G)) @ dS
                        dv_new[t0:t0 + nv, hh] = dvn.to(dv_new.dtype)
                        dS = (torch.exp2(G[-1])[:, None] * dS + scale * (qq * torch.exp2(G)).T @ dO
                              - (kk * torch.exp2(G)).T @ (aw.T @ dvn))
                    if store_dh0:
                        dh0[n * H + hh] = dS.to(dh0.dtype)
    elif name == "chunk_delta_bwd_dqkw_kernel":
        def run(q, k, v, do, du, h, dh, g_gamma, gc, cu, chunk_indices, dq, dk, dw, r, cs, scale):
            for i, _, t0, nv in _chunks(cu, chunk_indices):
                for hh in range(q.shape[1]):
                    qq, kk, G = q[t0:t0 + nv, hh].to(d), k[t0:t0 + nv, hh].to(d), gc[t0:t0 + nv, hh].to(d)
                    vn, dO, dvn = (x[t0:t0 + nv, hh].to(d) for x in (v, do, du))
                    S, dS = h[i, hh].to(d), dh[i, hh].to(d)
                    dA = torch.tril(dO @ vn.T) * scale
                    E = torch.exp2(G[:, None, :] - G[None, :, :])
                    dqc = scale * (dO @ S.T) * torch.exp2(G) + (dA[:, :, None] * kk[None] * E).sum(1)
                    dkc = (vn @ dS.T) * torch.exp2(G[-1] - G) + (dA[:, :, None] * qq[:, None, :] * E).sum(0)
                    dq[t0:t0 + nv, hh], dk[t0:t0 + nv, hh] = dqc.to(dq.dtype), dkc.to(dk.dtype)
                    dw[t0:t0 + nv, hh] = (-dvn @ S.T).to(dw.dtype)
                    r[t0:t0 + nv, hh] = (qq * dqc - kk * dkc).to(r.dtype)
    elif name == "wy_bwd_kernel":
        def run(k, v, beta, g_gamma, gc, ai, du, dw, cu, chunk_indices, dk, dv, dbeta, db):
            for _, _, t0, nv in _chunks(cu, chunk_indices):
                for hh in range(k.shape[1]):
                    kk, vv, G = k[t0:t0 + nv, hh].to(d), v[t0:t0 + nv, hh].to(d), gc[t0:t0 + nv, hh].to(d)
                    b, Ai = beta[t0:t0 + nv, hh].to(d), ai[t0:t0 + nv, hh, :nv].to(d)
                    dW, dU = dw[t0:t0 + nv, hh].to(d), du[t0:t0 + nv, hh].to(d)
                    kg = kk * torch.exp2(G)
                    Sc = scores(kk, kk, G, "strict")
                    dA = torch.tril(-Ai.T @ ((dW @ kg.T + dU @ vv.T) * b[None]) @ Ai.T, -1)
                    dSc = b[:, None] * dA
                    E = torch.exp2(G[:, None, :] - G[None, :, :])
                    X, Y = Ai.T @ dW, Ai.T @ dU
                    dky = b[:, None] * torch.exp2(G) * X
                    row = (dSc[:, :, None] * kk[None] * E).sum(1)
                    col = (dSc[:, :, None] * kk[:, None, :] * E).sum(0)
                    dk[t0:t0 + nv, hh] = (dk[t0:t0 + nv, hh].to(d) + dky + row + col).to(dk.dtype)
                    db[t0:t0 + nv, hh] = (kk * (dky + row - col)).to(db.dtype)
                    dv[t0:t0 + nv, hh] = (b[:, None] * Y).to(dv.dtype)
                    dbeta[t0:t0 + nv, hh] = ((X * kg).sum(1) + (dA * Sc).sum(1) + (Y * vv).sum(1)).to(dbeta.dtype)
    elif name == "chunk_state_dot_kernel":
        def run(h, dh, ht, cu, chunk_indices, c):
            cl = cu.tolist()
            for i, n, t0, nv in _chunks(cu, chunk_indices):
                S = ht[n] if t0 + nv >= cl[n + 1] else h[i + 1]
                c[i] = (S.to(d) * dh[i].to(d)).sum(-1).to(c.dtype)
    elif name == "chunk_reverse_cumsum_kernel":
        def run(x, c, cu, chunk_indices, y):
            for i, _, t0, nv in _chunks(cu, chunk_indices):
                y[t0:t0 + nv] = (x[t0:t0 + nv].to(d).flip(0).cumsum(0).flip(0) + c[i].to(d)).to(y.dtype)
    else:
        raise AssertionError(f"no emulation of {name}")
    return run


def _chunk_emulated(monkeypatch):
    """chunk_kda's tilelang backend on the CPU with its kernels emulated (`_emulate_chunk`)."""
    pytest.importorskip("tilelang")
    from fla_tl.kernels.common import chunk_delta_h, cumsum, wy
    from fla_tl.kernels.gla import chunk as gla_chunk

    for module in (chunk_delta_h, cumsum, wy, gla_chunk):
        monkeypatch.setattr(module, "get_kernel", lambda factory, target, **kw: _emulate_chunk(factory, **kw))
    monkeypatch.setattr(get_op("chunk_kda").backend("tilelang"), "verifier", lambda inputs: [])


@pytest.mark.parametrize("case", ["dense-gva-h0", "varlen-svf-l2norm", "gate-softplus", "gate-lower-bound"])
def test_chunk_glue_with_emulated_kernels(case, monkeypatch):
    """chunk_kda's tilelang backend on the CPU, its kernels emulated in PyTorch (`_emulate_chunk`), against the fp64
    recurrence: o, the final state and every gradient (A_log, dt_bias through the activation), over partial chunks,
    an empty and a one-token sequence, grouped value heads and both state layouts."""
    _chunk_emulated(monkeypatch)
    options = {"dense-gva-h0": {},
               "varlen-svf-l2norm": {"state_v_first": True, "use_qk_l2norm_in_kernel": True},
               "gate-softplus": {"use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True},
               "gate-lower-bound": {"use_gate_in_kernel": True, "lower_bound": -5.0}}[case]
    lens, varlen = ((1, 70, 0, 129), True) if case.startswith("varlen") else ((70, 70), False)
    args, grad = _kda_args(lens, 2, 4, 12, 10, dtype=torch.float32, varlen=varlen, **options)
    x = {n: _leaf(t, n in grad) for n, t in args.items()}
    ref = {n: _leaf(t, n in grad, torch.float64) for n, t in args.items()}
    got = chunk_kda(**x, backend="tilelang")
    want = _reference(**ref)
    cot = [torch.randn_like(t) for t in want]
    got_grads = torch.autograd.grad(got, [x[n] for n in grad], [c.to(t.dtype) for c, t in zip(cot, got)])
    want_grads = torch.autograd.grad(want, [ref[n] for n in grad], cot)
    failed = []
    for name, a, b in zip(["o", "ht", *(f"d{n}" for n in grad)], [*got, *got_grads], [*want, *want_grads]):
        err = rms(a.double() - b) / max(rms(b), 1e-30) if a.shape == b.shape else float("inf")
        if not err < 2e-5:
            failed.append(f"{name}: {tuple(a.shape)} relative RMS error {err:.2e}")
    assert not failed, "; ".join(failed)


@pytest.mark.parametrize("gate", ["log-gates", "gate-in-kernel"])
def test_chunk_custom_ops_with_emulated_kernels(gate, monkeypatch):
    """the custom ops `fla_tl::chunk_kda_fwd` / `_bwd` on the tilelang backend (kernels emulated): their fakes (the
    residuals: cumulative gates, WY inverse, intra-chunk scores) match the real outputs (`torch.library.opcheck`), and
    under torch.compile the op and its gradients match eager."""
    _chunk_emulated(monkeypatch)
    options = {"use_gate_in_kernel": True} if gate == "gate-in-kernel" else {}
    args, grad = _kda_args((1, 70, 0, 45), 2, 4, 12, 10, dtype=torch.float32, varlen=True, **options)
    x = {n: _leaf(t, n in grad) for n, t in args.items()}
    spec_args = dict(q=x["q"], k=x["k"], v=x["v"], beta=x["beta"], g=x["g"], initial_state=x["initial_state"],
                     cu_seqlens=x["cu_seqlens"], scale=0.3, output_final_state=True, state_v_first=False,
                     use_qk_l2norm_in_kernel=False, A_log=x.get("A_log"), dt_bias=x.get("dt_bias"),
                     gate_act="softplus" if options else "", lower_bound=0.0)
    torch.library.opcheck(torch.ops.fla_tl.chunk_kda_fwd.default, (*spec_args.values(), True, "tilelang"))

    def run(fn):
        o, ht = fn(**x, scale=0.3, backend="tilelang")
        return (o, ht, *torch.autograd.grad((o * o).sum() + (ht * ht).sum(), [x[n] for n in grad]))

    eager = run(chunk_kda)
    compiled = run(torch.compile(chunk_kda, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- validation


def test_bad_inputs():
    from fla_tl.registry import BackendError

    args, _ = _kda_args((20, 20), 2, 4, 8, 6, dtype=torch.float32, h0=False, output_final_state=False)
    x = [args[n] for n in ("q", "k", "v", "g", "beta")]
    q, k, v, g, beta = x
    with pytest.raises(ValueError, match=r"`g` must have shape \[B, T, HV, K\]"):
        fused_recurrent_kda(q, k, v, g[..., 0], beta)
    with pytest.raises(ValueError, match=r"`g` must have shape \[B, T, HV, K\]"):
        chunk_kda(q, k, v, g[..., 0], beta)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        fused_recurrent_kda(*x, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="A_log"):
        fused_recurrent_kda(*x, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="A_log"):
        fused_recurrent_kda(*x, use_gate_in_kernel=True, A_log=torch.zeros(2))
    with pytest.raises(ValueError, match="dt_bias"):
        chunk_kda(*x, use_gate_in_kernel=True, A_log=torch.zeros(4), dt_bias=torch.zeros(4))
    with pytest.raises(ValueError, match="lower_bound"):
        chunk_kda(*x, use_gate_in_kernel=True, safe_gate=True, lower_bound=-6.0)
    with pytest.raises(ValueError, match="lower_bound"):
        chunk_kda(*x, use_gate_in_kernel=True, safe_gate=True)
    with pytest.raises(TypeError, match="bogus"):
        fused_recurrent_kda(*x, bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        chunk_kda(*x, bogus=1)
    for option, value in (("cp_context", object()), ("use_graph", True), ("return_intermediate_states", True)):
        with pytest.raises(NotImplementedError, match=option):
            chunk_kda(*x, **{option: value})
    with pytest.raises(BackendError, match="tilelang"):
        chunk_kda(*x, backend="tilelang")

    pool, slots = torch.randn(8, 4, 8, 6), torch.tensor([5, 2])
    with pytest.raises(ValueError, match="num_accepted_tokens"):
        fused_recurrent_kda(*x, initial_state=pool, num_accepted_tokens=torch.tensor([1, 1]))
    with torch.no_grad(), pytest.raises(ValueError, match="initial_state"):
        fused_recurrent_kda(*x, initial_state=pool.double(), ssm_state_indices=slots)
    with torch.no_grad(), pytest.raises(ValueError, match="initial_state"):
        fused_recurrent_kda(*x, initial_state=pool[:, :2], ssm_state_indices=slots)
    with torch.no_grad(), pytest.raises(ValueError, match="ssm_state_indices"):
        fused_recurrent_kda(*x, initial_state=pool, ssm_state_indices=torch.tensor([5, 2, 1]))
    with torch.no_grad(), pytest.raises(TypeError, match="ssm_state_indices"):
        fused_recurrent_kda(*x, initial_state=pool, ssm_state_indices=slots.float())
    with torch.no_grad(), pytest.raises(ValueError, match="num_accepted_tokens"):
        fused_recurrent_kda(*x, initial_state=pool, ssm_state_indices=slots, num_accepted_tokens=torch.tensor([1]))
    with pytest.raises(ValueError, match="ssm_state_indices"):
        fused_recurrent_kda(q.requires_grad_(), k, v, g, beta, initial_state=pool, ssm_state_indices=slots)


# ---------------------------------------------------------------- the kernels: the list, the builds


def test_kernel_list_matches_the_launchers(monkeypatch):
    """`spec.kernels(D, dtype)` is exactly what fused_recurrent_kda's launchers build (factory and keywords): forward
    and backward in both state layouts, and the serving forward, on the CPU with `get_kernel` recording and the
    kernels doing nothing."""
    pytest.importorskip("tilelang")
    from fla_tl.kernels.common import cumsum, fused_recurrent_delta
    from fla_tl.kernels.common.utils import TORCH_TO_TL

    built = set()

    def record(factory, target, **kwargs):
        built.add((factory, tuple(sorted(kwargs.items()))))
        return lambda *args: None

    for module in (cumsum, fused_recurrent_delta):
        monkeypatch.setattr(module, "get_kernel", record)
    spec = get_op("fused_recurrent_kda")
    monkeypatch.setattr(spec.backend("tilelang"), "verifier", lambda inputs: [])
    gates = ({}, {"use_gate_in_kernel": True}, {"use_gate_in_kernel": True, "lower_bound": -5.0})
    for D, dtype in ((128, torch.bfloat16), (64, torch.float32)):
        built.clear()
        for svf, gate in [(svf, gate) for svf in (False, True) for gate in gates]:
            args, grad = _kda_args((3, 3), 2, 4, D, D, dtype=dtype, state_v_first=svf, **gate)
            x = {n: _leaf(t, n in grad) for n, t in args.items()}
            o, ht = fused_recurrent_kda(**x, backend="tilelang")
            torch.autograd.grad(o.float().sum() + ht.sum(), [x["g"]])
            with torch.no_grad():
                pool = torch.zeros((4, 4, D, D))
                fused_recurrent_kda(**{**args, "initial_state": pool}, ssm_state_indices=torch.tensor([0, 1]),
                                    backend="tilelang")
        listed = {(k.factory, tuple(sorted(k.kwargs.items()))) for k in spec.kernels(D, TORCH_TO_TL[dtype])}
        name_of = lambda ks: sorted((f.__name__, kw) for f, kw in ks)  # noqa: E731
        assert built == listed, (f"D={D} {dtype}: built, not listed: {name_of(built - listed)}; "
                                 f"listed, not built: {name_of(listed - built)}")


def test_chunk_kernel_list_matches_the_launchers(monkeypatch):
    """`spec.kernels(D, dtype)` of chunk_kda is exactly what its launchers build (factory and keywords), forward and
    backward, on the CPU with `get_kernel` recording and the kernels doing nothing; a small grid and a large one (the
    state passes' two tile configs)."""
    pytest.importorskip("tilelang")
    from fla_tl.autotune import resolve
    from fla_tl.autotune.configs import KERNELS
    from fla_tl.kernels.common import chunk_delta_h, cumsum, wy
    from fla_tl.kernels.common.utils import TORCH_TO_TL
    from fla_tl.kernels.gla import chunk as gla_chunk

    built = set()

    def record(factory, target, **kwargs):
        built.add((factory, tuple(sorted(kwargs.items()))))
        return lambda *args: None

    for module in (chunk_delta_h, cumsum, wy, gla_chunk):
        monkeypatch.setattr(module, "get_kernel", record)
    # the grid the passes' defaults depend on, as on a GPU of 132 multiprocessors
    monkeypatch.setattr(resolve, "launch_grid",
                        lambda name, ref, N: (N * ref.shape[1], 132) if KERNELS[name].grid else None)
    spec = get_op("chunk_kda")
    monkeypatch.setattr(spec.backend("tilelang"), "verifier", lambda inputs: [])
    gates = ({}, {"use_gate_in_kernel": True}, {"use_gate_in_kernel": True, "lower_bound": -5.0})
    for D, dtype in ((128, torch.bfloat16), (64, torch.float32)):
        built.clear()
        for lens, HV, gate in (((70, 70), 4, gates[0]), ((64,) * 64, 32, gates[0]), ((70,), 2, gates[1]),
                               ((70,), 2, gates[2])):
            args, grad = _kda_args(lens, 2, HV, D, D, dtype=dtype, **gate)
            x = {n: _leaf(t, n in grad) for n, t in args.items()}
            o, ht = chunk_kda(**x, backend="tilelang")
            torch.autograd.grad(o.float().sum() + ht.sum(), [x["g"]])
        listed = {(k.factory, tuple(sorted(k.kwargs.items()))) for k in spec.kernels(D, TORCH_TO_TL[dtype])}
        name_of = lambda ks: sorted((f.__name__, kw) for f, kw in ks)  # noqa: E731
        assert built == listed, (f"D={D} {dtype}: built, not listed: {name_of(built - listed)}; "
                                 f"listed, not built: {name_of(listed - built)}")


def _compile_specs():
    try:
        from fla_tl.kernels.common.fused_recurrent_delta import fused_recurrent_delta_rule_fwd_kernel  # noqa: F401
    except Exception:  # noqa: BLE001 - without tilelang the module does not import; the marker skips these
        return [pytest.param(None, id="tilelang-missing")]
    params, seen = [], set()
    # chunk_kda's at D = 128 bf16 (its fp32 tiles build in the GPU tests)
    for op, D, dtype in (("fused_recurrent_kda", 128, "bfloat16"), ("fused_recurrent_kda", 64, "float32"),
                         ("chunk_kda", 128, "bfloat16")):
        for spec in get_op(op).kernels(D, dtype):
            key = (spec.factory, tuple(sorted(spec.kwargs.items())))
            # the activated gate options at one head dim and dtype (their code differs in the gate loads only)
            if key in seen or (D == 64 and spec.kwargs.get("gate") not in (None, "gk", "none")):
                continue
            seen.add(key)
            flags = [f for f in ("state_v_first", "pool") if spec.kwargs.get(f)]
            gate = [spec.kwargs["gate"]] if "gate" in spec.kwargs else []
            tiles = [f"BV{spec.kwargs['BV']}"] if spec.name.startswith("chunk_delta") else []
            params.append(pytest.param(spec, id="-".join([spec.factory.__name__, f"D{D}", dtype, *gate, *flags,
                                                          *tiles])))
    return params


@pytest.mark.compile
@pytest.mark.parametrize("spec", _compile_specs())
def test_kernel_builds_for_sm90a(spec):
    from fla_tl.kernels.common.utils import get_kernel

    kernel = get_kernel(spec.factory, SM90A, **spec.kwargs)
    assert "__global__" in kernel.get_kernel_source()


# ---------------------------------------------------------------- the TileLang kernels on the GPU

# (lens, H, HV, K, V, dtype, varlen, options): dense B = len(lens), or packed sequences of lens (B = 1)
GPU_CASES = {
    "T1-D128-bf16-gva": ((1, 1), 2, 4, 128, 128, torch.bfloat16, False, {}),
    "T1-D128-fp32": ((1, 1), 4, 4, 128, 128, torch.float32, False, {}),
    "T63-D128-bf16": ((63, 63), 4, 4, 128, 128, torch.bfloat16, False, {}),
    "T63-D64-fp32-gva": ((63, 63), 2, 4, 64, 64, torch.float32, False, {}),
    "T63-K100-V60-bf16-gva": ((63, 63), 2, 4, 100, 60, torch.bfloat16, False, {}),
    "T63-D128-fp32-svf-gva": ((63, 63), 2, 4, 128, 128, torch.float32, False, {"state_v_first": True}),
    "T63-D128-bf16-no-states": ((63, 63), 2, 4, 128, 128, torch.bfloat16, False,
                                {"h0": False, "output_final_state": False}),
    "T500-D128-bf16-gva": ((500, 500), 2, 4, 128, 128, torch.bfloat16, False, {}),
    "T500-D128-fp32": ((500, 500), 4, 4, 128, 128, torch.float32, False, {}),
    "T500-D128-bf16-l2norm": ((500, 500), 2, 4, 128, 128, torch.bfloat16, False, {"use_qk_l2norm_in_kernel": True}),
    "varlen-D128-bf16-gva": ((1, 200, 0, 299), 2, 4, 128, 128, torch.bfloat16, True, {}),
    "varlen-D128-fp32-svf": ((1, 200, 0, 299), 4, 4, 128, 128, torch.float32, True, {"state_v_first": True}),
    "varlen-K100-V60-fp32-gva": ((1, 200, 0, 299), 2, 4, 100, 60, torch.float32, True, {}),
    "T63-D128-bf16-gate-in-kernel": ((63, 63), 2, 4, 128, 128, torch.bfloat16, False,
                                     {"use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True}),
    "varlen-D128-fp32-gate-lower-bound": ((1, 200, 0, 299), 2, 4, 128, 128, torch.float32, True,
                                          {"use_gate_in_kernel": True, "lower_bound": -5.0}),
}
# the gate's gradients on cases where the read of k in the delta correction matters (an initial state, T > 1)
def _gpu_case(case) -> Case:
    """fused_recurrent_kda and the reference (in fp32 on the GPU) on the same inputs: o in the inputs' dtype, the final
    state in fp32, the gradients of every input in their dtypes."""
    lens, H, HV, K, V, dtype, varlen, options = case
    args, grad = _kda_args(lens, H, HV, K, V, dtype=dtype, device="cuda", varlen=varlen, **options)
    return Case("fused_recurrent_kda", args, grad, _reference,
                outputs=("o", "ht") if args["output_final_state"] else ("o",), dtype=dtype,
                out_dtypes={"o": dtype, "ht": torch.float32})


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_fused_recurrent(case, poisoned_cuda):
    assert_matches(fused_recurrent_kda, _gpu_case(case), "tilelang")


# chunk_kda's kernels: fp32 inputs with K <= 64; "strong" multiplies the log gates by 8 (chunks whose decay span
# takes the sub-chunk form of the per-key scores)
CHUNK_GPU_CASES = {
    "T1-D128-bf16-gva": ((1, 1), 2, 4, 128, 128, torch.bfloat16, False, {}),
    "T63-D128-bf16": ((63, 63), 4, 4, 128, 128, torch.bfloat16, False, {}),
    "T63-D64-fp32-gva": ((63, 63), 2, 4, 64, 64, torch.float32, False, {}),
    "T63-K100-V60-bf16-gva": ((63, 63), 2, 4, 100, 60, torch.bfloat16, False, {}),
    "T63-D128-bf16-no-states": ((63, 63), 2, 4, 128, 128, torch.bfloat16, False,
                                {"h0": False, "output_final_state": False}),
    "T500-D128-bf16-gva": ((500, 500), 2, 4, 128, 128, torch.bfloat16, False, {}),
    "T200-D256-bf16-gva": ((200, 200), 2, 4, 256, 256, torch.bfloat16, False, {}),
    "T500-D64-fp32-svf": ((500, 500), 4, 4, 64, 64, torch.float32, False, {"state_v_first": True}),
    "T500-D128-bf16-l2norm": ((500, 500), 2, 4, 128, 128, torch.bfloat16, False, {"use_qk_l2norm_in_kernel": True}),
    "T500-D128-bf16-strong": ((500, 500), 2, 4, 128, 128, torch.bfloat16, False, {"strong": True}),
    "varlen-D128-bf16-gva": ((1, 200, 0, 299), 2, 4, 128, 128, torch.bfloat16, True, {}),
    "varlen-D64-fp32-svf": ((1, 200, 0, 299), 4, 4, 64, 64, torch.float32, True, {"state_v_first": True}),
    "T63-D128-bf16-gate-in-kernel": ((63, 63), 2, 4, 128, 128, torch.bfloat16, False,
                                     {"use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True}),
    "varlen-D128-bf16-gate-lower-bound": ((1, 200, 0, 299), 2, 4, 128, 128, torch.bfloat16, True,
                                          {"use_gate_in_kernel": True, "lower_bound": -5.0}),
}


def _chunk_args(case) -> dict:
    lens, H, HV, K, V, dtype, varlen, options = case
    options = dict(options)
    strong = options.pop("strong", False)
    args, _ = _kda_args(lens, H, HV, K, V, dtype=dtype, device="cuda", varlen=varlen, **options)
    if strong:
        args["g"] = args["g"] * 8
    return args


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CHUNK_GPU_CASES.values()), ids=list(CHUNK_GPU_CASES))
def test_chunk(case, poisoned_cuda):
    """chunk_kda's TileLang kernels against the fp32 recurrence: o, the final state and every gradient."""
    args = _chunk_args(case)
    dtype = args["q"].dtype
    grad = tuple(n for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state")
                 if isinstance(args.get(n), torch.Tensor))
    assert_matches(chunk_kda, Case("chunk_kda", args, grad, _reference,
                                   outputs=("o", "ht") if args["output_final_state"] else ("o",), dtype=dtype,
                                   out_dtypes={"o": dtype, "ht": torch.float32}), "tilelang")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["decode", "speculative"])
def test_fused_recurrent_serving_gpu(mode, dtype, poisoned_cuda):
    """the serving forward on a pool of 40 slots against the torch backend on the same inputs: decode (B = 16, T = 1,
    a padding slot -1) and speculative decoding (B = 8, T = 4, a slot per token, accepted tokens in 1..4, one
    sequence padded throughout); the slots not written hold their states bit for bit."""
    decode = mode == "decode"
    B, T, H, HV, D, P = (16, 1, 4, 8, 128, 40) if decode else (8, 4, 4, 8, 128, 40)
    args, _ = _kda_args((T,) * B, H, HV, D, D, dtype=dtype, device="cuda", h0=False)
    pool = torch.randn(P, HV, D, D, device="cuda")
    slots = torch.randperm(P)[:B * T].view(B, T)
    slots[3] = -1
    slots = slots[:, 0] if decode else slots
    accepted = None if decode else torch.randint(1, T + 1, (B,), device="cuda")
    slots = slots.cuda()
    found = {}
    for backend in ("tilelang", "torch"):
        p = pool.clone()
        with torch.no_grad():
            o, ht = fused_recurrent_kda(**{**args, "initial_state": p}, ssm_state_indices=slots,
                                        num_accepted_tokens=accepted, backend=backend)
        assert ht is p
        found[backend] = (o, p)
    (o, p), (want_o, want_p) = found["tilelang"], found["torch"]
    written = sorted(set(slots[slots >= 0].tolist()))
    untouched = [s for s in range(P) if s not in written]
    assert_close("o", o, want_o, dtype)
    assert_close("written slots", p[written], want_p[written], dtype)
    assert torch.equal(p[untouched], pool[untouched]) and torch.equal(want_p[untouched], pool[untouched])


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["log-gates", "gate-in-kernel"])
def test_decode_allocates_only_its_output(gate):
    """a decode step (T = 1, 64 sequences, states in a pool) with fp32 gates, betas and int32 slots allocates one
    tensor on the GPU, its output, once the first call has built the kernel and its cached placeholders; and with the
    raw gate input activated in the kernel, the same."""
    options = {"use_gate_in_kernel": True} if gate == "gate-in-kernel" else {}
    args, _ = _kda_args((1,) * 64, 4, 8, 128, 128, dtype=torch.bfloat16, device="cuda", h0=False, **options)
    args = {n: x.float() if n in ("g", "beta") else x for n, x in args.items()}
    pool = torch.randn(80, 8, 128, 128, device="cuda")
    slots = torch.randperm(80, device="cuda")[:64].to(torch.int32)
    with torch.no_grad():
        fused_recurrent_kda(**{**args, "initial_state": pool}, ssm_state_indices=slots, backend="tilelang")
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        o, _ = fused_recurrent_kda(**{**args, "initial_state": pool}, ssm_state_indices=slots, backend="tilelang")
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after - before == 1, f"a decode step allocated {after - before} tensors (want 1: the output)"
