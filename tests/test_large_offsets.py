"""Global-memory offsets past 2^31 elements.

The kernels declare their extents as int32 dynamic dims (`T.dynamic`). TileLang's FlattenBuffer pass computes every
flattened global-memory index whose bound can pass the int32 range in 64-bit arithmetic (each leaf cast to int64);
loop counters, shared-memory and fragment indices stay 32-bit. Bulk tensor copies (TMA) take one int32 coordinate per
dimension, and every dimension here stays below 2^31 (tokens, chunks, heads, head dims).

- `compile`: one chunk stage's state store is 64-bit and its loop counters 32-bit (test_kernels_compile checks every
  kernel's generated code for 32-bit offsets into tensors of a dynamic shape).
- `gpu` + `large_memory`: one op per shared-stage family runs a packed batch whose second sequence starts past element
  2^31 of q (and of the chunk states); that sequence's output and final state must match the sequence run alone.
  Its 131081 chunks also pass the 65535 blocks a grid's second and third dimensions allow.
  Forward only: a backward at this size would hold q, k, v, do, dq, dk, dv and two state tensors, over 30 GB.
  Each test holds up to 28 GiB; they skip with less than 40 GiB free and under pytest-xdist with several
  workers. Run them serially: `python -m pytest tests/test_large_offsets.py -m large_memory -q`.
"""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from test_kernels_compile import SM90A, global_indices, narrow_indices
from utils import compare, poison_allocator

from fla_tl.ops import (
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_simple_gla,
    fused_chunk_simple_gla,
    fused_recurrent_simple_gla,
)

# ---------------------------------------------------------------- compile: the generated index arithmetic


@pytest.mark.compile
def test_chunk_state_offsets_are_64_bit():
    """chunk_fwd_h stores the state entering each chunk into h `[NT, H, K, V]` (past 2^31 elements for a packed batch
    of 2^23 tokens at H = 2, K = 128, V = 64): its offsets are 64-bit, its loop counters 32-bit."""
    from fla_tl.kernels.common.chunk_h import chunk_fwd_h_kernel
    from fla_tl.kernels.common.utils import get_kernel

    dims = {"K": 128, "V": 128, "gate": "gamma", "dtype": "bfloat16", "h_dtype": "bfloat16"}
    # the tiles of its compile case in test_kernels_compile: one build for both
    kernel = get_kernel(chunk_fwd_h_kernel, SM90A, **dims, BT=64, BK=64, BV=64, num_stages=2, threads=128)
    source = kernel.get_kernel_source()
    stores = global_indices(source).get("h", [])
    assert stores, "no store into h found in the generated source"
    assert all("int64_t" in index for index in stores), f"h offsets in 32 bits: {stores[0][:200]}"
    assert not narrow_indices(source), narrow_indices(source)
    assert re.search(r"for \(int \w+ = 0;", source) and not re.search(r"for \(int64_t ", source)


# ---------------------------------------------------------------- gpu: a second sequence past element 2^31

