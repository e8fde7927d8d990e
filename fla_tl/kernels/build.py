"""Ahead-of-time builds: every TileLang kernel an op launches, compiled for an explicit target without a GPU.

`kernel_specs` lists (name, factory, kwargs) exactly as the launchers request them, so a build here fills
TileLang's disk cache (`TILELANG_CACHE_DIR`) with the kernels a GPU machine of the same architecture will load.
"""

import concurrent.futures
import itertools
import multiprocessing
import time

from .common.utils import get_kernel

MODES = ("chunk", "fused_chunk", "fused_recurrent")


def kernel_specs(K: int, V: int, dtype: str, gate: str = "gamma", modes=MODES):
    """the kernels the retention-style ops launch for head dims K, V and input dtype `dtype` (a TileLang name), each
    with the heuristic tile config (the launchers' choice with no tuning table)."""
    from ..autotune.resolve import heuristic_config
    from ..autotune.tuner import launch_spec

    def spec(name, K=K, V=V, **flags):
        factory, kwargs = launch_spec(name, K, V, dtype, gate, heuristic_config(name, K, V, dtype))
        return f"{name}_kernel", factory, {**kwargs, **flags}

    specs = []
    if "chunk" in modes:
        specs += [spec(name) for name in ("chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv", "chunk_bwd_dqk")]
    if "chunk" in modes or "fused_chunk" in modes:
        # the fused schedule: forward, dq (the forward kernel on (do, v, k): K and V swap) and the dk/dv sweep
        specs.append(spec("fused_chunk_fwd"))
        if K != V:
            specs.append(spec("fused_chunk_fwd", K=V, V=K))
        specs.append(spec("fused_chunk_bwd_dkv"))
    if "fused_recurrent" in modes:
        for reverse, svf in itertools.product((False, True), (False, True)):
            specs.append(spec("fused_recurrent_fwd", reverse=reverse, state_v_first=svf))
            specs.append(spec("fused_recurrent_bwd", reverse=reverse, state_v_first=svf))
    if gate == "gk":
        # GLA's per-key gate: its gradient's scan over [Ttot, H * K] (fp32 partial sums, the gate's dtype out)
        from .common.cumsum import sequence_cumsum_kernel

        for reverse in (False, True):
            specs.append(("sequence_cumsum_kernel", sequence_cumsum_kernel,
                          dict(reverse=reverse, out_dtype="float32", BT=64)))
    if gate == "g":
        # the per-token gate's cumulative sum (g in fp32 or the input dtype) and its gradient
        from .common.cumsum import (
            chunk_gate_cumsum_kernel,
            chunk_reverse_cumsum_kernel,
            chunk_state_dot_kernel,
            gate_dot_kernel,
            sequence_cumsum_kernel,
        )

        for g_dtype in sorted({"float32", dtype}):
            specs.append(("chunk_gate_cumsum_kernel", chunk_gate_cumsum_kernel, dict(g_dtype=g_dtype, BT=64)))
            specs.append(("chunk_reverse_cumsum_kernel", chunk_reverse_cumsum_kernel, dict(out_dtype=g_dtype, BT=64)))
            for reverse in (False, True):
                specs.append(("sequence_cumsum_kernel", sequence_cumsum_kernel,
                              dict(reverse=reverse, out_dtype=g_dtype, BT=64)))
        # the chunk kernels' dg reads dq, dk in the input dtype, fused_recurrent's in fp32
        for grad_dtype in sorted({"float32", dtype}):
            specs.append(("gate_dot_kernel", gate_dot_kernel, dict(K=K, dtype=dtype, grad_dtype=grad_dtype, BT=64)))
        specs.append(("chunk_state_dot_kernel", chunk_state_dot_kernel, dict(K=K, V=V, h_dtype=dtype, BT=64)))
    return specs



def titans_kernel_specs(D: int, dtype: str, chunk_sizes=(16,)):
    """the kernels chunk_titans_linear launches for head dim D, input dtype `dtype` and each chunk size: the forward,
    and the backward where the launcher takes it (bf16 / fp16 within the shared-memory budget)."""
    from .titans.chunk import bwd_fits, titans_bwd_chunk_kernel, titans_fwd_chunk_kernel

    specs = []
    for BT in chunk_sizes:
        kwargs = dict(D=D, dtype=dtype, BT=BT, threads=256)
        specs.append(("titans_fwd_chunk_kernel", titans_fwd_chunk_kernel, kwargs))
        if dtype in ("bfloat16", "float16") and bwd_fits(D, BT, 2):
            specs.append(("titans_bwd_chunk_kernel", titans_bwd_chunk_kernel, kwargs))
    return specs

