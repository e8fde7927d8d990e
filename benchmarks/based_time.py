"""Device timing of fused_chunk_based's three kernels (no fla) at a few tile configs, for kernel work between benchmark
runs; the configs are compiled first in parallel processes.

    python benchmarks/based_time.py [B T H V ...]     (default 8 4096 16 128 and 2 16384 16 128; q, k of dim 16)
"""

import argparse

import torch

from kernel_time import bench  # benchmarks/ is on sys.path when a script here runs

K = 16
# (stage, config overrides) timed beside the launcher's default
VARIANTS = [
    ("fwd", {}), ("fwd", {"num_stages": 2}), ("fwd", {"BV": 64}),
    ("dq", {}), ("dq", {"num_stages": 2}), ("dq", {"BV": 64}),
    ("dkv", {}), ("dkv", {"num_stages": 2}),
]


def _factory(stage):
    from fla_tl.kernels.based import fused_chunk as fc

    return {"fwd": fc.based_fwd_fused_chunk_kernel, "dq": fc.based_bwd_dq_fused_chunk_kernel,
            "dkv": fc.based_bwd_dkv_fused_chunk_kernel}[stage]


def _kwargs(stage, V, overrides):
    from fla_tl.autotune.resolve import heuristic_config

    name = {"fwd": "based_fwd_fused_chunk", "dq": "based_bwd_dq_fused_chunk", "dkv": "based_bwd_dkv_fused_chunk"}[stage]
    return {"K": K, "V": V, "dtype": "bfloat16", **heuristic_config(name, K, V, "bfloat16"), **overrides}


def run(B, T, H, V):
    from fla_tl.kernels.based import fused_chunk as fc
    from fla_tl.kernels.common.utils import get_kernel, target_for

    q, k = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16) / 4 for _ in range(2))
    v, do = (torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dz = torch.randn(B, T, H, device="cuda")
    tables = fc._device_tables(K, q.device)
    o, z = torch.empty(B, T, H, V, device="cuda"), torch.empty(B, T, H, device="cuda")
    dv = torch.empty_like(v)
    for stage, overrides in VARIANTS:
        kw = _kwargs(stage, V, overrides)
        kernel = get_kernel(_factory(stage), target_for(q.device), **kw)
        NV = -(-V // kw["BV"])
        part = torch.empty(NV, B, T, H, K, device="cuda")
        if stage == "fwd":
            ms = bench(lambda: kernel(q, k, v, o, z, *tables[:3], 0.25))
        elif stage == "dq":
            ms = bench(lambda: kernel(q, k, v, do, dz, part, *tables, 0.25))
        else:
            ms = bench(lambda: kernel(q, k, v, do, dz, part, dv, *tables, 0.25))
        chunks = T // 64
        print(f"{B}x{T}x{H}x{V} {stage:4s} {str(overrides):18s} {ms:7.3f} ms  {ms * 1e3 / chunks:6.1f} us/chunk "
              f"({B * H * NV} blocks)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shapes", nargs="*", type=int, metavar="N", help="B T H V, repeated (default 8 4096 16 128 2 16384 16 128)")
    p.add_argument("--workers", type=int, default=8, help="compile processes (default 8)")
    args = p.parse_args(argv)
    if len(args.shapes) % 4:
        p.error(f"expected groups of 4 numbers (B T H V), got {args.shapes}")
    shapes = [tuple(args.shapes[i:i + 4]) for i in range(0, len(args.shapes), 4)] or [(8, 4096, 16, 128),
                                                                                       (2, 16384, 16, 128)]
    from fla_tl.autotune.build import build
    from fla_tl.registry import KernelSpec

    # the configs at V = 128 (other V compile on first use)
    specs = [KernelSpec(stage, _factory(stage), _kwargs(stage, 128, o)) for stage, o in VARIANTS]
    for name, ok, seconds, message in build(specs, {"kind": "cuda", "arch": "sm_90a"}, workers=args.workers):
        if not ok:
            print(f"{name} FAIL {seconds:.1f}s {message[:300]}", flush=True)
    for shape in shapes:
        run(*shape)


if __name__ == "__main__":
    main()
