"""Device timing of the chunk (gated) delta rule's stages and of the state passes' tile configs (no fla), for kernel
work between benchmark runs.

    python tools/delta_time.py [B T H D]                 (on the GPU: every stage, then the config sweeps)
    python tools/delta_time.py --compile [workers] [D]   (here or on the GPU host: build the swept configs)
"""

import sys

import torch

from kernel_time import bench  # tools/ is on sys.path when a tool runs

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
    from fla_tl.kernels.common import chunk_delta_h as Dh
    from fla_tl.kernels.common import fused_chunk_delta as F
    from fla_tl.kernels.common import wy

    out = []
    for gate in GATES:
        for c in CONFIGS:
            kv = dict(K=D, V=D, gate=gate, dtype=dtype, BT=64, **c)
            out.append(("fused", F.fused_chunk_delta_fwd_kernel, kv))
            out.append(("fwd_h", Dh.chunk_delta_fwd_h_kernel, dict(num_stages=Dh.stages_for(D, 2), **kv)))
            out.append(("dhu", Dh.chunk_delta_bwd_dhu_kernel, dict(num_stages=Dh.stages_for(D, 2), **kv)))
    for gate in GATES:
        for threads in WY_THREADS:
            wkv = dict(K=D, V=D, dtype=dtype, beta_dtype="float32", gate=gate, BT=64, threads=threads)
            out.append(("wy_fwd", wy.wy_fwd_kernel, wkv))
            out.append(("wy_bwd", wy.wy_bwd_kernel, dict(dk_dtype=dtype, **wkv)))
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


def main():
    if sys.argv[1:2] == ["--compile"]:
        from fla_tl.kernels.build import build

        workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
        D = int(sys.argv[3]) if len(sys.argv) > 3 else 128
        for name, ok, seconds, message in build(specs(D), {"kind": "cuda", "arch": "sm_90a"}, workers):
            print(f"{name:8s} {'ok' if ok else 'FAIL'} {seconds:.1f}s {message[:300]}", flush=True)
        return
    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 4096, 16, 128)
    run(B, T, H, D)


if __name__ == "__main__":
    main()