H, K, V = 2, 128, 64
# the first sequence: 2^23 tokens and three chunks of 64, plus 37 (a partial last chunk)
L1 = 2**23 + 64 * 3 + 37
# the second sequence, short and odd; it starts at q element L1 * H * K = 2^31 + 58624 and at h element
# 131076 * H * K * V = 2^31 + 65536 (chunk 131076: the first sequence has 131076 chunks)
L2 = 300
assert L1 * H * K > 2**31 and -(-L1 // 64) * H * K * V > 2**31
FREE_NEEDED = 40 * 2**30
# the bytes NaN-filled before the op: its outputs and intermediates, at most 7 times o's (chunk_gla: gc fp32 [T, H, K],
# h, o); the inputs plus this stay under 30 GB
POISON_BYTES = 7 * (L1 + L2) * H * V * 2


@pytest.fixture
def large_gpu():
    """skip unless this process has the GPU to itself with 40 GiB free; give the memory back afterwards."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.skip("holds up to 28 GiB of GPU memory: run serially (-m large_memory, without -n)")
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    if free < FREE_NEEDED:
        pytest.skip(f"needs {FREE_NEEDED / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    yield
    torch.cuda.empty_cache()


def _random(shape, transform=None) -> torch.Tensor:
    """a bf16 CUDA tensor `[1, T, ...]` of standard normal values (then `transform(x)`), drawn in fp32 slices of 2^18
    tokens so no full-size fp32 temporary is made."""
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    for part in x.split(1 << 18, dim=1):
        r = torch.randn(part.shape, device="cuda")
        part.copy_(transform(r) if transform is not None else r)
    return x


def _token_gate(T: int) -> dict:
    return {"g": _random((1, T, H), lambda r: F.logsigmoid(r + 2))}


# one op per shared-stage family: name -> (op, its extra tensors `[1, T, ...]` for T tokens)
OPS = {
    # chunk_fwd_h / chunk_fwd_o
    "chunk_simple_gla": (chunk_simple_gla, _token_gate),
    # the per-key gated state pass and output kernel (gc fp32 [T, H, K] also passes 2^31 elements)
    "chunk_gla": (chunk_gla, lambda T: {"g": _random((1, T, H, K), lambda r: F.logsigmoid(r + 2))}),
    # wy_repr / chunk_delta_fwd_h / chunk_fwd_o
    "chunk_gated_delta_rule": (chunk_gated_delta_rule,
                               lambda T: {**_token_gate(T), "beta": _random((1, T, H), torch.sigmoid)}),
    "fused_recurrent_simple_gla": (fused_recurrent_simple_gla, _token_gate),
    "fused_chunk_simple_gla": (fused_chunk_simple_gla, _token_gate),
}


def _run_packed(fn, extras) -> tuple:
    """run `fn` on the packed batch; returns (the second sequence's inputs, its output and final state, whether the
    whole output and the first final state are finite, an error message or None). The large tensors live only here:
    an error is returned as text, so no traceback keeps them on the GPU."""
    T = L1 + L2
    args = {
        "q": _random((1, T, H, K)),
        "k": _random((1, T, H, K), lambda r: F.normalize(r, dim=-1)),
        "v": _random((1, T, H, V)),
        **extras(T),
    }
    h0 = torch.randn(2, H, K, V, device="cuda")
    second = {name: x[:, L1:].clone() for name, x in args.items()}
    # NaN in the memory the outputs will take (the fixture's poison went to the inputs and their temporaries)
    torch.cuda.empty_cache()
    poison_allocator("cuda", nbytes=POISON_BYTES)
    try:
        cu_seqlens = torch.tensor([0, L1, T], device="cuda")
        o, ht = fn(**args, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, backend="tilelang")
    except Exception as e:  # noqa: BLE001 - reported by the test, without the frames that hold the inputs
        return second, h0[1:], None, None, False, f"{type(e).__name__}: {e}"
    finite = torch.isfinite(o.sum(dtype=torch.float32)).item() and torch.isfinite(ht[0]).all().item()
    return second, h0[1:].clone(), o[:, L1:].clone(), ht[1:].clone(), finite, None


@pytest.mark.gpu
@pytest.mark.large_memory
@pytest.mark.parametrize("op", list(OPS))
def test_second_sequence_past_2_31(op, large_gpu, poisoned_cuda):
    """cu_seqlens = [0, L1, L1 + L2] in bf16 with random initial states: the second sequence's output and final state
    equal those of the sequence run alone (B = 1); the whole output and the first final state are finite."""
    fn, extras = OPS[op]
    second, h0, o, ht, finite, error = _run_packed(fn, extras)
    torch.cuda.empty_cache()
    assert error is None, f"{op} on the packed batch: {error}"
    assert finite, "non-finite values in the output or the first sequence's final state"
    o_ref, ht_ref = fn(**second, initial_state=h0, output_final_state=True, backend="tilelang")
    for name, actual, expected in (("o", o, o_ref), ("ht", ht, ht_ref)):
        passed, detail = compare(actual, expected, torch.bfloat16)
        assert passed, f"{op}, second sequence {name}: {detail}"
