"""Decode from a state pool: one token per sequence, the states read from and written back to their pool slots in
place, fla_tl's `fused_recurrent_kda(ssm_state_indices=...)` beside fla 0.6.0's `fused_recurrent_kda_fwd` (the
serving entry its public function does not expose) on the same inputs. Median ms of 20 calls, the L2 flushed before
each (`kernel_time.bench`); the floor is the state read and written once (2 * N * HV * K * V * 4 bytes) at the
measured copy bandwidth. Timed eagerly (host time included) and replayed from a CUDA graph. Outputs and pools are
compared first.

    python benchmarks/decode_time.py [B H D] [--hv HV] [--pool P] [--out FILE]   (default 256 16 128, pool 2 B)
"""

import argparse
import csv
import datetime
import os

import torch
import torch.nn.functional as F
from kernel_time import bench

COPY_GBPS = 3000.0


def inputs(B: int, H: int, HV: int, D: int, P: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype, generator=g)
    k = F.normalize(torch.randn(B, 1, H, D, device="cuda", generator=g), dim=-1).to(dtype)
    v = torch.randn(B, 1, HV, D, device="cuda", dtype=dtype, generator=g)
    gate = F.logsigmoid(torch.randn(B, 1, HV, D, device="cuda", generator=g))
    beta = torch.rand(B, 1, HV, device="cuda", generator=g)
    pool = torch.randn(P, HV, D, D, device="cuda", generator=g) * 0.1
    slots = torch.randperm(P, device="cuda", generator=g)[:B].to(torch.int32)
    return q, k, v, gate, beta, pool, slots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", nargs="*", type=int, metavar="N", help="B H D (default 256 16 128)")
    p.add_argument("--hv", type=int, default=None, help="value heads (default H)")
    p.add_argument("--pool", type=int, default=None, help="pool slots (default 2 B)")
    p.add_argument("--out", default=None, help="append a CSV row per provider to this file")
    args = p.parse_args(argv)
    B, H, D = args.shape or (256, 16, 128)
    HV = args.hv or H
    P = args.pool or 2 * B
    from fla_tl.ops import fused_recurrent_kda

    q, k, v, gate, beta, pool, slots = inputs(B, H, HV, D, P)
    runs = {}

    def ours(pl):
        with torch.no_grad():
            return fused_recurrent_kda(q, k, v, gate, beta, initial_state=pl, ssm_state_indices=slots,
                                       output_final_state=True)[0]

    runs["fla_tl"] = ours
    try:
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd

        def theirs(pl):
            return fused_recurrent_kda_fwd(q, k, v, gate, beta, initial_state=pl, inplace_final_state=True,
                                           ssm_state_indices=slots, scale=D ** -0.5)[0]

        runs["fla"] = theirs
    except ImportError as e:
        print(f"fla: not importable ({e})")
    # correctness first: the same outputs and pools from one pool copy each
    got = {}
    for name, fn in runs.items():
        pl = pool.clone()
        got[name] = (fn(pl).float(), pl)
    if "fla" in got:
        (o1, p1), (o2, p2) = got["fla_tl"], got["fla"]
        err_o = ((o1 - o2).norm() / o2.norm()).item()
        err_p = ((p1 - p2).norm() / p2.norm()).item()
        print(f"gate: rel err o {err_o:.2e}, pool {err_p:.2e}")
        if err_o > 2e-2 or err_p > 1e-3:
            print("gate failed: no timings")
            return 1
    floor_ms = 2 * B * HV * D * D * 4 / (COPY_GBPS * 1e9) * 1e3
    gpu = torch.cuda.get_device_name()
    rows = []
    for name, fn in runs.items():
        pl = pool.clone()
        ms = bench(lambda: fn(pl))
        # the same call replayed from a CUDA graph (as servers run decode): no host time
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(pl)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(pl)
        ms_graph = bench(graph.replay)
        rows.append(dict(gpu=gpu, op="fused_recurrent_kda_decode", provider=name, B=B, H=H, HV=HV, D=D, pool=P,
                         ms=f"{ms:.4f}", graph_ms=f"{ms_graph:.4f}", floor_ms=f"{floor_ms:.4f}",
                         graph_floor_frac=f"{floor_ms / ms_graph:.3f}", date=datetime.date.today().isoformat()))
        print(f"{name:7s} eager {ms:.4f} ms   graph {ms_graph:.4f} ms   floor {floor_ms:.4f} ms "
              f"({floor_ms / ms_graph:.0%} of it in the graph)")
    if "fla" in runs:
        print(f"ratio fla_tl / fla: eager {float(rows[0]['ms']) / float(rows[1]['ms']):.3f}, "
              f"graph {float(rows[0]['graph_ms']) / float(rows[1]['graph_ms']):.3f}")
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
