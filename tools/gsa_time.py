"""Device timing of chunk_gsa / fused_recurrent_gsa / chunk_abc against fla (bf16, M = 64 slots), plus a CUDA
profile of one chunk_gsa forward + backward; and ahead-of-time compilation of the kernels the GSA composition
launches.

    python tools/gsa_time.py [chunk_gsa fused_recurrent_gsa chunk_abc]     (on the GPU; B=8 T=4096 H=16 K=V=128)
    python tools/gsa_time.py --compile                                     (here: build them for sm_90a)

fla's first backward call autotunes its Triton kernels for minutes: allow for it.
"""

import sys
import time

import torch
import torch.nn.functional as F

B, T, H, D, M = 8, 4096, 16, 128, 64


def _record_kernels():
    """(factory, kwargs) of every kernel one chunk_gsa forward + backward requests, by a CPU run whose launches do
    nothing (bf16 at the benchmark dims and fp32 at the tests' padded dims, dense and varlen)."""
    import importlib

    import fla_tl.kernels.common.utils as U

    recorded = []

    def fake(factory, target, **kw):
        if (factory, kw) not in recorded:
            recorded.append((factory, kw))
        return lambda *a, **k: None

    for name in ("fla_tl.kernels.common.chunk_h", "fla_tl.kernels.common.cumsum", "fla_tl.kernels.gla.chunk"):
        importlib.import_module(name).get_kernel = fake
    from fla_tl.kernels.gsa import gsa_tl

    try:
        for dtype, (K, V, Ms) in ((torch.bfloat16, (128, 128, 64)), (torch.float32, (100, 60, 32))):
            for cu in (None, torch.tensor([0, 100, 200])):
                b, t = (2, 200) if cu is None else (1, 200)
                xs = [torch.randn(b, t, 2, d).to(dtype).requires_grad_() for d in (K, K, V, Ms)]
                g = F.logsigmoid(torch.randn(b, t, 2, Ms)).requires_grad_()
                h0 = (torch.randn(2, 2, K, Ms).requires_grad_(), torch.randn(2, 2, Ms, V).requires_grad_())
                o, ht = gsa_tl(*xs, g, scale=0.1, initial_state=h0, output_final_state=True, cu_seqlens=cu)
                (o.float().sum() + ht[0].sum() + ht[1].sum()).backward()
    finally:
        for name in ("fla_tl.kernels.common.chunk_h", "fla_tl.kernels.common.cumsum", "fla_tl.kernels.gla.chunk"):
            importlib.import_module(name).get_kernel = U.get_kernel
    return recorded


def compile_all():
    from fla_tl.kernels.common.utils import get_kernel

    for factory, kw in _record_kernels():
        t0 = time.time()
        get_kernel(factory, {"kind": "cuda", "arch": "sm_90a"}, **kw)
        print(f"{factory.__name__} {kw} {time.time() - t0:.1f}s", flush=True)


def _inputs(gate):
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    s = torch.randn(B, T, H, M, device="cuda", dtype=torch.bfloat16)
    xs = [q, k, v, s] + ([F.logsigmoid(torch.randn(B, T, H, M, device="cuda"))] if gate else [])
    return [x.requires_grad_() for x in xs]


def time_ops(names):
    import fla.ops.abc as fla_abc
    import fla.ops.gsa as fla_gsa
    from triton.testing import do_bench

    import fla_tl.ops as ours

    table = {"chunk_gsa": (ours.chunk_gsa, fla_gsa.chunk_gsa, True),
             "fused_recurrent_gsa": (ours.fused_recurrent_gsa, fla_gsa.fused_recurrent_gsa, True),
             "chunk_abc": (ours.chunk_abc, fla_abc.chunk_abc, False)}
    for name in names:
        mine, theirs, gate = table[name]
        xs = _inputs(gate)
        do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            a, b = mine(*xs)[0].float(), theirs(*xs)[0].float()
        print(f"{name}: rel rms vs fla {((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item():.2e}")
        for provider, fn in (("fla_tl", mine), ("fla", theirs)):
            with torch.no_grad():
                fwd = do_bench(lambda fn=fn, xs=xs: fn(*xs), warmup=10, rep=40)
            fwdbwd = do_bench(lambda fn=fn, xs=xs, do=do: fn(*xs)[0].backward(do), warmup=10, rep=40)
            print(f"{name:22s} {provider:7s} fwd {fwd:8.3f} ms  fwdbwd {fwdbwd:8.3f} ms", flush=True)


def profile_chunk_gsa():
    from torch.profiler import ProfilerActivity, profile

    import fla_tl.ops as ours

    xs = _inputs(True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    ours.chunk_gsa(*xs)[0].backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        ours.chunk_gsa(*xs)[0].backward(do)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=40))


if __name__ == "__main__":
    if "--compile" in sys.argv:
        compile_all()
    else:
        profile_chunk_gsa()
        time_ops(sys.argv[1:] or ["chunk_gsa", "fused_recurrent_gsa", "chunk_abc"])
