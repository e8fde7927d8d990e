"""Per-kernel CUDA time of a few ops' forward + backward (torch.profiler, five calls after three warm-up calls), for
kernel work between benchmark runs.

    python benchmarks/profile_ops.py [B T H D] [--cases "simple_gla g,gla"]     (default 8 4096 16 128, every case)
"""

import torch
import torch.nn.functional as F

from kernel_time import get_shape, shape_args  # benchmarks/ is on sys.path when a script here runs


def _delta_qkv(qkv):
    """q, k, v with L2-normalised keys (leaves)."""
    q, k, v = qkv()
    return [q, F.normalize(k.detach().float(), dim=-1).to(k.dtype).requires_grad_(), v]


def cases(B, T, H, D):
    from fla_tl import ops

    def qkv():
        return [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]

    g = F.logsigmoid(torch.randn(B, T, H, device="cuda")).requires_grad_()
    gamma = -torch.rand(H, device="cuda")
    yield "simple_gla g", lambda q, k, v: ops.chunk_simple_gla(q, k, v, g=g)[0], qkv()
    yield "simple_gla gamma", lambda q, k, v: ops.chunk_simple_gla(q, k, v, g_gamma=gamma)[0], qkv()
    gk = F.logsigmoid(torch.randn(B, T, H, D, device="cuda")).requires_grad_()
    yield "gla", lambda q, k, v: ops.chunk_gla(q, k, v, g=gk)[0], qkv()
    beta = torch.rand(B, T, H, device="cuda").requires_grad_()
    yield "gated_delta_rule", lambda q, k, v: ops.chunk_gated_delta_rule(q, k, v, g, beta)[0], _delta_qkv(qkv)
    yield "delta_rule", lambda q, k, v: ops.chunk_delta_rule(q, k, v, beta)[0], _delta_qkv(qkv)
    u = torch.randn(H, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
    yield "rwkv6", lambda q, k, v: ops.chunk_rwkv6(q, k, v, gk, u)[0], qkv()
    s = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
    yield "abc", lambda q, k, v: ops.chunk_abc(q, k, v, s)[0], qkv()
    yield "linear_attn normalize", lambda q, k, v: ops.chunk_linear_attn(q, k, v)[0], \
        [F.elu(x.detach()).add(1).requires_grad_() for x in qkv()]


CASES = ("simple_gla g", "simple_gla gamma", "gla", "gated_delta_rule", "delta_rule", "rwkv6", "abc",
         "linear_attn normalize")


def main(argv=None):
    p = shape_args(__doc__)
    p.add_argument("--cases", default=None, help=f"comma list among: {', '.join(CASES)} (default all)")
    args = p.parse_args(argv)
    B, T, H, D = get_shape(p, args)
    only = args.cases.split(",") if args.cases else None
    if only and not set(only) <= set(CASES):
        p.error(f"--cases: unknown {sorted(set(only) - set(CASES))}; known: {', '.join(CASES)}")
    for name, fn, inputs in cases(B, T, H, D):
        if only and name not in only:
            continue
        for _ in range(3):
            o = fn(*inputs)
            o.backward(torch.randn_like(o))
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                o = fn(*inputs)
                o.backward(torch.ones_like(o))
            torch.cuda.synchronize()
        print(f"=== {name} (5 fwd+bwd)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
