"""Bad inputs raise before autograd, naming the argument, the expected and the actual value."""

import inspect
import re
import warnings

import pytest
import torch

from fla_tl import ops
from fla_tl.ops import chunk_retention, fused_chunk_retention, fused_recurrent_retention
from fla_tl.registry import FallbackWarning
from fla_tl.utils import check_cu_seqlens_values

OPS = [chunk_retention, fused_chunk_retention, fused_recurrent_retention]


def inputs(B=2, T=16, H=2, K=8, V=12, dtype=torch.float32):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    return q, k, torch.randn(B, T, H, V, dtype=dtype)


def bad_cases():
    q, k, v = inputs()
    q1, k1, v1 = inputs(B=1, T=20)
    cu = torch.tensor([0, 5, 20])
    return [
        pytest.param(dict(q=q.numpy(), k=k, v=v), TypeError, "`q` must be a torch.Tensor", id="q-not-tensor"),
        pytest.param(dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "`q` must be a floating-point",
                     id="q-int"),
        pytest.param(dict(q=q.to(torch.float8_e4m3fn), k=k, v=v), TypeError, "`q` must have dtype in",
                     id="q-fp8"),
        pytest.param(dict(q=q, k=k.double(), v=v), TypeError, "`k` must have the dtype of `q`", id="k-dtype"),
        pytest.param(dict(q=q, k=k, v=v.half()), TypeError, "`v` must have the dtype of `q`", id="v-dtype"),
        pytest.param(dict(q=q, k=k.to("meta"), v=v), ValueError, "`k` must be on the device of `q`",
                     id="k-device"),
        pytest.param(dict(q=q[0], k=k[0], v=v[0]), ValueError, r"`q` must have shape \[B, T, H, K\]", id="q-3d"),
        pytest.param(dict(q=q, k=k[:, :8], v=v), ValueError, "`k` must have the shape of `q`", id="k-shape"),
        pytest.param(dict(q=q, k=k, v=v[:, :8]), ValueError, r"`v` must have shape \[B, T, H, V\]", id="v-shape"),
        pytest.param(dict(q=q, k=k, v=v[:, :, :1]), ValueError, "`v` must have shape", id="v-heads"),
        pytest.param(dict(q=q, k=k, v=v, scale="x"), TypeError, "`scale` must be a float", id="scale-type"),
        pytest.param(dict(q=q, k=k, v=v, scale=float("inf")), ValueError, "`scale` must be a finite number, got inf",
                     id="scale-inf"),
        pytest.param(dict(q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 16])), ValueError,
                     "`q` must have batch size B = 1", id="cu-batch"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=cu.float()), TypeError, "`cu_seqlens` must have an integer",
                     id="cu-float"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=cu[None]), ValueError, "`cu_seqlens` must be 1-D",
                     id="cu-2d"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=torch.tensor([0])), ValueError, "`cu_seqlens` must be 1-D",
                     id="cu-short"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=torch.tensor([1, 5, 20])), ValueError,
                     "`cu_seqlens` must start at 0, got 1", id="cu-start"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=torch.tensor([0, 12, 5, 20])), ValueError,
                     "`cu_seqlens` must be non-decreasing", id="cu-decreasing"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=torch.tensor([0, 5, 19])), ValueError,
                     "`cu_seqlens` must end at T = 20", id="cu-end"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=cu.to("meta")), ValueError,
                     "`cu_seqlens` must be on the device of `q`", id="cu-device"),
        pytest.param(dict(q=q, k=k, v=v, initial_state=torch.randn(2, 2, 12, 8)), ValueError,
                     r"`initial_state` must have shape \[N, H, K, V\] = \[2, 2, 8, 12\]", id="h0-layout"),
        pytest.param(dict(q=q, k=k, v=v, initial_state=torch.randn(3, 2, 8, 12)), ValueError,
                     r"N = B = 2\), got \(3, 2, 8, 12\)", id="h0-count"),
        pytest.param(dict(q=q1, k=k1, v=v1, cu_seqlens=cu, initial_state=torch.randn(1, 2, 8, 12)), ValueError,
                     r"N = len\(cu_seqlens\) - 1 = 2", id="h0-count-varlen"),
        pytest.param(dict(q=q, k=k, v=v, initial_state=torch.randn(2, 2, 8, 12).long()), TypeError,
                     "`initial_state` must be a floating-point", id="h0-int"),
        pytest.param(dict(q=q, k=k, v=v, backend="triton"), ValueError, "`backend` must be one of", id="backend"),
    ]


