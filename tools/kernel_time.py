"""Quick device timing of the retention launchers and their schedules (no fla), for kernel work between benchmark runs.

    python tools/kernel_time.py [B T H D [quick]]    (quick: the two chunk schedules only)

Every configuration timed here must be compiled ahead (see `fla_tl.kernels.build`), or it compiles on first use.
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
    from fla_tl.kernels.common import chunk_h, chunk_o, fused_chunk
    from fla_tl.kernels.common.gates import retention_g_gamma
    from fla_tl.kernels.common.utils import seq_meta

    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 4096, 16, 128)
    quick = sys.argv[5:6] == ["quick"]
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = (torch.randn(B, T, H, D, device="cuda") / math.sqrt(D)).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(v)
    kw = dict(scale=D ** -0.5, initial_state=None, cu_seqlens=None)
    nbytes = 4 * q.numel() * 2
    tag = f"B={B} T={T} H={H} D={D}"
    rows = []
    for impl in ("parallel", "fused"):
        tf = bench(lambda: R.chunk_retention_fwd(q, k, v, output_final_state=False, impl=impl, **kw))
        tb = bench(lambda: R.chunk_retention_bwd(q, k, v, do, None, impl=impl, **kw))
        rows.append((f"chunk[{impl}]", tf, tb))
    if not quick:
        fr = dict(reverse=False, state_v_first=False)
        tf = bench(lambda: R.fused_recurrent_retention_fwd(q, k, v, output_final_state=False, **kw, **fr), reps=5)
        tb = bench(lambda: R.fused_recurrent_retention_bwd(q, k, v, do, None, **kw, **fr), reps=5)
        rows.append(("fused_recurrent", tf, tb))
    for op, tf, tb in rows:
        print(f"{op:18s} {tag}: fwd {tf:.3f} ms ({nbytes / tf / 1e6:.0f} GB/s)  bwd {tb:.3f} ms  fwd+bwd {tf + tb:.3f} ms")
    if quick:
        return

    # single stages and tile configs
    q_, k_, v_, do_ = (x.flatten(0, 1) for x in (q, k, v, do))
    meta = seq_meta(B, T, None, 64, q.device)
    gg = retention_g_gamma(H, q.device)
    g = dict(gate="gamma", g_gamma=gg)
    h, _ = chunk_h.chunk_fwd_h(k_, v_, initial_state=None, output_final_state=False, meta=meta, **g)
    dh, _ = chunk_h.chunk_bwd_dh(q_, do_, None, scale=0.1, need_dh0=False, meta=meta, **g)
    stages = {
        "chunk_fwd_h": lambda: chunk_h.chunk_fwd_h(k_, v_, initial_state=None, output_final_state=False, meta=meta, **g),
        "chunk_fwd_o": lambda: chunk_o.chunk_fwd_o(q_, k_, v_, h, scale=0.1, meta=meta, **g),
        "chunk_bwd_dh": lambda: chunk_h.chunk_bwd_dh(q_, do_, None, scale=0.1, need_dh0=False, meta=meta, **g),
        "chunk_bwd_dqkv": lambda: chunk_o.chunk_bwd_dqkv(q_, k_, v_, do_, h, dh, scale=0.1, meta=meta, **g),
    }
    for name, cfg in CONFIGS:
        if name == "fwd":
            stages[f"fused_fwd{cfg}"] = lambda cfg=cfg: fused_chunk.fused_chunk_fwd(
                q_, k_, v_, scale=0.1, initial_state=None, output_final_state=False, meta=meta, **g, **cfg
            )
        else:
            stages[f"fused_bwd{cfg}"] = lambda cfg=cfg: fused_chunk.fused_chunk_bwd(
                q_, k_, v_, do_, None, scale=0.1, initial_state=None, meta=meta, **g, **cfg
            )
    for name, fn in stages.items():
        try:
            print(f"  {name:40s} {bench(fn):.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that fails to run is reported, not fatal
            print(f"  {name:40s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


# the tile configs compared at each run (compile them ahead)
CONFIGS = [
    ("fwd", dict(BV=128, threads=256, num_stages=2, smem_store=True)),
    ("bwd", dict(BV=128, threads=256, num_stages=2, smem_store=True)),
    ("bwd", dict(BV=128, threads=256, num_stages=2, smem_store=False)),
    ("bwd", dict(BV=64, threads=256, num_stages=2, smem_store=True)),
]


if __name__ == "__main__":
    main()
