"""Device timing of chunk_gla's stages over a few tile configs (no fla), for kernel work between benchmark runs.

    python benchmarks/gla_time.py [B T H D]     (on the GPU; default 8 4096 16 128)
    python benchmarks/gla_time.py --compile     (no GPU needed: build every timed config for sm_90a, D = 128)
"""

import torch

from kernel_time import bench, get_shape, shape_args  # benchmarks/ is on sys.path when a script here runs

CUMSUM_BH = [64, 128]
FWD_H = [dict(BK=64, BV=128, num_stages=2, threads=256),
         dict(BK=64, BV=128, num_stages=2, threads=128), dict(BK=32, BV=128, num_stages=2, threads=256)]
FWD_O = [dict(BK=64, BV=128, threads=256), dict(BK=32, BV=128, threads=256), dict(BK=64, BV=128, threads=512)]
BWD_DQK = [dict(BK=64, BV=128, threads=256), dict(BK=32, BV=128, threads=256), dict(BK=64, BV=128, threads=128)]


def specs(K=128, V=128, dtype="bfloat16"):
    """every timed config as a `KernelSpec` (for `fla_tl.autotune.build.build`)."""
    from fla_tl.kernels.common.chunk_h import chunk_bwd_dh_kernel, chunk_fwd_h_kernel
    from fla_tl.kernels.common.cumsum import chunk_gate_cumsum_kernel
    from fla_tl.kernels.gla.chunk import chunk_gla_bwd_dqk_kernel, chunk_gla_fwd_o_kernel
    from fla_tl.registry import KernelSpec

    tiles = dict(K=K, V=V, dtype=dtype, h_dtype=dtype, BT=64)
    out = [KernelSpec("cumsum", chunk_gate_cumsum_kernel, dict(g_dtype="float32", BT=64, BH=BH)) for BH in CUMSUM_BH]
    out += [KernelSpec(f.__name__, f, dict(tiles, gate="gk", **c))
            for c in FWD_H for f in (chunk_fwd_h_kernel, chunk_bwd_dh_kernel)]
    out += [KernelSpec("fwd_o", chunk_gla_fwd_o_kernel, dict(tiles, **c)) for c in FWD_O]
    out += [KernelSpec("bwd_dqk", chunk_gla_bwd_dqk_kernel, dict(tiles, **c)) for c in BWD_DQK]
    return out


def compile_all(workers=2):
    from fla_tl.autotune.build import build

    for name, ok, seconds, message in build(specs(), {"kind": "cuda", "arch": "sm_90a"}, workers):
        print(f"{name} {'ok' if ok else 'FAIL'} {seconds:.1f}s {message[:300]}", flush=True)


def run(B, T, H, D):
    from fla_tl.kernels.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
    from fla_tl.kernels.common.gates import head_decay
    from fla_tl.kernels.common.utils import seq_meta
    from fla_tl.kernels.gla import chunk as G

    q, k, v, do = (torch.randn(B * T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda"))
    meta = seq_meta(B, T, None, 64, q.device)
    gc = G.key_gate_cumsum(g, None, meta)
    for BH in CUMSUM_BH:
        print(f"cumsum {bench(lambda: G.key_gate_cumsum(g, None, meta, BH=BH)):.3f} ms  BH={BH}")
    kw = dict(gate="gk", g_gamma=head_decay(None, H, q.device), gc=gc, meta=meta, BT=64)
    for c in FWD_H:
        t1 = bench(lambda: chunk_fwd_h(k, v, initial_state=None, output_final_state=False, **kw, **c))
        t2 = bench(lambda: chunk_bwd_dh(q, do, None, scale=0.1, need_dh0=False, **kw, **c))
        print(f"fwd_h {t1:.3f}  bwd_dh {t2:.3f} ms  {c}")
    h, _ = chunk_fwd_h(k, v, initial_state=None, output_final_state=False, **kw)
    dh, _ = chunk_bwd_dh(q, do, None, scale=0.1, need_dh0=False, **kw)
    for c in FWD_O:
        t = bench(lambda: G.chunk_gla_fwd_o(q, k, v, h, gc, scale=0.1, meta=meta, store_A=False, **c))
        print(f"fwd_o {t:.3f} ms  {c}")
    _, A = G.chunk_gla_fwd_o(q, k, v, h, gc, scale=0.1, meta=meta, store_A=True)
    for c in BWD_DQK:
        t = bench(lambda: G.chunk_gla_bwd_dqkv(q, k, v, do, h, dh, gc, A, scale=0.1, meta=meta, dqk_config=c))
        print(f"bwd_dv+dqk {t:.3f} ms  {c}")


def main(argv=None):
    p = shape_args(__doc__)
    p.add_argument("--compile", action="store_true", help="build the timed configs for sm_90a (no GPU needed)")
    p.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    args = p.parse_args(argv)
    if args.compile:
        compile_all(args.workers)
    else:
        run(*get_shape(p, args))


if __name__ == "__main__":
    main()
