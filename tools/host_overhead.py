"""Host-side cost of one forward call on the device: the public op, the launcher, the bare kernel call (cProfile).

    python tools/host_overhead.py
"""

import cProfile
import pstats
import time

import torch


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n * 1e6


def main():
    import fla_tl.kernels.retention as R
    from fla_tl.kernels.common import fused_chunk
    from fla_tl.kernels.common.gates import retention_g_gamma
    from fla_tl.kernels.common.utils import TORCH_TO_TL, get_kernel, seq_meta, target_for
    from fla_tl.ops import chunk_retention

    B, T, H, D = 8, 1024, 8, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kw = dict(scale=D ** -0.5, initial_state=None, cu_seqlens=None)
    print(f"public op     {per_call_us(lambda: chunk_retention(q, k, v)):8.1f} us/call")
    print(f"launcher      {per_call_us(lambda: R.chunk_retention_fwd(q, k, v, output_final_state=False, **kw)):8.1f} us/call")
    meta = seq_meta(B, T, None, 64, q.device)
    gg = retention_g_gamma(H, q.device)
    cfg = fused_chunk.fused_chunk_config(D, D, "bfloat16", "fwd")
    kern = get_kernel(fused_chunk.fused_chunk_fwd_kernel, target_for(q.device), K=D, V=D, gate="gamma", dtype="bfloat16", **cfg)
    q_, k_, v_ = (x.flatten(0, 1) for x in (q, k, v))
    o = torch.empty_like(v_)
    h0 = q.new_empty(1, D, D, dtype=torch.float32)
    ht = q.new_empty(1, D, D, dtype=torch.float32)
    print(f"bare kernel   {per_call_us(lambda: kern(q_, k_, v_, gg, h0, meta.cu, o, ht, 0.1, 0, 0)):8.1f} us/call")
    print(f"get_kernel    {per_call_us(lambda: get_kernel(fused_chunk.fused_chunk_fwd_kernel, target_for(q.device), K=D, V=D, gate='gamma', dtype='bfloat16', **cfg)):8.1f} us/call")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        chunk_retention(q, k, v)
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
