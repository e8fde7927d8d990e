"""Bad inputs raise before autograd, naming the argument, the expected and the actual value."""

import pytest
import torch

from fla_tl.ops import chunk_retention, fused_chunk_retention, fused_recurrent_retention

OPS = [chunk_retention, fused_chunk_retention, fused_recurrent_retention]


def inputs(B=2, T=16, H=2, K=8, V=12, dtype=torch.float32):
    return torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, V, dtype=dtype)


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
