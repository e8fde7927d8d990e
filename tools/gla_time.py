"""Device timing of chunk_gla's stages over a few tile configs (no fla), for kernel work between benchmark runs.

    python tools/gla_time.py [B T H D]          (on the GPU)
    python tools/gla_time.py --compile           (here: build every timed config for sm_90a into the cache)
"""

import sys

import torch

CUMSUM_BH = [64, 128]
FWD_H = [dict(BK=64, BV=128, num_stages=2, threads=256),
         dict(BK=64, BV=128, num_stages=2, threads=128), dict(BK=32, BV=128, num_stages=2, threads=256)]
FWD_O = [dict(BK=64, BV=128, threads=256), dict(BK=32, BV=128, threads=256), dict(BK=64, BV=128, threads=512)]
BWD_DQK = [dict(BK=64, BV=128, threads=256), dict(BK=32, BV=128, threads=256), dict(BK=64, BV=128, threads=128)]


def compile_all(K=128, V=128, dtype="bfloat16"):
    from fla_tl.kernels.common.chunk_h import chunk_bwd_dh_kernel, chunk_fwd_h_kernel
    from fla_tl.kernels.common.utils import get_kernel
    from fla_tl.kernels.gla.chunk import chunk_gla_bwd_dqk_kernel, chunk_gla_fwd_o_kernel

    tgt = {"kind": "cuda", "arch": "sm_90a"}
    from fla_tl.kernels.common.cumsum import chunk_gate_cumsum_kernel

    for BH in CUMSUM_BH:
        get_kernel(chunk_gate_cumsum_kernel, tgt, g_dtype="float32", BT=64, BH=BH)
    for c in FWD_H:
        for f in (chunk_fwd_h_kernel, chunk_bwd_dh_kernel):
            get_kernel(f, tgt, K=K, V=V, gate="gk", dtype=dtype, h_dtype=dtype, BT=64, **c)
    for c in FWD_O:
        get_kernel(chunk_gla_fwd_o_kernel, tgt, K=K, V=V, dtype=dtype, h_dtype=dtype, BT=64, **c)
    for c in BWD_DQK:
        get_kernel(chunk_gla_bwd_dqk_kernel, tgt, K=K, V=V, dtype=dtype, h_dtype=dtype, BT=64, **c)


def main():
    from kernel_time import bench

    from fla_tl.kernels.common.chunk_h import chunk_bwd_dh, chunk_fwd_h
    from fla_tl.kernels.common.gates import head_decay
    from fla_tl.kernels.common.utils import seq_meta
    from fla_tl.kernels.gla import chunk as G

    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 4096, 16, 128)
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


if __name__ == "__main__":
    if "--compile" in sys.argv:
        compile_all()
    else:
        main()
