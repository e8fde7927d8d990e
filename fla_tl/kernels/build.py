"""Ahead-of-time builds: every TileLang kernel an op launches, compiled for an explicit target without a GPU.

`kernel_specs` lists (name, factory, kwargs) exactly as the launchers request them, so a build here fills
TileLang's disk cache (`TILELANG_CACHE_DIR`) with the kernels a GPU machine of the same architecture will load.
"""

import concurrent.futures
import itertools
import time

from .common.chunk_h import chunk_bwd_dh_kernel, chunk_fwd_h_kernel
from .common.chunk_o import chunk_bwd_dqk_kernel, chunk_bwd_dv_kernel, chunk_fwd_o_kernel
from .common.fused_chunk import fused_chunk_bwd_dkv_kernel, fused_chunk_config, fused_chunk_fwd_kernel
from .common.fused_recurrent import fused_recurrent_bwd_config, fused_recurrent_bwd_kernel, fused_recurrent_fwd_kernel
from .common.utils import get_kernel

MODES = ("chunk", "fused_chunk", "fused_recurrent")


def kernel_specs(K: int, V: int, dtype: str, gate: str = "gamma", modes=MODES):
    """the kernels the retention-style ops launch for head dims K, V and input dtype `dtype` (a TileLang name)."""
    base = dict(K=K, V=V, gate=gate, dtype=dtype)
    specs = []
    if "chunk" in modes:
        for factory in (chunk_fwd_h_kernel, chunk_fwd_o_kernel, chunk_bwd_dh_kernel, chunk_bwd_dv_kernel):
            specs.append((factory.__name__, factory, dict(base, h_dtype=dtype, BT=64)))
        specs.append(("chunk_bwd_dqk_kernel", chunk_bwd_dqk_kernel, dict(base, h_dtype=dtype, BT=64)))
    if "chunk" in modes or "fused_chunk" in modes:
        # the fused schedule: forward, dq (the forward kernel on (do, v, k): K and V swap) and the dk/dv sweep
        fwd = fused_chunk_config(K, V, dtype, "fwd")
        specs.append(("fused_chunk_fwd_kernel", fused_chunk_fwd_kernel, dict(base, **fwd)))
        if K != V:
            fwd_t = fused_chunk_config(V, K, dtype, "fwd")
            specs.append(("fused_chunk_fwd_kernel", fused_chunk_fwd_kernel, dict(base, K=V, V=K, **fwd_t)))
        dkv = fused_chunk_config(K, V, dtype, "dkv")
        specs.append(("fused_chunk_bwd_dkv_kernel", fused_chunk_bwd_dkv_kernel, dict(base, **dkv)))
    if "fused_recurrent" in modes:
        for reverse, svf in itertools.product((False, True), (False, True)):
            flags = dict(base, reverse=reverse, state_v_first=svf)
            specs.append(("fused_recurrent_fwd_kernel", fused_recurrent_fwd_kernel, flags))
            specs.append(
                ("fused_recurrent_bwd_kernel", fused_recurrent_bwd_kernel, dict(flags, **fused_recurrent_bwd_config(K, V)))
            )
    return specs


def build(specs, target: dict, workers: int = 2):
    """compile every spec; returns `(name, ok, seconds, message)` per spec."""

    def one(spec):
        name, factory, kwargs = spec
        label = f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items() if k not in ('gate',))})"
        start = time.perf_counter()
        try:
            get_kernel(factory, target, **kwargs)
            return label, True, time.perf_counter() - start, ""
        except Exception as e:  # noqa: BLE001 - reported per kernel
            return label, False, time.perf_counter() - start, f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, specs))


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
