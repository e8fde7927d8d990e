"""Lightning attention: simple GLA with fla's depth-dependent per-head decay, against the recurrence."""

import pytest
import torch

from fla_tl.ops import chunk_lightning_attn, fused_recurrent_lightning_attn
from fla_tl.reference import lightning_g_gamma, recurrent_lightning_attn

from test_retention import _cu, make_inputs
from utils import check_op

OPS = {"chunk": chunk_lightning_attn, "fused_recurrent": fused_recurrent_lightning_attn}


def test_decay_formula():
    """fla 0.6.0: g_gamma = -(8 / H * (1 - layer_idx / num_layers)) * arange(H)."""
    g = lightning_g_gamma(4, 1, 4)
    torch.testing.assert_close(g, torch.tensor([0.0, -1.5, -3.0, -4.5]))


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("op", list(OPS))
def test_torch_backend(op, layer):
    q, k, v, h0 = make_inputs(2, 130, 3, 60, 100, torch.float64)
    check_op(OPS[op], recurrent_lightning_attn, q, k, v, h0, backend="torch", layer_idx=layer, num_layers=4)


@pytest.mark.parametrize("op", list(OPS))
def test_varlen(op):
    lens = (1, 63, 0, 130)
    q, k, v, h0 = make_inputs(1, sum(lens), 2, 32, 48, torch.float64, N=len(lens))
    check_op(OPS[op], recurrent_lightning_attn, q, k, v, h0, cu_seqlens=_cu(lens), backend="torch", layer_idx=2,
             num_layers=12)


def test_fused_recurrent_reverse():
    q, k, v, h0 = make_inputs(2, 70, 2, 16, 24, torch.float64)
    check_op(fused_recurrent_lightning_attn, recurrent_lightning_attn, q, k, v, h0, backend="torch", layer_idx=1,
             num_layers=3, reverse=True)


@pytest.mark.parametrize("op", list(OPS))
def test_bad_layer_arguments(op):
    q, k, v, _ = make_inputs(1, 10, 2, 8, 8, torch.float32, h0=False)
    with pytest.raises(ValueError, match="layer_idx < num_layers"):
        OPS[op](q, k, v, layer_idx=4, num_layers=4)
    with pytest.raises(TypeError, match="`layer_idx` must be an int"):
        OPS[op](q, k, v, layer_idx=1.0, num_layers=4)


@pytest.mark.gpu
@pytest.mark.parametrize(("T", "D", "dtype"), [
    pytest.param(63, 64, torch.bfloat16, id="T63-D64-bf16"),
    pytest.param(1000, 128, torch.bfloat16, id="T1000-D128-bf16"),
    pytest.param(500, 100, torch.float32, id="T500-D100-fp32"),
])
@pytest.mark.parametrize("op", list(OPS))
def test_tilelang(op, T, D, dtype, poisoned_cuda):
    q, k, v, h0 = make_inputs(2, T, 8, D, D, dtype, device="cuda")
    check_op(OPS[op], recurrent_lightning_attn, q, k, v, h0, backend="tilelang", layer_idx=1, num_layers=8)
    lens = (1, 300, 0, 77)
    q, k, v, h0 = make_inputs(1, sum(lens), 8, D, D, dtype, device="cuda", N=len(lens))
    check_op(OPS[op], recurrent_lightning_attn, q, k, v, h0, cu_seqlens=_cu(lens, "cuda"), backend="tilelang",
             layer_idx=0, num_layers=8)
