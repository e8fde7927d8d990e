"""Device timing of the simple-GLA-family launchers with retention's decay (no fla), for kernel work between
benchmark runs: the two chunk schedules and fused_recurrent, forward and backward, then each chunk-parallel stage and
a few fused-kernel tile configs alone. Median of 20 calls, the L2 flushed before each.

    python benchmarks/kernel_time.py [B T H D] [--quick]     (default 8 4096 16 128; --quick: the chunk schedules)

Kernels compile on first use; `python -m fla_tl compile --ops chunk_retention,fused_recurrent_retention` builds the
launchers' defaults ahead. `bench` is the timer the other scripts here import.
"""

import argparse
import math

import torch


def bench(fn, reps=20):
    """median ms of `fn()` over `reps` calls (3 warm-up calls first), each after a 256 MB write that flushes L2."""
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


def shape_args(description: str, default=(8, 4096, 16, 128), names="B T H D") -> argparse.ArgumentParser:
    """a parser with the optional positional shape `B T H D` (the scripts' common first arguments)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", nargs="*", type=int, metavar="N",
                   help=f"{names} (default {' '.join(map(str, default))})")
    return p


def get_shape(p: argparse.ArgumentParser, args, default=(8, 4096, 16, 128)) -> tuple[int, ...]:
    if not args.shape:
        return tuple(default)
    if len(args.shape) != len(default):
        p.error(f"expected {len(default)} shape numbers, got {args.shape}")
    return tuple(args.shape)


# the fused-kernel tile configs timed at each run
CONFIGS = [
    ("fwd", dict(BV=128, threads=256, num_stages=2, smem_store=True)),
    ("bwd", dict(BV=128, threads=256, num_stages=2, smem_store=True)),
    ("bwd", dict(BV=128, threads=256, num_stages=2, smem_store=False)),
    ("bwd", dict(BV=64, threads=256, num_stages=2, smem_store=True)),
]


def main(argv=None):
    p = shape_args(__doc__)
    p.add_argument("--quick", action="store_true", help="time the two chunk schedules only")
    args = p.parse_args(argv)
    B, T, H, D = get_shape(p, args)

    from fla_tl.kernels.common import chunk_h, chunk_o, fused_chunk
    from fla_tl.kernels.common.gates import retention_g_gamma
    from fla_tl.kernels.common.utils import seq_meta
    from fla_tl.kernels.simple_gla import chunk as C
    from fla_tl.kernels.simple_gla import fused_recurrent as FR

    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = (torch.randn(B, T, H, D, device="cuda") / math.sqrt(D)).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(v)
    gg = retention_g_gamma(H, q.device)
    kw = dict(g_gamma=gg, scale=D ** -0.5, initial_state=None, cu_seqlens=None)
    nbytes = 4 * q.numel() * 2
    tag = f"B={B} T={T} H={H} D={D}"
    rows = []
    for impl in ("parallel", "fused"):
        tf = bench(lambda: C.chunk_simple_gla_fwd(q, k, v, output_final_state=False, impl=impl, **kw))
        tb = bench(lambda: C.chunk_simple_gla_bwd(q, k, v, do, None, impl=impl, **kw))
        rows.append((f"chunk[{impl}]", tf, tb))
    if not args.quick:
        fr = dict(reverse=False, state_v_first=False)
        tf = bench(lambda: FR.fused_recurrent_simple_gla_fwd(q, k, v, output_final_state=False, **kw, **fr), reps=5)
        tb = bench(lambda: FR.fused_recurrent_simple_gla_bwd(q, k, v, do, None, **kw, **fr), reps=5)
        rows.append(("fused_recurrent", tf, tb))
    for op, tf, tb in rows:
        print(f"{op:18s} {tag}: fwd {tf:.3f} ms ({nbytes / tf / 1e6:.0f} GB/s)  bwd {tb:.3f} ms  fwd+bwd {tf + tb:.3f} ms")
    if args.quick:
        return

    # single stages and tile configs
    q_, k_, v_, do_ = (x.flatten(0, 1) for x in (q, k, v, do))
    meta = seq_meta(B, T, None, 64, q.device)
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


if __name__ == "__main__":
    main()
