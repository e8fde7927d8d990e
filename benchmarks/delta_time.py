"""Device timing of the chunk (gated) delta rule's stages and of the tile configs of its state passes and WY kernels
(no fla), for kernel work between benchmark runs.

    python benchmarks/delta_time.py [B T H D]                          (on the GPU; default 8 4096 16 128)
    python benchmarks/delta_time.py --compile [--workers N] [--dim D]  (no GPU needed: build the swept configs)
"""

import torch

from kernel_time import bench, get_shape, shape_args  # benchmarks/ is on sys.path when a script here runs

# tile configs swept for the three sequential passes (the first is the launchers' default)
CONFIGS = [
    dict(BV=64, threads=128),
    dict(BV=128, threads=256),
    dict(BV=64, threads=256),
    dict(BV=32, threads=128),
]
GATES = ("none", "g")
# block sizes swept for the WY kernels (the first is their default)
WY_THREADS = (128, 256)


def specs(D: int = 128, dtype: str = "bfloat16"):
    """the swept kernels as `KernelSpec`s (for `fla_tl.autotune.build.build`)."""
    from fla_tl.autotune.configs import delta_pass_stages
    from fla_tl.kernels.common import chunk_delta_h as Dh
    from fla_tl.kernels.common import fused_chunk_delta as F
    from fla_tl.kernels.common import wy
    from fla_tl.registry import KernelSpec

    out = []
    for gate in GATES:
        for c in CONFIGS:
            kv = dict(K=D, V=D, gate=gate, dtype=dtype, BT=64, **c)
            staged = dict(num_stages=delta_pass_stages(D, dtype), **kv)
            out.append(KernelSpec("fused", F.fused_chunk_delta_fwd_kernel, kv))
            out.append(KernelSpec("fwd_h", Dh.chunk_delta_fwd_h_kernel, staged))
            out.append(KernelSpec("dhu", Dh.chunk_delta_bwd_dhu_kernel, staged))
    for gate in GATES:
        for threads in WY_THREADS:
            wkv = dict(K=D, V=D, dtype=dtype, beta_dtype="float32", gate=gate, BT=64, threads=threads)
            out.append(KernelSpec("wy_fwd", wy.wy_fwd_kernel, wkv))
            out.append(KernelSpec("wy_bwd", wy.wy_bwd_kernel, dict(dk_dtype=dtype, **wkv)))
    return out


def run(B, T, H, D):
    import torch.nn.functional as F

    from fla_tl.kernels.common import chunk_delta_h as Dh
    from fla_tl.kernels.common import fused_chunk_delta as Fd
    from fla_tl.kernels.common import wy
    from fla_tl.kernels.common.cumsum import chunk_gate_cumsum
    from fla_tl.kernels.common.gates import head_decay
    from fla_tl.kernels.common.utils import seq_meta

    torch.manual_seed(0)
    dev = "cuda"
    N = B * T
    q = torch.randn(N, H, D, device=dev, dtype=torch.bfloat16)
    k = F.normalize(torch.randn(N, H, D, device=dev), dim=-1).to(torch.bfloat16)
    v = torch.randn(N, H, D, device=dev, dtype=torch.bfloat16)
    do = torch.randn_like(v)
    beta = torch.rand(N, H, device=dev)
    g = F.logsigmoid(torch.randn(N, H, device=dev))
    meta = seq_meta(B, T, None, 64, q.device)
    print(f"B={B} T={T} H={H} D={D} bf16", flush=True)
    for gate in GATES:
        gc = chunk_gate_cumsum(g, head_decay(None, H, q.device), meta, 64) if gate == "g" else None
        w, u, ai = wy.wy_repr(k, v, beta, meta=meta, gc=gc)
        kw = dict(gate=gate, gc=gc, meta=meta)
        h, v_new, _ = Dh.chunk_delta_fwd_h(k, v, beta, ai, initial_state=None, output_final_state=False, **kw)
        dh, du, _ = Dh.chunk_delta_bwd_dhu(q, k, beta, ai, do, None, scale=0.1, need_dh0=False, **kw)
        _, dk, dw, _, _ = Dh.chunk_delta_bwd_dqkw(q, k, v_new, do, du, h, dh, scale=0.1, **kw)
        stages = {
            "dqkw": lambda: Dh.chunk_delta_bwd_dqkw(q, k, v_new, do, du, h, dh, scale=0.1, **kw),
        }
        for threads in WY_THREADS:
            stages[f"wy_repr[thr={threads}]"] = lambda t=threads: wy.wy_repr(k, v, beta, meta=meta, gc=gc, threads=t)
            stages[f"wy_bwd[thr={threads}]"] = lambda t=threads: wy.wy_bwd(k, v, beta, ai, du, dw, dk, meta=meta,
                                                                            gc=gc, threads=t)
        for c in CONFIGS:
            tag = f"BV={c['BV']},thr={c['threads']}"
            stages[f"fused[{tag}]"] = lambda c=c: Fd.fused_chunk_delta_fwd(
                q, k, w, u, scale=0.1, initial_state=None, output_final_state=False, **kw, **c)
            stages[f"fwd_h[{tag}]"] = lambda c=c: Dh.chunk_delta_fwd_h(
                k, v, beta, ai, initial_state=None, output_final_state=False, **kw, **c)
            stages[f"dhu[{tag}]"] = lambda c=c: Dh.chunk_delta_bwd_dhu(
                q, k, beta, ai, do, None, scale=0.1, need_dh0=False, **kw, **c)
        for name, fn in stages.items():
            try:
                print(f"  gate={gate:4s} {name:28s} {bench(fn):.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that fails to run is reported, not fatal
                print(f"  gate={gate:4s} {name:28s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


def main(argv=None):
    p = shape_args(__doc__)
    p.add_argument("--compile", action="store_true", help="build the swept configs for sm_90a (no GPU needed)")
    p.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--dim", type=int, default=128, help="K = V of --compile (default 128)")
    args = p.parse_args(argv)
    if args.compile:
        from fla_tl.autotune.build import build

        for name, ok, seconds, message in build(specs(args.dim), {"kind": "cuda", "arch": "sm_90a"}, args.workers):
            print(f"{name} {'ok' if ok else 'FAIL'} {seconds:.1f}s {message[:300]}", flush=True)
        return
    run(*get_shape(p, args))


if __name__ == "__main__":
    main()
