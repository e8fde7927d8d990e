"""The (gated) delta rule's TileLang token-by-token kernels (`fla_tl.kernels.delta_rule`) through
`fused_recurrent_gated_delta_rule`'s tilelang backend against the fp32 recurrence: o, the final state and every
gradient (q, k, v, beta, g, h0) on the GPU; the kernels' builds for sm_90a; and, on the CPU, the backend's glue (its
forward, residuals and backward, eager and as custom ops) with the kernels emulated in PyTorch (the backward's
identities, the forward's scaled state)."""

import pytest
import torch
import torch.nn.functional as F
from utils import Case, assert_matches

from fla_tl.autotune.resolve import heuristic_config
from fla_tl.ops import fused_recurrent_gated_delta_rule
from fla_tl.reference.delta_rule import recurrent_gated_delta_rule
from fla_tl.registry import get_op

SM90A = {"kind": "cuda", "arch": "sm_90a"}


def _inputs(lens, H, HV, K, V, *, dtype, gate, normalize_k=True, state_v_first=False, h0=True, varlen=False,
            device="cuda", strong_decay=False):
    """q, k `[B, T, H, K]`, v `[B, T, HV, V]`, beta, g `[B, T, HV]`, h0 and cu_seqlens; dense for one length
    repeated (B = len(lens)), packed (B = 1) for varlen."""
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    N = len(lens)
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, H, K)
    k = F.normalize(k, dim=-1) if normalize_k else k
    v = torch.randn(B, T, HV, V)
    beta = torch.rand(B, T, HV)
    g = None
    if gate:
        g = F.logsigmoid(4 * torch.randn(B, T, HV)) if strong_decay else F.logsigmoid(torch.randn(B, T, HV) + 2)
    state = torch.randn((N, HV, V, K) if state_v_first else (N, HV, K, V)) if h0 else None
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device) if varlen else None
    x = {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), "beta": beta.to(dtype), "g": g, "h0": state}
    return {n: (t.to(device).requires_grad_() if t is not None else None) for n, t in x.items()}, cu


def _case(x, cu, *, dtype, state_v_first, l2norm, output_final_state=True) -> Case:
    """fused_recurrent_gated_delta_rule and the fp32 recurrence on the same inputs: o (in q's dtype), ht (fp32) and
    the gradient of every input (in its dtype)."""
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "g": x["g"], "beta": x["beta"], "scale": x["q"].shape[-1] ** -0.5,
            "initial_state": x["h0"], "output_final_state": output_final_state, "state_v_first": state_v_first,
            "cu_seqlens": cu, "use_qk_l2norm_in_kernel": l2norm}
    grad = tuple(n for n in ("q", "k", "v", "beta", "g", "initial_state") if args[n] is not None)
    return Case("fused_recurrent_gated_delta_rule", args, grad, recurrent_gated_delta_rule,
                outputs=("o", "ht") if output_final_state else ("o",), dtype=dtype,
                out_dtypes={"o": dtype, "ht": torch.float32})


def _check(x, cu, **kwargs):
    assert_matches(fused_recurrent_gated_delta_rule, _case(x, cu, **kwargs), "tilelang")