@pytest.mark.parametrize("fn", OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("kwargs", "error", "message"), bad_cases())
def test_bad_input(fn, kwargs, error, message):
    with pytest.raises(error, match=message):
        fn(**kwargs)


def test_bad_input_state_v_first():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"\[N, H, V, K\] = \[2, 2, 12, 8\]"):
        fused_recurrent_retention(q, k, v, initial_state=torch.randn(2, 2, 8, 12), state_v_first=True)


def test_validation_before_autograd():
    q, k, v = (x.requires_grad_() for x in inputs())
    with pytest.raises(ValueError):
        chunk_retention(q, k[:, :3], v)
    assert q.grad is None and k.grad is None


# ---------------------------------------------------------------------------------------------- every op


def _ops(with_cases: bool = True):
    from fla_tl.registry import registered_ops

    return [pytest.param(spec.name, id=spec.name) for spec in registered_ops()
            if (spec.cases is not None) == with_cases]


def _case(op: str, dtype=torch.float32):
    from fla_tl.registry import get_op

    spec = get_op(op)
    return spec, spec.cases(torch.device("cpu"), dtype)[0]


@pytest.mark.parametrize("op", _ops())
def test_unknown_keyword(op):
    spec, case = _case(op)
    with pytest.raises(TypeError, match="bogus_option"):
        spec.fn(**case.args, bogus_option=1)


@pytest.mark.parametrize("op", _ops(with_cases=False))
def test_unknown_keyword_dropped_op(op):
    """the ops fla dropped raise whatever they are given."""
    from fla_tl.registry import get_op

    with pytest.raises(NotImplementedError):
        get_op(op).fn(bogus_option=1)


def test_chunk_gsa_misspelt_initial_state():
    from fla_tl.ops import chunk_gsa

    q, k, v, s = (torch.randn(2, 8, 2, d) for d in (8, 8, 8, 4))
    states = (torch.randn(2, 2, 8, 4), torch.randn(2, 2, 4, 8))
    with pytest.raises(TypeError, match="initial_states"):
        chunk_gsa(q, k, v, s, initial_states=states)


def _replaced(args: dict, name: str, index, value) -> dict:
    args = dict(args)
    if index is None:
        args[name] = value
    else:
        args[name] = type(args[name])(value if i == index else x for i, x in enumerate(args[name]))
    return args


def _tensor_args(op: str):
    """(label, name, index in a tuple argument or None, tensor) of every tensor argument of the op's first case."""
    _, case = _case(op)
    found = []
    for name, value in case.args.items():
        items = enumerate(value) if isinstance(value, (tuple, list)) else [(None, value)]
        for index, x in items:
            if isinstance(x, torch.Tensor):
                found.append((name if index is None else f"{name}[{index}]", name, index, x))
    return found


@pytest.mark.parametrize("op", _ops())
def test_integer_tensor_argument(op):
    """an integer tensor where a float one belongs: `TypeError` naming the argument and the dtype."""
    spec, case = _case(op)
    for label, name, index, x in _tensor_args(op):
        if not x.is_floating_point():
            continue
        with pytest.raises(TypeError, match=rf"`{re.escape(label)}` must .*torch\.int64"):
            spec.fn(**_replaced(case.args, name, index, x.long()))


@pytest.mark.parametrize("op", _ops())
def test_tensor_argument_on_another_device(op):
    """a tensor argument on another device: `ValueError` naming the argument and both devices (the first tensor
    argument is the reference the others are held to)."""
    spec, case = _case(op)
    for label, name, index, x in _tensor_args(op):
        label = re.escape(label)
        message = rf"`{label}` must be on the device of `\w+` \(cpu\), got meta|on the device of `{label}` \(meta\)"
        with pytest.raises(ValueError, match=message):
            spec.fn(**_replaced(case.args, name, index, x.to("meta")))


