"""Who is off in normalised linear attention at length: fla_tl and fla (bf16) against fla_tl's torch backend in fp32
(the chunked PyTorch form, no tensor cores), output and gradients, relative RMS.

    python tools/linear_attn_accuracy.py [B T H D]
"""

import sys

import torch
import torch.nn.functional as F


def rel(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def main():
    from fla.ops.linear_attn import chunk_linear_attn as fla_op

    from fla_tl.ops import chunk_linear_attn

    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (2, 4096, 16, 128)
    torch.manual_seed(0)
    # as benchmarks/bench.py draws them: elu + 1 of randn queries and of L2-normalised randn keys
    x = [F.elu(torch.randn(B, T, H, D, device="cuda")) + 1,
         F.elu(F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1)) + 1,
         torch.randn(B, T, H, D, device="cuda")]
    do = torch.randn(B, T, H, D, device="cuda")

    def run(fn, dtype, **kw):
        inputs = [t.to(dtype).requires_grad_() for t in x]
        o = fn(*inputs, **kw)[0]
        grads = torch.autograd.grad(o, inputs, do.to(o.dtype))
        return [o, *grads]

    ref = run(chunk_linear_attn, torch.float32, backend="torch")
    for name, out in (("fla_tl bf16", run(chunk_linear_attn, torch.bfloat16)),
                      ("fla bf16", run(fla_op, torch.bfloat16)),
                      ("fla_tl fp32 (tilelang)", run(chunk_linear_attn, torch.float32))):
        print(f"{name:24s}", "  ".join(f"{n} {rel(a, b):.2e}" for n, a, b in zip(("o", "dq", "dk", "dv"), out, ref)))


if __name__ == "__main__":
    main()
