"""Host-side cost of one forward call on the device at a tiny shape (where the GPU waits on the host): per op, the
time per call, then the cProfile of the first op's calls.

    python benchmarks/host_overhead.py [op,op,...]     (ops: simple_gla_g, simple_gla, delta, gated_delta,
                                                       linear_attn, linear_attn_plain; default all)
"""

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n * 1e6


def cases():
    from fla_tl import ops

    B, T, H, D = 1, 64, 1, 128
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kn = F.normalize(k.float(), dim=-1).to(k.dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda"))
    beta = torch.rand(B, T, H, device="cuda")
    return {
        "simple_gla_g": lambda: ops.chunk_simple_gla(q, k, v, g=g),
        "simple_gla": lambda: ops.chunk_simple_gla(q, k, v, g_gamma=-torch.ones(H, device="cuda")),
        "delta": lambda: ops.chunk_delta_rule(q, kn, v, beta),
        "gated_delta": lambda: ops.chunk_gated_delta_rule(q, kn, v, g, beta),
        "linear_attn": lambda: ops.chunk_linear_attn(q, k, v),
        "linear_attn_plain": lambda: ops.chunk_linear_attn(q, k, v, normalize=False),
    }


OPS = ("simple_gla_g", "simple_gla", "delta", "gated_delta", "linear_attn", "linear_attn_plain")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="?", default=",".join(OPS), help="comma list of the ops above (default all)")
    args = p.parse_args(argv)
    names = args.ops.split(",")
    if not set(names) <= set(OPS):
        p.error(f"unknown ops {sorted(set(names) - set(OPS))}; known: {', '.join(OPS)}")
    table = cases()
    for name in names:
        print(f"{name:14s} {per_call_us(table[name]):8.1f} us/call (1x64x1x128, forward)", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        table[names[0]]()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