@pytest.mark.parametrize(("op", "shape"), [
    ("chunk_delta_rule", (2, 2, 16, 12)),
    ("fused_recurrent_delta_rule", (2, 2, 16, 12)),
    ("chunk_gated_delta_rule", (2, 4, 16, 12)),
    ("fused_recurrent_gated_delta_rule", (2, 4, 16, 12)),
    ("chunk_hgrn", (2, 24)),
    ("fused_recurrent_hgrn", (1, 24)),
    ("chunk_titans_linear", (2, 2, 16, 16)),
])
def test_integer_initial_state(op, shape):
    """the message every op gives for an integer initial state."""
    spec, case = _case(op)
    args = {**case.args, "initial_state": torch.zeros(case.args["initial_state"].shape, dtype=torch.int64)}
    with pytest.raises(TypeError, match=r"^`initial_state` must be a floating-point tensor, got dtype torch.int64$"):
        spec.fn(**args)


def test_hgrn_initial_state_device():
    from fla_tl.ops import chunk_hgrn

    x, g = torch.randn(2, 8, 4), torch.randn(2, 8, 4).sigmoid().log()
    with pytest.raises(ValueError, match=r"`initial_state` must be on the device of `x` \(cpu\), got meta"):
        chunk_hgrn(x, g, initial_state=torch.zeros(2, 4, device="meta"))


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("op", [p for p in _ops() if "scale" in inspect.signature(_case(p.values[0])[0].fn).parameters])
def test_non_finite_scale(op, scale):
    spec, case = _case(op)
    with pytest.raises(ValueError, match=r"`scale` must be a finite number, got"):
        spec.fn(**case.args, scale=scale)


def test_based_docstring_states_the_range():
    from fla_tl.ops import fused_chunk_based, parallel_based

    for fn in (fused_chunk_based, parallel_based):
        assert "1.8e19" in fn.__doc__ and "fp16" in fn.__doc__


# ---------------------------------------------------------------------------------------------- cu_seqlens values


CU_FAMILIES = {
    "chunk_simple_gla": lambda x, cu: ops.chunk_simple_gla(x, x, x, cu_seqlens=cu)[0],
    "chunk_delta_rule": lambda x, cu: ops.chunk_delta_rule(x, x, x, x[..., 0].sigmoid(), cu_seqlens=cu)[0],
    "fused_recurrent_hgrn": lambda x, cu: ops.fused_recurrent_hgrn(x[:, :, 0], x[:, :, 0].sigmoid().log(),
                                                                   cu_seqlens=cu)[0],
    "chunk_rwkv6": lambda x, cu: ops.chunk_rwkv6(x, x, x, x.sigmoid().log(), x[0, 0], cu_seqlens=cu)[0],
}
BAD_CU = [
    pytest.param([0, 7, 18], r"`cu_seqlens` must end at T = 20 \(the length of `\w+`\), got 18", id="short"),
    pytest.param([0, 25, 20], r"`cu_seqlens` must be non-decreasing, got \[0, 25, 20\]", id="decreasing"),
    pytest.param([2, 7, 20], "`cu_seqlens` must start at 0, got 2", id="start"),
]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize(("bounds", "message"), BAD_CU)
@pytest.mark.parametrize("op", list(CU_FAMILIES))
def test_cu_seqlens_values(op, bounds, message, mode):
    """the same `ValueError` in eager mode (validation) and inside `torch.compile(fullgraph=True)` (the custom op,
    when it runs); a valid call runs compiled."""
    fn = CU_FAMILIES[op]
    if mode == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 20, 2, 8)
    assert fn(x, torch.tensor([0, 7, 20])).shape[1] == 20
    with pytest.raises(ValueError, match=message):
        fn(x, torch.tensor(bounds))


@pytest.mark.parametrize(("cu", "error", "message"), [
    pytest.param(torch.tensor([0.0, 20.0]), TypeError, "`cu_seqlens` must have an integer dtype", id="float"),
    pytest.param(torch.tensor([[0, 20]]), ValueError, "`cu_seqlens` must be 1-D", id="2d"),
])
def test_cu_seqlens_static_checks_compiled(cu, error, message):
    """dtype and shape are checked while tracing: eager raises the error, a fullgraph compile reports the same
    message (Dynamo wraps an exception raised while tracing)."""
    fn = CU_FAMILIES["chunk_simple_gla"]
    x = torch.randn(1, 20, 2, 8)
    with pytest.raises(error, match=message):
        fn(x, cu)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(fn, fullgraph=True, backend="eager")(x, cu)


