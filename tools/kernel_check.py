"""Device-side smoke check of the retention launchers against an fp32 token-by-token recurrence.

    python tools/kernel_check.py [--quick]

Prints one row per (op, shape) with the relative RMS error of o, ht, dq, dk, dv, dh0 and PASS/FAIL.
"""

import argparse
import math
import sys
import time

import torch


def ref(q, k, v, scale, h0, cu, reverse=False, svf=False):
    """fp32 recurrence over each sequence; returns o, ht (ht in [N,H,K,V] or [N,H,V,K])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.float(), k.float(), v.float()
    gam = torch.tensor([1 - 2.0 ** (-5.0 - h) for h in range(H)], device=q.device)
    if cu is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        seqs = [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]
    o = torch.zeros(B, T, H, V, device=q.device)
    hts = []
    outs = []
    for n, (b, s, e) in enumerate(seqs):
        h = torch.zeros(H, K, V, device=q.device)
        if h0 is not None:
            h = h0[n].float().transpose(-1, -2) if svf else h0[n].float()
        rng = range(e - 1, s - 1, -1) if reverse else range(s, e)
        for t in rng:
            h = h * gam[:, None, None] + k[b, t][:, :, None] * v[b, t][:, None, :]
            outs.append(((b, t), torch.einsum("hk,hkv->hv", q[b, t] * scale, h)))
        hts.append(h.transpose(-1, -2) if svf else h)
    idx_b = torch.tensor([x[0][0] for x in outs], device=q.device, dtype=torch.long)
    idx_t = torch.tensor([x[0][1] for x in outs], device=q.device, dtype=torch.long)
    if outs:
        o = o.index_put((idx_b, idx_t), torch.stack([x[1] for x in outs]))
    return o, torch.stack(hts)


def rel(a, b):
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 0.0
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).pow(2).mean().sqrt() / (b.pow(2).mean().sqrt() + 1e-12)).item()


def run(op, B, T, H, K, V, dtype, use_h0, cu=None, reverse=False, svf=False, seed=0):
    import fla_tl.kernels.retention as R

    torch.manual_seed(seed)
    dev = "cuda"
    q = torch.randn(B, T, H, K, device=dev).to(dtype)
    k = (torch.randn(B, T, H, K, device=dev) / math.sqrt(K)).to(dtype)
    v = torch.randn(B, T, H, V, device=dev).to(dtype)
    N = B if cu is None else len(cu) - 1
    shp = (N, H, V, K) if svf else (N, H, K, V)
    h0 = torch.randn(*shp, device=dev) if use_h0 else None
    do = torch.randn(B, T, H, V, device=dev).to(dtype)
    dht = torch.randn(*shp, device=dev)
    scale = K ** -0.5
    cu_t = None if cu is None else torch.tensor(cu, device=dev, dtype=torch.long)
    extra = dict(reverse=reverse, state_v_first=svf) if op == "fused_recurrent" else {}
    fwd = getattr(R, f"{op}_retention_fwd")
    bwd = getattr(R, f"{op}_retention_bwd")
    o, ht = fwd(q, k, v, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu_t, **extra)
    dq, dk, dv, dh0 = bwd(q, k, v, do, dht, scale=scale, initial_state=h0, cu_seqlens=cu_t, **extra)
    torch.cuda.synchronize()
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    h0r = h0.detach().clone().requires_grad_() if use_h0 else None
    ro, rht = ref(qr, kr, vr, scale, h0r, cu, reverse, svf)
    ((ro * do.float()).sum() + (rht * dht).sum()).backward()
    errs = dict(o=rel(o, ro), ht=rel(ht, rht), dq=rel(dq, qr.grad), dk=rel(dk, kr.grad), dv=rel(dv, vr.grad))
    if use_h0:
        errs["dh0"] = rel(dh0, h0r.grad)
    return errs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ops", default="chunk,fused_chunk,fused_recurrent")
    a = p.parse_args()
    tol = {torch.bfloat16: 3e-2, torch.float32: 5e-3}
    cases = []
    for op in a.ops.split(","):
        for dt in (torch.bfloat16, torch.float32):
            for T, D in [(1, 64), (63, 100), (64, 128), (500, 128), (200, 256)]:
                cases.append((op, dict(B=2, T=T, H=4, K=D, V=D, dtype=dt, use_h0=True)))
            cases.append((op, dict(B=1, T=300, H=2, K=64, V=64, dtype=dt, use_h0=False)))
            cases.append((op, dict(B=1, T=333, H=2, K=64, V=128, dtype=dt, use_h0=True, cu=[0, 7, 7, 100, 333])))
            if op == "fused_recurrent":
                cases.append((op, dict(B=2, T=77, H=2, K=64, V=64, dtype=dt, use_h0=True, reverse=True)))
                cases.append((op, dict(B=2, T=77, H=2, K=100, V=64, dtype=dt, use_h0=True, svf=True)))
                cases.append((op, dict(B=1, T=150, H=2, K=64, V=64, dtype=dt, use_h0=True, reverse=True, svf=True,
                                       cu=[0, 50, 150])))
    if a.quick:
        cases = [c for c in cases if c[1]["dtype"] == torch.bfloat16]
    fails = 0
    for op, kw in cases:
        t0 = time.time()
        try:
            errs = run(op, **kw)
            worst = max(errs.values())
            ok = worst <= tol[kw["dtype"]]
            msg = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        except Exception as e:  # noqa: BLE001
            ok, msg = False, f"{type(e).__name__}: {str(e)[-400:]}"
        fails += not ok
        desc = ",".join(f"{k}={v}" for k, v in kw.items() if k != "dtype") + f",{str(kw['dtype'])[6:]}"
        print(f"{'PASS' if ok else 'FAIL'} {op:16s} {desc:70s} {msg} ({time.time() - t0:.1f}s)", flush=True)
    print(f"{len(cases) - fails} passed, {fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
