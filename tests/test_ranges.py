"""Chunk ranges (`fla_tl.kernels.common.ranges`): the range layout of dense and varlen batches, the automatic range
length, and (gpu) the fp32 combine of range summaries against a PyTorch loop."""

import pytest
import torch
from test_retention import _cu

from fla_tl.kernels.common.ranges import _build, longest, range_length, range_meta
from fla_tl.kernels.common.utils import seq_meta


@pytest.mark.parametrize("lens", [(1, 130, 0, 700, 64), (1000,), (64, 64, 65)])
@pytest.mark.parametrize("L", [1, 3, 16])
def test_range_layout(lens, L):
    """ranges are chunk-aligned pieces of L chunks (the last of a sequence keeps the rest, an empty sequence keeps one
    empty range) that keep the sequence's chunk numbering: every chunk of the batch appears once, at its own chunk
    index and its own tokens."""
    meta = seq_meta(1, sum(lens), _cu(lens, "cpu"), 64, torch.device("cpu"))
    ranges = range_meta(meta, L, 64)
    rm = ranges.meta
    cu, off, first = rm.cu.tolist(), rm.chunk_offsets.tolist(), ranges.first.tolist()
    assert rm.NT == meta.NT and rm.N == first[-1] == len(cu) - 1
    assert torch.equal(rm.chunk_rows(64), meta.chunk_rows(64))
    seq_cu, seq_off = meta.cu.tolist(), meta.chunk_offsets.tolist()
    for n, length in enumerate(lens):
        rs = range(first[n], first[n + 1])
        nc = -(-length // 64)
        assert len(rs) == max(1, -(-nc // L))
        assert cu[rs[0]] == seq_cu[n] and cu[rs[-1] + 1] == seq_cu[n + 1]
        for j, r in enumerate(rs):
            assert off[r] == seq_off[n] + min(j * L, nc)
            assert cu[r] == min(seq_cu[n] + j * L * 64, seq_cu[n + 1])
            assert off[r + 1] - off[r] == -(-(cu[r + 1] - cu[r]) // 64) <= L
    assert ranges.last.tolist() == [f - 1 for f in first[1:]]


def test_dense_ranges_match_varlen():
    """a dense batch's ranges (cached, no host sync) equal those of the same batch given as cu_seqlens."""
    dense = range_meta(seq_meta(3, 500, None, 64, torch.device("cpu")), 3, 64, dense=(3, 500))
    varlen = range_meta(seq_meta(1, 1500, _cu((500,) * 3, "cpu"), 64, torch.device("cpu")), 3, 64)
    for a, b in ((dense.meta.cu, varlen.meta.cu), (dense.meta.chunk_offsets, varlen.meta.chunk_offsets),
                 (dense.meta.chunk_indices, varlen.meta.chunk_indices), (dense.first, varlen.first)):
        assert torch.equal(a, b)
    assert longest(dense.meta, 64, (3, 500)) == 8 == longest(seq_meta(1, 1500, _cu((500,) * 3, "cpu"), 64,
                                                                      torch.device("cpu")), 64)


def test_range_length():
    """no ranges while the grid covers three quarters of the GPU or the sequences are short; otherwise about two
    blocks per multiprocessor, never below 16 chunks per range."""
    assert range_length(64, 256, 132) is None  # 8 x 16 heads x 2 V tiles: full
    assert range_length(32, 128, 132) is None  # 4 x 16 heads x 2 V tiles
    assert range_length(20, 8, 132) is None  # too short to split
    L = range_length(256, 64, 132)  # 2 x 16 heads x 2 V tiles, 16384 tokens
    assert 16 <= L < 256 and 64 * -(-256 // L) >= 132
    assert range_length(512, 64, 132) == range_length(512, 64, 132)
    assert range_length(40, 8, 132) == 20


def test_build_empty():
    assert _build([], [], [], 64, 4, "cpu").meta.NT == 0


@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(("K", "V"), [(64, 48), (128, 128), (100, 72)])
def test_combine_states(K, V, reverse):
    """the combine kernel against the same chain in PyTorch (fp64), with and without the sequences' states."""
    from fla_tl.kernels.common.ranges import combine_states

    torch.manual_seed(0)
    lens = (1, 700, 0, 300)
    meta = seq_meta(1, sum(lens), _cu(lens, "cuda"), 64, torch.device("cuda"))
    ranges = range_meta(meta, 2, 64)
    R, H, N = ranges.meta.N, 3, len(lens)
    ms = torch.randn(R, H, K, V + K, device="cuda")
    ms[..., V:] /= K ** 0.5
    loc = torch.randn(R, H, K, V, device="cuda") if reverse else None
    for s0 in (None, torch.randn(N, H, K, V, device="cuda")):
        out = combine_states(ms, s0, ranges, loc=loc, reverse=reverse)
        first = ranges.first.tolist()
        want = torch.full_like(out, float("nan"), dtype=torch.float64)
        for n in range(N):
            s = s0[n].double() if s0 is not None else torch.zeros(H, K, V, dtype=torch.float64, device="cuda")
            rs = list(range(first[n], first[n + 1]))
            for j, r in enumerate(reversed(rs) if reverse else rs):
                want[r] = s
                M = ms[r, :, :, V:].double()
                lr = (loc[r] if reverse else ms[r, :, :, :V]).double()
                s = (M.transpose(-1, -2) if reverse else M) @ s + lr
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)


def test_varlen_metadata_is_read_back_once_per_batch():
    """the metadata of a packed batch is built once per `cu_seqlens` tensor (the later layers' ops reuse it without a
    host sync) and again after an in-place change; the host copy of the bounds is shared with the value checks."""
    from fla_tl.utils import check_cu_seqlens_values, host_bounds

    cu = _cu((1, 130, 0, 700), "cpu")
    check_cu_seqlens_values(cu, 831)
    assert host_bounds(cu) is host_bounds(cu)
    meta = seq_meta(1, 831, cu, 64, torch.device("cpu"))
    assert seq_meta(1, 831, cu, 64, torch.device("cpu")) is meta
    assert range_meta(meta, 3, 64) is range_meta(meta, 3, 64)
    assert meta.host == ([0, 1, 131, 131, 831], [0, 1, 4, 4, 15]) and meta.NT == 15
    cu[-1] = 830
    meta2 = seq_meta(1, 830, cu, 64, torch.device("cpu"))
    assert meta2 is not meta and meta2.host[0][-1] == 830
    assert seq_meta(1, 831, _cu((1, 130, 0, 700), "cpu"), 64, torch.device("cpu")) is not meta


def test_ranges_are_opt_in(monkeypatch):
    """no ranges unless `FLA_TL_RANGE_CHUNKS` asks: a number L forces ranges of L chunks (also on the CPU, for the
    launchers' tests), `auto` applies `range_length` on a CUDA device only, 0 or unset never."""
    from fla_tl.kernels.common.ranges import pick_ranges

    meta = seq_meta(2, 1000, None, 64, torch.device("cpu"))
    like = torch.empty(0)
    for asked in (None, "0", "auto"):
        if asked is None:
            monkeypatch.delenv("FLA_TL_RANGE_CHUNKS", raising=False)
        else:
            monkeypatch.setenv("FLA_TL_RANGE_CHUNKS", asked)
        assert pick_ranges(meta, 4, like, 64, (2, 1000)) is None
    monkeypatch.setenv("FLA_TL_RANGE_CHUNKS", "5")
    ranges = pick_ranges(meta, 4, like, 64, (2, 1000))
    assert ranges.L == 5 and ranges.first.tolist() == [0, 4, 8]
    monkeypatch.setenv("FLA_TL_RANGE_CHUNKS", "16")
    assert pick_ranges(meta, 4, like, 64, (2, 1000)) is None  # 16 chunks: one range is the whole sequence


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["chunk_retention", "chunk_simple_gla", "chunk_gla", "chunk_rwkv6"])
@pytest.mark.parametrize("lens", [(1, 130, 0, 700, 64), (1000,)], ids=["varlen", "T1000"])
def test_chunk_ops_over_ranges(op, lens, monkeypatch):
    """the gated chunk ops with their state passes over ranges of 3 chunks equal the single pass (the same kernels
    otherwise): the output, the final state and every gradient, with an initial state, fp32 inputs."""
    import torch.nn.functional as F

    import fla_tl.ops as ops

    torch.manual_seed(0)
    varlen = len(lens) > 1
    B, T, H, K, V = (1, sum(lens), 2, 64, 128) if varlen else (2, lens[0], 2, 64, 128)
    N = len(lens) if varlen else B
    dev = "cuda"
    x = dict(q=torch.randn(B, T, H, K, device=dev), k=torch.randn(B, T, H, K, device=dev),
             v=torch.randn(B, T, H, V, device=dev), h0=torch.randn(N, H, K, V, device=dev))
    if op == "chunk_simple_gla":
        x["g"] = F.logsigmoid(torch.randn(B, T, H, device=dev) + 3)
    if op in ("chunk_gla", "chunk_rwkv6"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, K, device=dev) + 3)
    if op == "chunk_rwkv6":
        x["u"] = torch.randn(H, K, device=dev)
    x = {n: t.requires_grad_() for n, t in x.items()}
    do, dht = torch.randn_like(x["v"]), torch.randn_like(x["h0"])

    def run():
        args = [x["q"], x["k"], x["v"]] + ([x["g"]] if "g" in x else []) + ([x["u"]] if "u" in x else [])
        o, ht = getattr(ops, op)(*args, initial_state=x["h0"], output_final_state=True, backend="tilelang",
                                 cu_seqlens=_cu(lens, dev) if varlen else None)
        grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), list(x.values()))
        return [o, ht, *grads]

    monkeypatch.setenv("FLA_TL_RANGE_CHUNKS", "0")
    want = run()
    monkeypatch.setenv("FLA_TL_RANGE_CHUNKS", "3")
    got = run()
    for name, a, b in zip(["o", "ht", *x], got, want):
        err = ((a - b).double().norm() / b.double().norm().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{op} {name}: relative error {err:.2e} over ranges"