def test_cu_seqlens_batch_compiled():
    fn = CU_FAMILIES["chunk_simple_gla"]
    x = torch.randn(2, 10, 2, 8)
    with pytest.raises(ValueError, match="`q` must have batch size B = 1"):
        fn(x, torch.tensor([0, 10]))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="`q` must have batch size B = 1"):
        torch.compile(fn, fullgraph=True, backend="eager")(x, torch.tensor([0, 10]))


def test_cu_seqlens_check_opt_out(monkeypatch):
    """`FLA_TL_CHECK_CU_SEQLENS=0` turns the value checks (host syncs) off; dtype and shape are still checked."""
    bad = torch.tensor([0, 25, 20])
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens_values(bad, 20)
    monkeypatch.setenv("FLA_TL_CHECK_CU_SEQLENS", "0")
    check_cu_seqlens_values(bad, 20)
    x = torch.randn(1, 20, 2, 8)
    with pytest.raises(TypeError, match="`cu_seqlens` must have an integer dtype"):
        ops.chunk_simple_gla(x, x, x, cu_seqlens=bad.float())
    monkeypatch.setenv("FLA_TL_CHECK_CU_SEQLENS", "1")
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens_values(bad, 20)


@pytest.mark.gpu
def test_cu_seqlens_values_skipped_in_cuda_graph_capture():
    """no host sync while a CUDA graph is captured: the value checks are skipped there, and made outside."""
    cu = torch.tensor([0, 25, 20], device="cuda")
    y = torch.zeros(3, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        check_cu_seqlens_values(cu, 20)
        y += 1
    graph.replay()
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens_values(cu, 20)


# ---------------------------------------------------------------------------------------------- T = 0


def _empty_args(case) -> dict:
    """the case's arguments cut to T = 0 (cu_seqlens all zeros)."""
    first = next(x for x in case.args.values() if isinstance(x, torch.Tensor))
    B, T = first.shape[:2]

    def cut(x):
        if isinstance(x, (tuple, list)):
            return type(x)(cut(item) for item in x)
        if not isinstance(x, torch.Tensor):
            return x
        if not x.is_floating_point():
            return torch.zeros_like(x)
        return x[:, :0] if x.dim() >= 2 and tuple(x.shape[:2]) == (B, T) else x

    return {name: cut(x) for name, x in case.args.items()}


def _check_empty_backward(fn, case):
    from fla_tl.testing import _flatten, _leaves, _with_grad

    args = _with_grad(_empty_args(case), case.grad)
    outs = _flatten(fn(**args))
    assert outs[0].shape[1] == 0
    leaves = _leaves(args, case.grad)
    # the output alone: every input gets a zero gradient of its own shape
    grads = torch.autograd.grad(outs[0].sum(), [x for _, x in leaves])
    for (name, x), g in zip(leaves, grads):
        assert g.shape == x.shape and g.dtype == x.dtype and not g.any(), name
    # every output: the final states are the initial states, which get their gradient
    args = _with_grad(_empty_args(case), case.grad)
    sum(x.sum() for x in _flatten(fn(**args))).backward()
    for name, x in _leaves(args, case.grad):
        state = name.startswith("initial_state") and case.args.get("output_final_state")
        assert torch.equal(x.grad, torch.ones_like(x) if state else torch.zeros_like(x)), name


@pytest.mark.parametrize("op", _ops())
def test_empty_sequence_backward(op):
    """backward through a T = 0 output gives zero-size gradients (the initial state: its final state's)."""
    spec, case = _case(op)
    _check_empty_backward(spec.fn, case)


@pytest.mark.parametrize("op", ["chunk_simple_gla", "chunk_delta_rule", "chunk_gsa", "chunk_hgrn", "parallel_based"])
def test_empty_sequence_backward_compiled(op):
    spec, case = _case(op)
    torch._dynamo.reset()
    _check_empty_backward(torch.compile(spec.fn, fullgraph=True, backend="aot_eager"), case)


# ---------------------------------------------------------------------------------------------- fallback, docs


def test_fallback_warns_once(monkeypatch):
    """an automatic choice past the preferred backend warns once per op and reason, at the caller's line."""
    monkeypatch.setattr("fla_tl.utils._warned", set())
    q, k, v = inputs()
    with pytest.warns(FallbackWarning, match="chunk_retention runs the pure-PyTorch path on cpu") as record:
        chunk_retention(q, k, v)
    assert [w.filename for w in record if w.category is FallbackWarning] == [__file__]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        chunk_retention(q, k, v)
        fused_chunk_retention(q, k, v)
    assert [str(w.message).split(" runs ")[0] for w in again if w.category is FallbackWarning] == [
        "fla_tl: fused_chunk_retention"]


def test_fallback_warns_once_compiled(monkeypatch):
    """inside torch.compile(fullgraph=True) the warning breaks no graph, and is given once."""
    monkeypatch.setattr("fla_tl.utils._warned", set())
    q, k, v = inputs()
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: chunk_retention(q, k, v)[0], fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn(q, k, v)
        fn(q, k, v)
    assert len([w for w in record if w.category is FallbackWarning]) == 1


@pytest.mark.parametrize("op", _ops())
def test_backend_docstring(op):
    """an op's docstring that documents `backend` names each of its backends."""
    from fla_tl.registry import get_op

    spec = get_op(op)
    doc = inspect.getdoc(spec.fn)
    lines = doc[doc.find("backend (Optional[str])"):].split("\n\n")[0] if "backend (Optional[str])" in doc else ""
    for b in spec.backends:
        assert not lines or f'"{b.name}"' in lines, (op, b.name, lines)


def test_cu_seqlens_cpu_is_the_host_copy(monkeypatch):
    """fla's `cu_seqlens_cpu` stands for the values of `cu_seqlens`: the op reads nothing back (the device tensor's
    `tolist` is never called), and a malformed copy raises naming `cu_seqlens_cpu`."""
    import fla_tl.ops as ops
    from fla_tl.utils import host_bounds, use_host_copy

    cu = torch.tensor([0, 5, 12], dtype=torch.int64)
    use_host_copy(cu, cu.clone())
    calls = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or [])
    assert host_bounds(cu) == [0, 5, 12] and not calls
    monkeypatch.undo()
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
    g = torch.randn(1, 12, 2, 8).sigmoid().log()
    for bad, err in ((cu.float(), TypeError), (cu[:2].clone(), ValueError), ([0, 5, 12], TypeError)):
        with pytest.raises(err, match="cu_seqlens_cpu"):
            ops.chunk_gla(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=bad)
    with pytest.raises(ValueError, match="cu_seqlens_cpu"):
        ops.chunk_gla(q, k, v, g, cu_seqlens_cpu=cu)
    o, _ = ops.chunk_gla(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=cu.clone())
    torch.testing.assert_close(o, ops.chunk_gla(q, k, v, g, cu_seqlens=cu)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["chunk_gla", "chunk_simple_gla", "chunk_gated_delta_rule", "chunk_rwkv6"])
