"""one launch each of the delta rule's WY kernels, state passes and dq/dk/dw pass (gate from argv), for ncu."""
import sys

import torch
import torch.nn.functional as F

from fla_tl.kernels.common import chunk_delta_h as Dh
from fla_tl.kernels.common import wy
from fla_tl.kernels.common.cumsum import chunk_gate_cumsum
from fla_tl.kernels.common.gates import head_decay
from fla_tl.kernels.common.utils import seq_meta

gate = sys.argv[1] if len(sys.argv) > 1 else "none"
B, T, H, D = 8, 4096, 16, 128
N = B * T
q = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
k = F.normalize(torch.randn(N, H, D, device="cuda"), dim=-1).to(torch.bfloat16)
v = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
do = torch.randn_like(v)
beta = torch.rand(N, H, device="cuda")
g = F.logsigmoid(torch.randn(N, H, device="cuda"))
meta = seq_meta(B, T, None, 64, q.device)
gc = chunk_gate_cumsum(g, head_decay(None, H, q.device), meta, 64) if gate == "g" else None
kw = dict(gate=gate, gc=gc, meta=meta)
w, u, ai = wy.wy_repr(k, v, beta, meta=meta, gc=gc)
h, v_new, _ = Dh.chunk_delta_fwd_h(k, v, beta, ai, initial_state=None, output_final_state=False, **kw)
dh, du, _ = Dh.chunk_delta_bwd_dhu(q, k, beta, ai, do, None, scale=0.1, need_dh0=False, **kw)
_, dk, dw, _, _ = Dh.chunk_delta_bwd_dqkw(q, k, v_new, do, du, h, dh, scale=0.1, **kw)
wy.wy_bwd(k, v, beta, ai, du, dw, dk, meta=meta, gc=gc)
torch.cuda.synchronize()