# (lens, H, HV, K, V, dtype, gate, varlen, state_v_first, l2norm)
GPU_CASES = {
    "T1-D64-plain-fp32": ((1, 1), 2, 2, 64, 64, torch.float32, False, False, False, False),
    "T1-D128-gated-bf16-gva": ((1,), 2, 4, 128, 128, torch.bfloat16, True, False, False, False),
    "T63-D128-gated-bf16": ((63, 63), 2, 2, 128, 128, torch.bfloat16, True, False, False, False),
    "T63-D100-plain-bf16": ((63,), 2, 2, 100, 100, torch.bfloat16, False, False, False, False),
    "T63-D128-gated-fp16": ((63,), 2, 2, 128, 128, torch.float16, True, False, False, False),
    "T63-D128-gated-bf16-svf": ((63,), 2, 4, 128, 128, torch.bfloat16, True, False, True, False),
    "T500-D128-gated-bf16-gva": ((500, 500), 2, 4, 128, 128, torch.bfloat16, True, False, False, False),
    "T500-D100-gated-fp32": ((500,), 2, 2, 100, 100, torch.float32, True, False, False, False),
    "T500-D64-plain-fp32-gva": ((500,), 1, 2, 64, 64, torch.float32, False, False, False, False),
    "T500-D128-gated-bf16-l2norm": ((500,), 2, 2, 128, 128, torch.bfloat16, True, False, False, True),
    "T500-D100-plain-fp32-l2norm-gva": ((500,), 1, 2, 100, 100, torch.float32, False, False, False, True),
    "T63-K64-V128-gated-fp32": ((63,), 2, 2, 64, 128, torch.float32, True, False, False, False),
    "T63-K256-V256-gated-bf16": ((63,), 1, 2, 256, 256, torch.bfloat16, True, False, False, False),
    "varlen-D128-gated-bf16-gva": ((1, 300, 0, 77), 2, 4, 128, 128, torch.bfloat16, True, True, False, False),
    "varlen-D64-plain-fp32-svf": ((1, 300, 0, 77), 2, 2, 64, 64, torch.float32, False, True, True, False),
    "varlen-D100-gated-fp32-svf-l2norm": ((1, 300, 0, 77), 2, 4, 100, 100, torch.float32, True, True, True, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_fused_recurrent(case, poisoned_cuda):
    lens, H, HV, K, V, dtype, gate, varlen, svf, l2norm = case
    x, cu = _inputs(lens, H, HV, K, V, dtype=dtype, gate=gate, normalize_k=not l2norm, state_v_first=svf,
                    varlen=varlen)
    _check(x, cu, dtype=dtype, state_v_first=svf, l2norm=l2norm)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [False, True], ids=["plain", "gated"])
def test_fused_recurrent_no_states(gate, poisoned_cuda):
    """no initial state, no final state (so no dht and no dh0)."""
    x, cu = _inputs((130, 130), 2, 4, 128, 128, dtype=torch.bfloat16, gate=gate, h0=False)
    _check(x, cu, dtype=torch.bfloat16, state_v_first=False, l2norm=False, output_final_state=False)


def _compile_specs():
    try:
        from fla_tl.kernels.common import fused_recurrent_delta as M
    except Exception:  # noqa: BLE001 - without tilelang the module does not import; the marker skips these
        return [pytest.param(None, id="tilelang-missing")]
    # the benchmark's forward (gated bf16, K = V = 128) and the backward at a padded head dim in fp32
    fwd_cfg = heuristic_config("fused_recurrent_delta_fwd", 128, 128, "bfloat16")
    bwd_cfg = heuristic_config("fused_recurrent_delta_bwd", 100, 100, "float32")
    specs = [
        (M.fused_recurrent_delta_rule_fwd_kernel,
         {"K": 128, "V": 128, "gate": "g", "state_v_first": False, "pool": False, "dtype": "bfloat16", **fwd_cfg}),
        (M.fused_recurrent_delta_rule_bwd_dkv_kernel,
         {"K": 100, "V": 100, "gate": "g", "state_v_first": True, "dtype": "float32", **bwd_cfg}),
        (M.fused_recurrent_delta_rule_bwd_dqk_kernel,
         {"K": 100, "V": 100, "gate": "none", "state_v_first": False, "dtype": "float32", **bwd_cfg}),
    ]
    return [pytest.param(s, id=f"{s[0].__name__}-K{s[1]['K']}-{s[1]['dtype']}-{s[1]['gate']}") for s in specs]


@pytest.mark.compile
@pytest.mark.compile_all
@pytest.mark.parametrize("spec", _compile_specs())
def test_kernel_builds_for_sm90a(spec):
    from fla_tl.kernels.common.utils import get_kernel

    factory, kwargs = spec
    kernel = get_kernel(factory, SM90A, **kwargs)
    assert "__global__" in kernel.get_kernel_source()


# ---------------------------------------------------------------- the glue on the CPU, kernels emulated


def _segments(cu):
    cu = cu.tolist()
    return [(n, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def _state_in(h, svf):
    return h.transpose(-1, -2) if svf else h


def _emulate(factory, K, V, gate, state_v_first, dtype, pool=False, **config):
    """a PyTorch stand-in with a kernel's signature and semantics (fp32, per sequence, all value heads at once; gate
    "g" per token, "gk" per key, "gk_softplus" / "gk_sigmoid" per key activated from the raw input; `pool`: the
    states read from and written back to pool slots)."""
    from fla_tl.kernels.common import fused_recurrent_delta as M

    svf = state_v_first

    def heads(x, HV):
        # [L, H, K] -> [L, HV, K], value head j reading key head j // (HV / H)
        return x.float().repeat_interleave(HV // x.shape[1], 1)

    def log_gate(g, A_log, dt_bias, lower_bound, t):
        # a per-key gate's log gates of token t [HV, K], activated as the kernels do ("gk_<act>")
        if gate == "gk":
            return g[t]
        x = g[t] + dt_bias
        a = A_log.exp()[:, None]
        return -a * F.softplus(x) if gate == "gk_softplus" else lower_bound * torch.sigmoid(a * x)

    def fwd(q, k, v, beta, g, A_log, dt_bias, h0, cu, o, ht, w, slots, accepted, scale, lower_bound, use_h0, store_ht,
            store_w, use_accepted):
        HV = v.shape[1]
        for n, bos, eos in _segments(cu):
            h = _state_in(h0[n * HV:(n + 1) * HV], svf).clone() if use_h0 else torch.zeros(HV, K, V)
            if pool:
                slot = int(slots[n, accepted[n] - 1] if use_accepted else slots[n, 0])
                h = _state_in(ht[slot * HV:(slot + 1) * HV], svf).clone() if slot >= 0 else torch.zeros(HV, K, V)
            cf = torch.ones(HV)
            qq, kk = heads(q[bos:eos], HV), heads(k[bos:eos], HV)
            for t in range(eos - bos):
                if gate.startswith("gk"):
                    h = h * log_gate(g, A_log, dt_bias, lower_bound, bos + t).exp()[:, :, None]
                p = torch.einsum("hk,hkv->hv", kk[t], h)
                cn = cf * (g[bos + t].exp() if gate == "g" else 1)
                p = p * cn[:, None]
                fold = (cn < M.C_MIN) | (cn > 1 / M.C_MIN)
                h = torch.where(fold[:, None, None], h * cn[:, None, None], h)
                cf = torch.where(fold, torch.ones_like(cn), cn)
                u = beta[bos + t, :, None] * (v[bos + t].float() - p)
                h = h + kk[t, :, :, None] * (u / cf[:, None])[:, None, :]
                o[bos + t] = (scale * cf[:, None] * torch.einsum("hk,hkv->hv", qq[t], h)).to(o.dtype)
                if store_w:
                    w[bos + t] = v[bos + t].float() - p
                if pool and slots.shape[1] > 1 and slots[n, t] >= 0:
                    s_t = int(slots[n, t])
                    ht[s_t * HV:(s_t + 1) * HV] = _state_in(h * cf[:, None, None], svf)
            if pool:
                if slots.shape[1] == 1 and slot >= 0 and eos > bos:
                    ht[slot * HV:(slot + 1) * HV] = _state_in(h * cf[:, None, None], svf)
            elif store_ht:
                ht[n * HV:(n + 1) * HV] = _state_in(h * cf[:, None, None], svf)

    def dkv(q, k, do, w, beta, g, A_log, dt_bias, dht, cu, du, dk, dh0, scale, lower_bound, use_dht, store_dh0):
        HV = w.shape[1]
        # all columns at once: the partial sums of the other V tiles are zero
        dk.zero_()
        for n, bos, eos in _segments(cu):
            dh = _state_in(dht[n * HV:(n + 1) * HV], svf).clone() if use_dht else torch.zeros(HV, K, V)
            qq, kk = heads(q[bos:eos], HV), heads(k[bos:eos], HV)
            for t in reversed(range(eos - bos)):
                dh = dh + scale * qq[t, :, :, None] * do[bos + t].float()[:, None, :]
                x = torch.einsum("hk,hkv->hv", kk[t], dh)
                du[bos + t] = x
                dk[0, bos + t] = torch.einsum("hkv,hv->hk", dh, beta[bos + t, :, None] * w[bos + t])
                dh = dh - kk[t, :, :, None] * (beta[bos + t, :, None] * x)[:, None, :]
                if gate == "g":
                    dh = dh * g[bos + t].exp()[:, None, None]
                elif gate.startswith("gk"):
                    dh = dh * log_gate(g, A_log, dt_bias, lower_bound, bos + t).exp()[:, :, None]
            if store_dh0:
                dh0[n * HV:(n + 1) * HV] = _state_in(dh, svf)

    def dqk(k, do, w, du, beta, g, A_log, dt_bias, h0, cu, dq, dk, scale, lower_bound, use_h0):
        HV = w.shape[1]
        dq.zero_()
        for n, bos, eos in _segments(cu):
            h = _state_in(h0[n * HV:(n + 1) * HV], svf).clone() if use_h0 else torch.zeros(HV, K, V)
            kk = heads(k[bos:eos], HV)
            for t in range(eos - bos):
                if gate == "g":
                    h = h * g[bos + t].exp()[:, None, None]
                elif gate.startswith("gk"):
                    h = h * log_gate(g, A_log, dt_bias, lower_bound, bos + t).exp()[:, :, None]
                dk[0, bos + t] += torch.einsum("hkv,hv->hk", h, -beta[bos + t, :, None] * du[bos + t])
                h = h + kk[t, :, :, None] * (beta[bos + t, :, None] * w[bos + t])[:, None, :]
                dq[0, bos + t] = scale * torch.einsum("hkv,hv->hk", h, do[bos + t].float())

    return {
        M.fused_recurrent_delta_rule_fwd_kernel: fwd,
        M.fused_recurrent_delta_rule_bwd_dkv_kernel: dkv,
        M.fused_recurrent_delta_rule_bwd_dqk_kernel: dqk,
    }[factory]


def _scan(r, *, meta, reverse, out_dtype, offset=None):
    out = torch.empty_like(r, dtype=out_dtype)
    # the start per sequence, flattened as the kernel's launcher does (a per-key gate's is [N, HV, K])
    offset = offset.reshape(-1, r.shape[1]) if offset is not None else None
    for n, bos, eos in _segments(meta.cu):
        acc = offset[n].float() if offset is not None else torch.zeros(r.shape[1])
        for t in reversed(range(bos, eos)):
            acc = acc + r[t]
            out[t] = acc
    return out


def _emulated(monkeypatch):
    """the tilelang backend of fused_recurrent_gated_delta_rule on the CPU, its kernels emulated in PyTorch: a padded
    head dim (K = 12) and two backward V tiles (32 columns each; the partial sums over V add up)."""
    pytest.importorskip("tilelang")
    from fla_tl.kernels.common import fused_recurrent_delta as M
    from fla_tl.kernels.delta_rule import fused_recurrent

    monkeypatch.setattr(M, "get_kernel", lambda factory, target, **kw: _emulate(factory, **kw))
    monkeypatch.setattr(fused_recurrent, "_sequence_scan", _scan)
    resolved = M.tile_config
    monkeypatch.setattr(M, "tile_config", lambda name, ref, **kw: {
        **resolved(name, ref, **kw), **({"BV": 32, "threads": 64} if name == "fused_recurrent_delta_bwd" else {})})
    # the backend's capabilities name CUDA: accept the CPU here
    monkeypatch.setattr(get_op("fused_recurrent_gated_delta_rule").backend("tilelang"), "verifier", lambda inputs: [])
    return {"K": 12, "V": 40}


GLUE_CASES = [
    {"lens": (40, 40), "HV": 4, "gate": True, "svf": False, "l2norm": False, "strong": False, "varlen": False},
    {"lens": (1, 50, 0, 23), "HV": 2, "gate": True, "svf": True, "l2norm": True, "strong": True, "varlen": True},
    {"lens": (37,), "HV": 2, "gate": False, "svf": False, "l2norm": False, "strong": False, "varlen": False},
]
GLUE_IDS = ["dense-gated-gva", "varlen-strong-decay-svf-l2norm", "plain"]


def _glue_inputs(case, config):
    return _inputs(case["lens"], 2 if case["HV"] == 4 else 1, case["HV"], config["K"], config["V"],
                   dtype=torch.float32, gate=case["gate"], normalize_k=not case["l2norm"], state_v_first=case["svf"],
                   varlen=case["varlen"], device="cpu", strong_decay=case["strong"])


@pytest.mark.parametrize("case", GLUE_CASES, ids=GLUE_IDS)
def test_glue_with_emulated_kernels(case, monkeypatch):
    config = _emulated(monkeypatch)
    x, cu = _glue_inputs(case, config)
    _check(x, cu, dtype=torch.float32, state_v_first=case["svf"], l2norm=case["l2norm"])


@pytest.mark.parametrize("case", GLUE_CASES[:2], ids=GLUE_IDS[:2])
def test_custom_ops_with_emulated_kernels(case, monkeypatch):
    """the custom ops `fla_tl::fused_recurrent_gated_delta_rule_fwd` / `_bwd` on the tilelang backend: their fakes
    (the residual w) match the real outputs (`torch.library.opcheck`), and under torch.compile the op matches eager."""
    config = _emulated(monkeypatch)
    x, cu = _glue_inputs(case, config)
    args = dict(q=x["q"], k=x["k"], v=x["v"], beta=x["beta"], g=x["g"], initial_state=x["h0"], cu_seqlens=cu,
                scale=0.3, output_final_state=True, state_v_first=case["svf"],
                use_qk_l2norm_in_kernel=case["l2norm"])
    torch.library.opcheck(torch.ops.fla_tl.fused_recurrent_gated_delta_rule_fwd.default,
                          (*args.values(), True, "tilelang"))

    def run(fn):
        o, ht = fn(x["q"], x["k"], x["v"], x["g"], beta=x["beta"], scale=0.3, initial_state=x["h0"],
                   output_final_state=True, state_v_first=case["svf"], cu_seqlens=cu,
                   use_qk_l2norm_in_kernel=case["l2norm"], backend="tilelang")
        return (o, ht, *torch.autograd.grad((o * o).sum() + (ht * ht).sum(), [x["q"], x["beta"], x["g"]]))

    eager = run(fused_recurrent_gated_delta_rule)
    compiled = run(torch.compile(fused_recurrent_gated_delta_rule, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def _with_gk(q, k, v, g=None, gk=None, beta=None, **kwargs):
    """the recurrence with `g` and a per-key `gk` (their sum per key channel: KDA's recurrence)."""
    gate = gk + g[..., None] if g is not None else gk
    return recurrent_gated_delta_rule(q, k, v, beta, gate, **kwargs)


@pytest.mark.parametrize("case", GLUE_CASES[:2], ids=GLUE_IDS[:2])
def test_per_key_gate_with_emulated_kernels(case, monkeypatch):
    """`gk` on top of `g` on the tilelang backend (kernels emulated): the per-key kernels and their gate gradient,
    every gradient (`g`'s summed over the key channels) against the recurrence."""
    config = _emulated(monkeypatch)
    x, cu = _glue_inputs(case, config)
    B, T, HV = x["v"].shape[:3]
    gk = F.logsigmoid(torch.randn(B, T, HV, config["K"]) + 2).requires_grad_()
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "g": x["g"], "gk": gk, "beta": x["beta"],
            "initial_state": x["h0"], "output_final_state": True, "state_v_first": case["svf"], "cu_seqlens": cu,
            "use_qk_l2norm_in_kernel": case["l2norm"]}
    grad = ("q", "k", "v", "g", "gk", "beta", "initial_state")
    assert_matches(fused_recurrent_gated_delta_rule,
                   Case("fused_recurrent_gated_delta_rule", args, grad, _with_gk, dtype=torch.float32,
                        out_dtypes={"o": torch.float32, "ht": torch.float32}), "tilelang")