def test_packed_batch_without_host_sync(op):
    """with `cu_seqlens_cpu`, or from the second call on the same `cu_seqlens`, a packed batch's forward and backward
    make no host sync (`torch.cuda.set_sync_debug_mode("error")` raises on one)."""
    import fla_tl.ops as ops

    dev, lens = "cuda", (1, 130, 0, 700, 64)
    T, H, D = sum(lens), 2, 64
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev)
    q, k, v = (torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    args = [q, k, v]
    if op in ("chunk_gla", "chunk_rwkv6"):
        args.append(torch.randn(1, T, H, D, device=dev).sigmoid().log().requires_grad_())
    if op == "chunk_rwkv6":
        args.append(torch.randn(H, D, device=dev, requires_grad=True))
    kw = {"g": torch.randn(1, T, H, device=dev).sigmoid().log()} if op == "chunk_simple_gla" else {}
    if op == "chunk_gated_delta_rule":
        kw = dict(g=torch.randn(1, T, H, device=dev).sigmoid().log(), beta=torch.rand(1, T, H, device=dev))
    fn = getattr(ops, op)

    def step(cu_, **extra):
        o, ht = fn(*args, **kw, cu_seqlens=cu_, output_final_state=True, backend="tilelang", **extra)
        (o.float().sum() + ht.sum()).backward()

    step(cu)  # compiles the kernels and reads `cu` back once
    fresh, host = cu.clone(), cu.cpu()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(fresh, cu_seqlens_cpu=host)  # a new tensor with its host copy
        step(cu)  # the same tensor again: its metadata is reused
    finally:
        torch.cuda.set_sync_debug_mode("default")
