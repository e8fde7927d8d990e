"""Compile the chunk (gated) delta rule's kernels at one head dim for sm_90a into TILELANG_CACHE_DIR (no GPU needed):

    TILELANG_CACHE_DIR=... python tools/delta_compile.py [K [dtype]]
"""

import sys

from fla_tl.kernels.common import chunk_delta_h as D
from fla_tl.kernels.common import cumsum as C
from fla_tl.kernels.common import fused_chunk_delta as F
from fla_tl.kernels.common import wy
from fla_tl.kernels.common.utils import get_kernel


def main():
    K = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    dtype = sys.argv[2] if len(sys.argv) > 2 else "bfloat16"
    tgt = {"kind": "cuda", "arch": "sm_90a"}
    kv = dict(K=K, V=K, dtype=dtype, BT=64)
    stages = D.stages_for(K)
    for gate in ("g", "none"):
        specs = [
            (wy.wy_fwd_kernel, dict(K=K, V=K, dtype=dtype, beta_dtype="float32", gate=gate, BT=64)),
            (wy.apply_tril_kernel, dict(D=K, dtype=dtype, beta_dtype="float32", gate=gate, BT=64)),
            (wy.apply_tril_kernel, dict(D=K, dtype=dtype, beta_dtype="float32", gate="none", BT=64)),
            (F.fused_chunk_delta_fwd_kernel, dict(gate=gate, **kv)),
            (D.chunk_delta_fwd_h_kernel, dict(gate=gate, num_stages=stages, **kv)),
            (D.chunk_delta_bwd_dv_local_kernel, dict(gate=gate, **kv)),
            (D.chunk_delta_bwd_dhu_kernel, dict(gate=gate, num_stages=stages, **kv)),
            (wy.wy_bwd_kernel, dict(K=K, V=K, dtype=dtype, beta_dtype="float32", gate=gate,
                                    dk_dtype="float32" if gate == "g" else dtype, BT=64)),
        ]
        if gate == "g":
            specs += [
                (C.chunk_gate_cumsum_kernel, dict(g_dtype="float32", BT=64)),
                (C.gate_dot_kernel, dict(K=K, dtype=dtype, grad_dtype="float32", BT=64)),
                (C.chunk_state_dot_kernel, dict(K=K, V=K, h_dtype=dtype, BT=64)),
                (C.chunk_reverse_cumsum_kernel, dict(out_dtype="float32", BT=64)),
            ]
        for factory, kwargs in specs:
            get_kernel(factory, tgt, **kwargs)
            print("built", factory.__name__, gate, flush=True)


if __name__ == "__main__":
    main()
