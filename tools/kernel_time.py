"""Quick device timing of the retention launchers (no fla), for kernel work between benchmark runs.

    python tools/kernel_time.py [B T H D]
"""

import math
import sys

import torch


def bench(fn, reps=20):
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    import fla_tl.kernels.retention as R

    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 4096, 16, 128)
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = (torch.randn(B, T, H, D, device="cuda") / math.sqrt(D)).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(v)
    kw = dict(scale=D ** -0.5, initial_state=None, cu_seqlens=None)
    rows = []
    for op in ("chunk", "fused_chunk", "fused_recurrent"):
        extra = dict(reverse=False, state_v_first=False) if op == "fused_recurrent" else {}
        fwd = getattr(R, f"{op}_retention_fwd")
        bwd = getattr(R, f"{op}_retention_bwd")
        tf = bench(lambda: fwd(q, k, v, output_final_state=False, **kw, **extra), reps=5 if op == "fused_recurrent" else 20)
        tb = bench(lambda: bwd(q, k, v, do, None, **kw, **extra), reps=5 if op == "fused_recurrent" else 20)
        rows.append((op, tf, tb))
    nbytes = 4 * q.numel() * 2
    for op, tf, tb in rows:
        print(f"{op:16s} B={B} T={T} H={H} D={D}: fwd {tf:.3f} ms ({nbytes / tf / 1e6:.0f} GB/s)  bwd {tb:.3f} ms  fwd+bwd {tf + tb:.3f} ms")


if __name__ == "__main__":
    main()
