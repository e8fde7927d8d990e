"""The registry: capabilities as data, every refusal reason of every verifier, forced and automatic choice."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import fla_tl.ops as ops
from fla_tl import registry
from fla_tl.registry import BackendError, FallbackWarning, OpInputs, describe_inputs, get_op, select_backend

OP_NAMES = ["chunk_retention", "fused_chunk_retention", "fused_recurrent_retention"]
ALL_OPS = OP_NAMES + [
    "parallel_retention",
    "chunk_simple_gla", "fused_chunk_simple_gla", "fused_recurrent_simple_gla", "parallel_simple_gla",
    "chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn",
    "chunk_lightning_attn", "fused_recurrent_lightning_attn",
    "chunk_gla", "fused_recurrent_gla", "fused_chunk_gla",
    "chunk_hgrn", "fused_recurrent_hgrn", "fused_chunk_based", "parallel_based", "parallel_rebased",
    "chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
    "fused_chunk_delta_rule",
    "chunk_kda", "fused_recurrent_kda",
    "chunk_titans_linear",
    "chunk_rwkv6", "fused_recurrent_rwkv6",
    "chunk_dplr_delta_rule", "fused_recurrent_dplr_delta_rule", "chunk_iplr_delta_rule",
    "fused_recurrent_iplr_delta_rule", "chunk_rwkv7", "fused_recurrent_rwkv7", "fused_mul_recurrent_rwkv7",
    "chunk_abc", "chunk_gsa", "fused_recurrent_gsa",
]
# ops without a kernel-level call (fla dropped them: they raise; both backend entries refuse every input)
DROPPED = {"fused_chunk_gla", "fused_chunk_delta_rule"}
# ops whose tilelang entry takes no varlen input, no initial state or no K = 128 (their own tests check what it
# accepts)
NO_VARLEN = {"chunk_titans_linear", "chunk_hgrn", "fused_chunk_based", "parallel_based", "parallel_rebased",
             "parallel_simple_gla", "parallel_retention"}

# what the tilelang backend accepts: a Hopper GPU, bf16, head dims within the limit
H100 = OpInputs(device_type="cuda", dtype=torch.bfloat16, K=128, V=128, compute_capability=(9, 0),
                varlen=True, initial_state=True, backward=True)


@pytest.fixture
def tilelang_importable(monkeypatch):
    """pretend tilelang and its kernels import, so only the input decides."""
    monkeypatch.setattr(registry, "module_missing", lambda name: False)
    monkeypatch.setattr(registry, "import_reason", lambda module: None)


def backend(op, name):
    return get_op(op).backend(name)


@pytest.mark.parametrize("op", OP_NAMES)
def test_registration(op):
    spec = get_op(op)
    assert spec.variant == "retention"
    assert spec.mode == op.replace("_retention", "")
    assert spec.fn is getattr(ops, op)
    assert [b.name for b in spec.backends] == ["tilelang", "torch"]
    tl = spec.backend("tilelang").capabilities
    assert tl.devices == ("cuda",)
    assert tl.dtypes == (torch.bfloat16, torch.float16, torch.float32)
    assert tl.max_head_dim == 256 and tl.min_compute_capability == (9, 0)
    assert tl.varlen and tl.initial_state and tl.backward
    th = spec.backend("torch").capabilities
    assert th.devices is None and torch.float64 in th.dtypes and th.max_head_dim is None
    recurrent = op == "fused_recurrent_retention"
    assert tl.reverse == th.reverse == recurrent
    assert tl.state_v_first == th.state_v_first == recurrent


def test_custom_ops_defined():
    """every op but the two fla dropped is a custom op pair (one wrapping path)."""
    for op in [op for op in ALL_OPS if op not in DROPPED]:
        assert hasattr(torch.ops.fla_tl, f"{op}_fwd") and hasattr(torch.ops.fla_tl, f"{op}_bwd")


# ops whose tilelang entry runs only when asked for by name (`Backend.opt_in`)
OPT_IN = {"chunk_kda"}
# ops whose tilelang entry refuses every input until its kernels are built (the torch backend runs)
NOT_BUILT = {"chunk_dplr_delta_rule", "fused_recurrent_dplr_delta_rule", "chunk_iplr_delta_rule",
             "fused_recurrent_iplr_delta_rule", "chunk_rwkv7", "fused_recurrent_rwkv7", "fused_mul_recurrent_rwkv7"}


@pytest.mark.parametrize("op", [op for op in ALL_OPS if op not in DROPPED | NO_VARLEN | OPT_IN | NOT_BUILT])
def test_tilelang_accepts(op, tilelang_importable):
    # chunk_abc takes no cu_seqlens (as fla)
    inputs = dataclasses.replace(H100, varlen=False) if op == "chunk_abc" else H100
    assert backend(op, "tilelang").verifier(inputs) == []
    assert select_backend(get_op(op), inputs).name == "tilelang"


@pytest.mark.parametrize("op", sorted(OPT_IN))
def test_opt_in_backend_runs_only_when_asked_for(op, tilelang_importable, monkeypatch):
    """an opt-in tilelang entry accepts the input, the automatic choice passes it over for torch (and says why once),
    and asking for it by name runs it."""
    monkeypatch.setattr("fla_tl.utils._warned", set())
    assert backend(op, "tilelang").verifier(H100) == []
    with pytest.warns(FallbackWarning, match="only when asked"):
        assert select_backend(get_op(op), H100).name == "torch"
    assert select_backend(get_op(op), H100, "tilelang").name == "tilelang"


REFUSALS = [
    pytest.param(dict(device_type="cpu", compute_capability=None), ["needs a cuda tensor, got cpu"], id="device"),
    pytest.param(dict(dtype=torch.float64), ["dtype torch.float64 is not one of bf16, fp16, fp32"], id="dtype"),
    pytest.param(dict(K=320), ["head dim K = 320 exceeds 256"], id="K"),
    pytest.param(dict(V=512), ["head dim V = 512 exceeds 256"], id="V"),
    pytest.param(dict(compute_capability=(8, 0)), ["needs compute capability >= 9.0, got 8.0"], id="cc"),
    pytest.param(dict(sequences_x_heads=65536), ["sequences x heads = 65536 exceeds 65535"], id="grid"),
    pytest.param(
        dict(device_type="cpu", compute_capability=None, dtype=torch.float64, K=300, V=300),
        ["needs a cuda tensor", "dtype torch.float64", "K = 300", "V = 300"],
        id="all-at-once",
    ),
]


@pytest.mark.parametrize(("change", "expected"), REFUSALS)
def test_tilelang_refusals(change, expected, tilelang_importable):
    inputs = OpInputs(**{**H100.__dict__, **change})
    reasons = backend("chunk_retention", "tilelang").verifier(inputs)
    assert len(reasons) == len(expected), reasons
    for reason, want in zip(reasons, expected):
        assert want in reason


def test_describe_counts_sequences_x_heads():
    """varlen: the sequences of cu_seqlens; grouped value heads: the value heads."""
    q, v = torch.empty(1, 10, 2, 8), torch.empty(1, 10, 4, 8)
    assert describe_inputs(q, v).sequences_x_heads == 4
    assert describe_inputs(q, v, cu_seqlens=torch.tensor([0, 3, 7, 10])).sequences_x_heads == 12
    assert describe_inputs(q.expand(5, -1, -1, -1), v.expand(5, -1, -1, -1)).sequences_x_heads == 20
    x = torch.empty(3, 10, 8)  # HGRN: [B, T, D]
    assert describe_inputs(x, x).sequences_x_heads == 3


@pytest.mark.parametrize("op", ["chunk_delta_rule", "chunk_gated_delta_rule"])
def test_chunk_delta_refuses_fp32_wide_keys(op, tilelang_importable):
    """fp32 inputs with K > 128 overflow the chunk state pass's shared memory: refused with the way out; K = 128
    fp32, K = 256 bf16 and the token-by-token op take them."""
    fp32 = dataclasses.replace(H100, dtype=torch.float32)
    reasons = backend(op, "tilelang").verifier(dataclasses.replace(fp32, K=256))
    assert len(reasons) == 1 and "fp32 inputs take K <= 128" in reasons[0] and "backend='torch'" in reasons[0]
    assert select_backend(get_op(op), dataclasses.replace(fp32, K=256)).name == "torch"
    assert backend(op, "tilelang").verifier(fp32) == []
    assert backend(op, "tilelang").verifier(dataclasses.replace(H100, K=256)) == []
    recurrent = op.replace("chunk_", "fused_recurrent_")
    assert backend(recurrent, "tilelang").verifier(dataclasses.replace(fp32, K=256)) == []


def test_tilelang_refuses_without_tilelang(monkeypatch):
    monkeypatch.setattr(registry, "module_missing", lambda name: True)
    assert backend("chunk_retention", "tilelang").verifier(H100) == ["tilelang is not installed"]


def test_tilelang_refuses_broken_kernels(monkeypatch):
    monkeypatch.setattr(registry, "module_missing", lambda name: False)
    monkeypatch.setattr(registry, "_IMPORT_ERRORS", {"fla_tl.kernels.simple_gla.chunk": "cannot import it: boom"})
    assert backend("chunk_retention", "tilelang").verifier(H100) == ["cannot import it: boom"]


def test_chunk_refuses_recurrent_options(tilelang_importable):
    inputs = OpInputs(**{**H100.__dict__, "reverse": True, "state_v_first": True})
    for name in ("tilelang", "torch"):
        reasons = backend("chunk_retention", name).verifier(inputs)
        assert reasons == ["does not support reverse=True", "does not support state_v_first=True"]
        assert backend("fused_recurrent_retention", name).verifier(inputs) == []


def test_capability_flags():
    caps = registry.Capabilities(devices=None, dtypes=(torch.float32,), varlen=False, initial_state=False,
                                 backward=False)
    inputs = OpInputs(device_type="cpu", dtype=torch.float32, K=8, V=8, varlen=True, initial_state=True,
                      backward=True)
    assert registry.capability_reasons(caps, inputs) == [
        "does not support variable-length inputs (cu_seqlens)",
        "does not support an initial state",
        "does not support a backward pass",
    ]


def test_torch_accepts_anything_float():
    for inputs in (H100, OpInputs(device_type="cpu", dtype=torch.float64, K=1024, V=1024)):
        assert backend("chunk_retention", "torch").verifier(inputs) == []


def test_auto_falls_back_to_torch_and_warns_once(monkeypatch):
    monkeypatch.setattr("fla_tl.utils._warned", set())
    inputs = OpInputs(device_type="cpu", dtype=torch.float32, K=8, V=8)
    with pytest.warns(FallbackWarning) as record:
        for _ in range(3):
            assert select_backend(get_op("chunk_retention"), inputs).name == "torch"
    messages = [str(w.message) for w in record if issubclass(w.category, FallbackWarning)]
    assert len(messages) == 1
    assert messages[0].startswith("fla_tl: chunk_retention runs the pure-PyTorch path on cpu: tilelang: ")
    assert "needs a cuda tensor, got cpu" in messages[0]


def test_auto_fallback_on_gpu_warns(monkeypatch):
    monkeypatch.setattr("fla_tl.utils._warned", set())
    inputs = OpInputs(**{**H100.__dict__, "compute_capability": (8, 0)})
    with pytest.warns(FallbackWarning, match="needs compute capability >= 9.0, got 8.0"):
        assert select_backend(get_op("chunk_retention"), inputs).name == "torch"


def test_forced_backend_raises(tilelang_importable):
    inputs = OpInputs(device_type="cpu", dtype=torch.float64, K=8, V=8)
    with pytest.raises(BackendError, match=r"backend='tilelang'.*needs a cuda tensor, got cpu; dtype torch.float64"):
        select_backend(get_op("chunk_retention"), inputs, "tilelang")
    q = torch.randn(1, 8, 1, 8)
    with pytest.raises(BackendError, match="requested backend"):
        ops.chunk_retention(q, q, q, backend="tilelang")


def test_no_backend_lists_every_candidate(monkeypatch):
    spec = get_op("chunk_retention")
    tight = registry.Capabilities(devices=("cuda",), dtypes=(torch.float16,))
    torch_backend = registry.Backend(
        name="torch", capabilities=tight, verifier=lambda inputs: registry.capability_reasons(tight, inputs),
        fwd=None, bwd=None,
    )
    monkeypatch.setattr(spec, "backends", [spec.backend("tilelang"), torch_backend])
    inputs = OpInputs(device_type="cpu", dtype=torch.float64, K=8, V=8)
    with pytest.raises(BackendError) as info:
        select_backend(spec, inputs)
    message = str(info.value)
    assert "chunk_retention: no backend can run this input" in message
    assert "- tilelang: needs a cuda tensor, got cpu; dtype torch.float64 is not one of bf16, fp16, fp32" in message
    assert "- torch: needs a cuda tensor, got cpu; dtype torch.float64 is not one of fp16" in message


def test_env_var_forces_backend(monkeypatch, tilelang_importable):
    inputs = OpInputs(device_type="cpu", dtype=torch.float32, K=8, V=8)
    monkeypatch.setenv("FLA_TL_BACKEND", "tilelang")
    with pytest.raises(BackendError, match="FLA_TL_BACKEND='tilelang'"):
        select_backend(get_op("chunk_retention"), inputs)
    q = torch.randn(1, 8, 1, 8)
    with pytest.raises(BackendError, match="FLA_TL_BACKEND"):
        ops.chunk_retention(q, q, q)
    # the argument wins over the variable
    assert ops.chunk_retention(q, q, q, backend="torch")[0].shape == (1, 8, 1, 8)
    assert select_backend(get_op("chunk_retention"), H100).name == "tilelang"
    monkeypatch.setenv("FLA_TL_BACKEND", "torch")
    assert select_backend(get_op("chunk_retention"), H100).name == "torch"
    monkeypatch.setenv("FLA_TL_BACKEND", "auto")
    assert select_backend(get_op("chunk_retention"), H100).name == "tilelang"
    monkeypatch.setenv("FLA_TL_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"the environment variable FLA_TL_BACKEND must be one of \['tilelang', "
                       r"'torch'\] or 'auto' for chunk_retention, got 'nope'"):
        select_backend(get_op("chunk_retention"), H100)
    with pytest.raises(ValueError, match="the environment variable FLA_TL_BACKEND must be one of"):
        ops.chunk_retention(q, q, q)
    # a bad argument is named as the argument, whatever the variable holds
    with pytest.raises(ValueError, match="^`backend` must be one of"):
        select_backend(get_op("chunk_retention"), H100, "nope")


def test_list_ops(capsys):
    specs = ops.list_ops()
    out = capsys.readouterr().out
    assert [s.name for s in specs] == ALL_OPS
    for op in ALL_OPS:
        assert op in out
    assert "tilelang, torch" in out and "bf16/fp16/fp32" in out


def test_no_kernel_import_at_import_time():
    """importing the ops imports no TileLang and no kernel module: only the variants' `ops` modules (and the shared
    op plumbing); the kernels load on first use."""
    code = ("import sys, fla_tl, fla_tl.ops; print(sorted(m for m in sys.modules if m.startswith('tilelang') or "
            "(m.startswith('fla_tl.kernels.') and m.split('.')[-1] not in ('ops', 'state_op') and m.count('.') > 2)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_list():
    out = subprocess.run([sys.executable, "-m", "fla_tl", "list"], capture_output=True, text=True, check=True).stdout
    for op in OP_NAMES:
        assert op in out


@pytest.mark.parametrize("op", sorted(set(ALL_OPS) - DROPPED))
def test_ops_have_check_cases(op):
    """`python -m fla_tl check` runs every op's cases (a merge once left one unset)."""
    spec = get_op(op)
    assert callable(spec.cases) and callable(spec.fn)
    assert spec.cases(torch.device("cpu"), torch.float64)


