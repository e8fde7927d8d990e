"""The public ops inside torch.compile (fullgraph, no graph breaks) and `torch.library.opcheck` of the custom ops."""

import pytest
import torch

from fla_tl.ops import (
    chunk_lightning_attn,
    chunk_linear_attn,
    chunk_retention,
    chunk_simple_gla,
    fused_chunk_retention,
    fused_recurrent_retention,
    fused_recurrent_simple_gla,
)

from utils import assert_close

OPS = {
    "chunk": (chunk_retention, {}),
    "fused_chunk": (fused_chunk_retention, {}),
    "fused_recurrent": (fused_recurrent_retention, {"reverse": True, "state_v_first": True}),
    "chunk_lightning": (chunk_lightning_attn, {"layer_idx": 1, "num_layers": 4}),
    "chunk_simple_gla_v_first": (chunk_simple_gla, {"state_v_first": True}),
}


class Layer(torch.nn.Module):
    def __init__(self, fn, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs
        self.proj = torch.nn.Linear(16, 16, dtype=torch.float64)

    def forward(self, q, k, v, h0, cu_seqlens=None):
        o, ht = self.fn(self.proj(q), k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                        **self.kwargs)
        return o.square().sum() + ht.sum()


def _inputs(B=2, T=70, H=2, K=16, V=24, N=None, v_first=False):
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    h0 = torch.randn((N or B, H, V, K) if v_first else (N or B, H, K, V), dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, h0)]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_compile_fullgraph(op, varlen):
    fn, kwargs = OPS[op]
    torch.manual_seed(0)
    layer = Layer(fn, **kwargs)
    cu = torch.tensor([0, 20, 20, 70]) if varlen else None
    inputs = _inputs(B=1 if varlen else 2, N=3 if varlen else None, v_first=kwargs.get("state_v_first", False))
    params = inputs + list(layer.parameters())
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs, cu)
    grads = torch.autograd.grad(loss, params)
    ref_loss = layer(*inputs, cu)
    ref_grads = torch.autograd.grad(ref_loss, params)
    assert_close("loss", loss, ref_loss, torch.float64)
    for name, g, rg in zip(("dq", "dk", "dv", "dh0", "dw", "db"), grads, ref_grads):
        assert_close(name, g, rg, torch.float64)


def test_compile_inductor():
    """the default (inductor) backend, once, in fp32."""
    torch.manual_seed(0)

    def f(q, k, v):
        o, _ = chunk_retention(q, k, v)
        return (o * 2).sum(-1)

    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k, v)
    assert_close("o", out, f(q, k, v), torch.float32)


def _kernel_call(spec, case):
    """the arguments of `spec`'s kernel-level call when its public function runs `case` (recorded on the way)."""
    calls = []
    call = spec._call

    def record(args, backend):
        calls.append(dict(args))
        return call(args, backend)

    spec._call = record
    try:
        spec.fn(**case.args, backend="torch")
    finally:
        spec._call = call
    assert calls, f"{spec.name}: the case made no kernel-level call"
    return calls[0]


def _specs():
    from fla_tl.registry import registered_ops

    return [pytest.param(spec.name, id=spec.name) for spec in registered_ops() if spec.schema]


@pytest.mark.parametrize("op", _specs())
def test_opcheck(op):
    """every op's custom ops through `torch.library.opcheck` (schema, fake tensors, autograd registration, AOT
    dispatch), on its first `check` case in fp64 with the torch backend."""
    from fla_tl.registry import get_op
    from fla_tl.testing import _leaves

    spec = get_op(op)
    torch.manual_seed(0)
    case = spec.cases(torch.device("cpu"), torch.float64)[0]
    args = _kernel_call(spec, case)
    names = [item.split()[1] for item in spec.schema.split(",")]
    for name, x in _leaves(args, spec.grads):
        args[name] = x.detach().requires_grad_()
    values = tuple(args[n] for n in names)
    fwd = getattr(torch.ops.fla_tl, f"{op}_fwd").default
    torch.library.opcheck(fwd, values + (True, "torch"))
    outputs = [x.detach() for x in fwd(*values, False, "torch")]
    grads = [torch.randn_like(x) if x.numel() else None for x in outputs[:spec.outputs]]
    bwd = getattr(torch.ops.fla_tl, f"{op}_bwd").default
    plain = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in values)
    # bwd gets test_autograd_registration only: the schema, fake and aot checks wrap the real op in dispatch modes
    # that cannot see through the torch.func.vjp of the torch backend (the fwd opcheck runs bwd through autograd)
    torch.library.opcheck(bwd, plain + (outputs, grads, "torch"), test_utils=("test_autograd_registration",))


@pytest.mark.parametrize("op", _specs())
def test_compile_every_op(op):
    """every public op inside `torch.compile(fullgraph=True)` (no graph break) on its first `check` case: outputs,
    final states and every gradient against the fp64 reference."""
    from fla_tl.registry import get_op
    from fla_tl.testing import assert_matches

    spec = get_op(op)
    torch.manual_seed(0)
    case = spec.cases(torch.device("cpu"), torch.float64)[0]
    torch._dynamo.reset()
    compiled = torch.compile(spec.fn, fullgraph=True, backend="aot_eager")
    assert_matches(compiled, case, backend="torch")


def test_compile_gated_and_normalized():
    """a per-token gate (with its gradient) and linear attention's normalisation inside torch.compile(fullgraph)."""
    def f(q, k, v, g, cu):
        o, ht = chunk_simple_gla(q, k, v, g=g, output_final_state=True, cu_seqlens=cu)
        o2, (_, z) = chunk_linear_attn(q, k.abs(), v, cu_seqlens=cu)
        o3, _ = fused_recurrent_simple_gla(q, k, v, g=g, reverse=True, cu_seqlens=cu)
        return o.sum() + ht.sum() + o2.square().sum() + z.sum() + o3.sum()

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 70, 2, dtype=torch.float64).sigmoid().log().requires_grad_()
    cu = torch.tensor([0, 20, 20, 70])
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, g, cu)
    grads = torch.autograd.grad(loss, (q, k, v, g))
    ref_loss = f(q, k, v, g, cu)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, g))
    assert_close("loss", loss, ref_loss, torch.float64)
    for name, a, b in zip(("dq", "dk", "dv", "dg"), grads, ref_grads):
        assert_close(name, a, b, torch.float64)


def test_compile_ops_without_kernels():
    """the torch-only ops (backend choice, validation and all) trace into one graph."""
    from fla_tl.ops import chunk_hgrn, parallel_based, parallel_rebased, parallel_simple_gla

    def f(q, k, v, x, g):
        return (parallel_based(q, k, v).sum() + chunk_hgrn(x, g)[0].sum() + parallel_simple_gla(q, k, v)[0].sum()
                + parallel_rebased(q, k, v).sum())

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 50, 2, 16, requires_grad=True) for _ in range(3))
    x, g = torch.randn(2, 50, 8), torch.randn(2, 50, 8).sigmoid().log()
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, x, g)
    assert_close("out", out, f(q, k, v, x, g), torch.float32)