def based_kernel_specs(op: str, D: int, dtype: str):
    """the kernels of fused_chunk_based (q, k of fla's feature dim 16, V = D; fp32 inputs take the attention form) and
    parallel_based / parallel_rebased (K = V = D, D <= 128) at their launchers' tiles."""
    from .based import fused_chunk, parallel

    if op == "fused_chunk_based" and dtype != "float32":
        stages = (("fwd", fused_chunk.based_fwd_fused_chunk_kernel),
                  ("dq", fused_chunk.based_bwd_dq_fused_chunk_kernel),
                  ("dkv", fused_chunk.based_bwd_dkv_fused_chunk_kernel))
        K = fused_chunk.MAX_K
        return [(f.__name__, f, dict(K=K, V=D, dtype=dtype, **fused_chunk.kernel_config(stage, K, D, dtype)))
                for stage, f in stages]
    K = fused_chunk.MAX_K if op == "fused_chunk_based" else D
    if K > 128:
        return []
    stages = (("fwd", parallel.parallel_based_fwd_kernel), ("dq", parallel.parallel_based_bwd_dq_kernel),
              ("dkv", parallel.parallel_based_bwd_dkv_kernel))
    return [(f.__name__, f, dict(K=K, V=D, based=op != "parallel_rebased", dtype=dtype,
                                 **parallel.kernel_config(stage, K, D, dtype))) for stage, f in stages]


# the variants whose ops run the retention-style kernels of `kernel_specs` (parallel_simple_gla: the chunk ones)
RETENTION_STYLE = frozenset({"retention", "simple_gla", "linear_attn", "lightning_attn"})


def op_kernel_specs(op: str, variant: str, mode: str, D: int, dtype: str, gate: str = "gamma"):
    """the kernels registered op `op` (of `variant`, `mode`) launches at head dim D (K = V) and input dtype `dtype`,
    or None for the ops with no list here yet (their kernels compile on first use: the delta rule's state-pass tiles,
    for one, depend on the GPU's multiprocessor count; `tools/delta_time.py --compile` builds them)."""
    if variant in RETENTION_STYLE:
        return kernel_specs(D, D, dtype, gate, modes=("chunk" if mode == "parallel" else mode,))
    if variant in ("based", "rebased"):
        return based_kernel_specs(op, D, dtype)
    if variant == "titans":
        return titans_kernel_specs(D, dtype)
    return None


def _build_one(spec, target: dict):
    name, factory, kwargs = spec
    label = f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items() if k not in ('gate',))})"
    start = time.perf_counter()
    try:
        get_kernel(factory, target, **kwargs)
        return label, True, time.perf_counter() - start, ""
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return label, False, time.perf_counter() - start, f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"


def build(specs, target: dict, workers: int = 2):
    """compile every spec `(name, factory, kwargs)` into TileLang's disk cache; returns `(label, ok, seconds,
    message)` per spec. With `workers` > 1 the compiles run in that many spawned processes, each with its own
    interpreter (TileLang's lowering is Python-driven); the calling process then loads the kernels from the disk
    cache on first use."""
    specs = list(specs)
    if workers <= 1 or len(specs) <= 1:
        return [_build_one(spec, target) for spec in specs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(specs)), mp_context=context) as pool:
        return list(pool.map(_build_one, specs, [target] * len(specs)))


def compile_check(target: dict | None = None, K: int = 64, V: int = 64, dtype: str = "bfloat16"):
    """compile every retention kernel at one small configuration (for `python -m fla_tl check` on a CPU machine)."""
    return build(kernel_specs(K, V, dtype), target or {"kind": "cuda", "arch": "sm_90a"})


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="compile fla_tl TileLang kernels ahead of time")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--dims", default="64,100,128,256", help="head dims D (K = V = D), comma separated")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    specs = []
    for d, dt in itertools.product(a.dims.split(","), a.dtypes.split(",")):
        specs += kernel_specs(int(d), int(d), dt, modes=tuple(a.modes.split(",")))
    results = build(specs, {"kind": "cuda", "arch": a.arch}, a.workers)
    bad = [r for r in results if not r[1]]
    for r in results:
        print(f"{'ok  ' if r[1] else 'FAIL'} {r[2]:6.1f}s {r[0]} {r[3]}")
    print(f"{len(results) - len(bad)} built, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