def _kernel_style_backend(spec):
    """a backend shaped like a TileLang one (fwd with a residual, bwd reading it) made of the op's PyTorch form, on
    the CPU: it drives the eager autograd path and the custom ops' fake residuals without a GPU."""
    form = spec.backend("torch").differentiable

    def fwd(requires_grad, **args):
        with torch.no_grad():
            o, ht = form(**args)
        return o, ht, args["q"].sum((-1, -2)).float()  # a residual of the input's shape [B, T]

    def residuals(args, requires_grad):
        return [args["q"].new_empty(args["q"].shape[:2], dtype=torch.float32)]

    def bwd(args, outputs, grads):
        assert torch.equal(outputs[2], args["q"].sum((-1, -2)).float()), "the residual reaches the backward"
        wrt = [n for n in spec.grads if args[n] is not None]
        return registry._vjp(form, args, wrt, grads)

    caps = registry.torch_capabilities(state_v_first=True, gate=True)
    return registry.Backend(name="emulated", capabilities=caps, fwd=fwd, bwd=bwd, residuals=residuals)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_kernel_style_backend(compiled, monkeypatch):
    """the path the TileLang backends take (fwd -> outputs + residuals, bwd from saved outputs and residuals), eager
    through the autograd.Function and compiled through the custom ops, against the recurrence."""
    from fla_tl.reference import recurrent_simple_gla
    from fla_tl.testing import check_states

    spec = get_op("chunk_simple_gla")
    monkeypatch.setattr(spec, "backends", [_kernel_style_backend(spec), *spec.backends])
    fn = torch.compile(ops.chunk_simple_gla, fullgraph=True, backend="aot_eager") if compiled else ops.chunk_simple_gla
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 90, 2, 16, dtype=torch.float64) for _ in range(3))
    h0 = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 90, 2, dtype=torch.float64))
    check_states(fn, recurrent_simple_gla, q, k, v, h0, cu_seqlens=torch.tensor([0, 20, 20, 90]),
                 backend="emulated", grad_kwargs={"g": g})
