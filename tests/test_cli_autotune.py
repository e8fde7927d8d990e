"""The CLI's compile / cache commands and the tile configs as data (shared-memory arithmetic, search spaces)."""

import dataclasses

import pytest

import fla_tl.kernels.retention  # noqa: F401 - registers the ops these tests read
import fla_tl.kernels.simple_gla  # noqa: F401
import fla_tl.ops  # noqa: F401
from fla_tl.registry import KernelSpec, get_op, registered_ops


def test_cli_compile_rejects_unknown_op():
    from fla_tl.__main__ import main

    with pytest.raises(SystemExit):
        main(["compile", "--ops", "no_such_op"])


def test_cli_cache_show_and_clear(tmp_path, monkeypatch, capsys):
    from fla_tl.__main__ import main
    from fla_tl.autotune import ENV_CACHE, clear_memory

    monkeypatch.setenv(ENV_CACHE, str(tmp_path))
    clear_memory()
    assert main(["cache", "show"]) == 0
    assert str(tmp_path) in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 0 file(s)" in capsys.readouterr().out


def _kernels(op, D, dtype):
    """op's kernel list, or a skip while its variant is not ported to the registry yet (no `kernels`)."""
    try:
        spec = get_op(op)
    except KeyError:
        pytest.skip(f"{op} is not registered yet")
    if spec.kernels is None:
        pytest.skip(f"{op} has no kernel list yet")
    return spec.kernels(D, dtype)


def test_based_kernel_lists():
    """Based's own kernels at the launchers' tiles; fp32 inputs take the attention form, as the op does."""
    import fla_tl.kernels.based  # noqa: F401 - registers Based's ops
    from fla_tl.autotune.resolve import heuristic_config
    from fla_tl.kernels.based import fused_chunk, parallel

    specs = _kernels("fused_chunk_based", 128, "bfloat16")
    assert list(dict.fromkeys(s.factory for s in specs)) == [fused_chunk.based_fwd_fused_chunk_kernel,
                                                             fused_chunk.based_bwd_dq_fused_chunk_kernel,
                                                             fused_chunk.based_bwd_dkv_fused_chunk_kernel]
    config = heuristic_config("based_bwd_dkv_fused_chunk", 16, 128, "bfloat16")
    assert specs[-1].kwargs == dict(K=16, V=128, dtype="bfloat16", **config)
    # the forward and dq walks at both V tiles their grid can pick
    assert [s.kwargs["BV"] for s in specs] == [128, 64, 128, 64, 64]
    # a grid that leaves multiprocessors idle takes narrower V tiles (2 sequences x 16 heads on 132)
    assert heuristic_config("based_fwd_fused_chunk", 16, 128, "bfloat16", grid=(32, 132)) == {"BV": 64}
    assert heuristic_config("based_fwd_fused_chunk", 16, 128, "bfloat16", grid=(128, 132)) == {"BV": 128}
    fp32 = _kernels("fused_chunk_based", 64, "float32")
    assert {s.factory for s in fp32} == {parallel.parallel_based_fwd_kernel, parallel.parallel_based_bwd_dq_kernel,
                                         parallel.parallel_based_bwd_dkv_kernel}
    rebased = _kernels("parallel_rebased", 64, "bfloat16")
    assert all(s.kwargs["based"] is False and s.kwargs["K"] == 64 for s in rebased)
    assert _kernels("parallel_based", 256, "bfloat16") == []  # K <= 128


def test_constant_decay_family_lists_the_retention_style_kernels():
    """parallel_simple_gla launches the chunk kernels; the retention ops' tunable kernels are the chunk, fused chunk
    and token-by-token stages of their modes."""
    from fla_tl.autotune.tuner import op_kernels

    assert [s.name for s in _kernels("parallel_simple_gla", 64, "bfloat16")][:2] == ["chunk_fwd_h", "chunk_fwd_o"]
    chunk = {"chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dv", "chunk_bwd_dqk"}
    fused = [("fused_chunk_fwd", 128, 128, "gamma"), ("fused_chunk_bwd_dkv", 128, 128, "gamma")]
    assert {s[0] for s in op_kernels("chunk_retention", 128)} == chunk | {"fused_chunk_fwd", "fused_chunk_bwd_dkv",
                                                                          "combine_states"}
    assert op_kernels("fused_chunk_retention", 128) == fused
    assert op_kernels("fused_recurrent_retention", 128) == [("fused_recurrent_fwd", 128, 128, "gamma"),
                                                            ("fused_recurrent_bwd", 128, 128, "gamma")]
    # simple GLA launches them with its per-token gate too (whose backward runs the chunk schedule: the ranges'
    # combine), and that gate's scans (no head dims) and reductions
    assert set(op_kernels("fused_chunk_simple_gla", 64)) == {
        (n, 64, 64, g) for g in ("gamma", "g") for n in ("fused_chunk_fwd", "fused_chunk_bwd_dkv")} | {
        ("combine_states", 64, 64, "none"), ("gate_cumsum", 0, 0, "none"), ("gate_grad_chunk_scan", 0, 0, "none"),
        ("gate_grad_scan", 0, 0, "none"), ("gate_dot", 64, 64, "none"), ("chunk_state_dot", 64, 64, "none")}


def test_compile_names_ops_without_a_kernel_list(monkeypatch, capsys):
    """an op without a list compiles nothing (no unrelated kernels) and is named."""
    from fla_tl.autotune.commands import compile_ahead

    monkeypatch.setattr(get_op("chunk_retention"), "kernels", None)
    assert compile_ahead("sm_90a", ["chunk_retention"], [128], ["bfloat16"], workers=1) == 0
    out = capsys.readouterr().out
    assert "no ahead-of-time kernel list for chunk_retention" in out and "compiling 0 kernels" in out


@pytest.mark.parametrize("space", [False, True], ids=["launch-configs", "space"])
def test_compile_builds_each_ops_kernel_list(space, monkeypatch, capsys):
    """`compile` builds exactly the op's kernel list (every flag combination), plus the tuning tables' configs of its
    tunable kernels, plus with --space every fitting config of their search spaces (other keywords kept)."""
    from fla_tl.autotune import build as build_module
    from fla_tl.autotune.commands import compile_ahead
    from fla_tl.autotune.configs import KERNELS

    built = []
    monkeypatch.setattr(build_module, "build", lambda specs, target, workers: built.extend(specs) or [])
    assert compile_ahead("sm_90a", ["fused_recurrent_retention"], [64], ["bfloat16"], workers=1, space=space) == 0
    listed = get_op("fused_recurrent_retention").kernels(64, "bfloat16")
    assert all(isinstance(s, KernelSpec) for s in built)
    keys = {(s.factory, tuple(sorted(s.kwargs.items()))) for s in built}
    assert len(keys) == len(built), "a kernel is built twice"
    assert {(s.factory, tuple(sorted(s.kwargs.items()))) for s in listed} <= keys
    flags = {(s.kwargs["reverse"], s.kwargs["state_v_first"]) for s in built}
    assert flags == {(False, False), (False, True), (True, False), (True, True)}
    if not space:
        assert len(built) == len(listed)
    else:
        n = sum(len(KERNELS[s.name].candidates(64, 64, "bfloat16")) for s in listed)
        assert len(built) == n > len(listed)


@pytest.mark.compile
def test_cli_compile_small_op_set(capsys):
    from fla_tl.__main__ import main

    assert main(["compile", "--ops", "fused_chunk_retention", "--dims", "64", "--dtypes", "bfloat16"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_tune_times_each_ops_tunable_kernels(tmp_path, monkeypatch, capsys):
    """`tune` (with a fake runner and tuner: the timing needs a GPU) tunes the tunable kernels of the op's list at the
    gate options it launches them with that `--gates` asks for, once each, and stores them under their table keys."""
    import torch

    import fla_tl.kernels.gla  # noqa: F401 - registers GLA's ops
    from fla_tl.autotune import commands, resolve, tuner
    from fla_tl.autotune import table as tt

    tuned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tt, "device_info", lambda device=None: ("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(resolve, "device_info", lambda device=None: ("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(tuner, "make_runner", lambda name, **kw: (name, kw["K"], kw["V"], kw["gate"]))
    monkeypatch.setattr(tuner, "tune_kernel", lambda name, runner, **kw: tuned.append(runner) or {
        "config": {}, "time_ms": 1.0, "default_ms": 2.0, "candidates": []})
    out = tmp_path / "table.json"
    ops = ["fused_chunk_simple_gla", "fused_chunk_retention", "chunk_gla"]
    assert commands.tune(ops, [(2, 1024, 4, 64)], str(out), ("gamma",)) == 0
    assert tuned == [("fused_chunk_fwd", 64, 64, "gamma"), ("fused_chunk_bwd_dkv", 64, 64, "gamma")]
    keys = tt.TuningTable.load(out).keys()
    assert sorted(tt.parse_key(k)["kernel"] for k in keys) == ["fused_chunk_bwd_dkv", "fused_chunk_fwd"]
    assert {k: v for k, v in tt.parse_key(next(iter(keys))).items() if k in ("dims", "flags", "bucket")} == \
        {"dims": "K=64,V=64", "flags": "gate=gamma", "bucket": "1024"}
    # GLA launches them with its per-key gate only
    assert "no tunable kernels with gate options gamma for chunk_gla" in capsys.readouterr().out


def test_fused_smem_formula_matches_tilelang_lowering():
    from fla_tl.autotune.configs import SMEM_BUDGET, fused_chunk_smem
    from fla_tl.kernels.common import fused_chunk

    # TileLang 0.1.15 lowered this kernel with dyn_shared_memory_buf = 229376 (fits); the dkv kernel at the same
    # sizes asks for 262144, more than sm_90 gives a block
    assert fused_chunk_smem(128, 128, "float32", "fwd", BV=64, num_stages=2) == 229376
    assert fused_chunk_smem(128, 128, "float32", "dkv", BV=64, num_stages=2) == 262144
    # the kernel module re-exports the one definition
    assert fused_chunk.fused_chunk_smem is fused_chunk_smem and fused_chunk.SMEM_BUDGET == SMEM_BUDGET


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("D", [64, 100, 128, 256])
def test_tunable_kernels_spaces(D, dtype):
    from fla_tl.autotune.configs import KERNELS, SMEM_BUDGET

    for name, kern in KERNELS.items():
        if kern.launches is not None and not kern.launches(D, D, dtype):
            continue  # the ops never launch it there (e.g. fp32 delta-rule passes with K > 128)
        candidates = kern.candidates(D, D, dtype)
        default = kern.heuristic(D, D, dtype)
        assert candidates[0] == default, name
        assert kern.fits(D, D, dtype, default), f"{name}: the heuristic default does not fit at D={D} {dtype}"
        assert len(set(candidates)) == len(candidates), name
        for c in candidates:
            assert kern.smem(D, D, dtype, c) <= SMEM_BUDGET, (name, c)
            assert set(dataclasses.asdict(c)) == {f.name for f in dataclasses.fields(kern.config_cls)}


def test_tunable_kernels_filter_what_cannot_launch():
    from fla_tl.autotune.configs import KERNELS, FusedChunkConfig

    fwd = KERNELS["fused_chunk_fwd"]
    assert not fwd.fits(256, 256, "float32", FusedChunkConfig(BV=128, num_stages=3, threads=256))
    assert fwd.fits(64, 64, "bfloat16", FusedChunkConfig(BV=64, num_stages=2, threads=128))
    # a V tile wider than the padded V is never a candidate
    assert all(c.BV <= 64 for c in fwd.candidates(64, 64, "bfloat16"))


def test_tuner_picks_fastest_agreeing_config_and_records_all():
    """the tuner's bookkeeping with a fake runner and timer (the timing itself needs a GPU)."""
    import torch

    from fla_tl.autotune.configs import KERNELS
    from fla_tl.autotune.tuner import tune_kernel

    name = "fused_chunk_fwd"
    candidates = KERNELS[name].candidates(128, 128, "bfloat16")
    assert len(candidates) >= 4
    default, broken, wrong = candidates[0], candidates[1], candidates[2]
    base = torch.randn(64, 32)

    def runner(config):
        if config == dataclasses.asdict(broken):
            raise RuntimeError("does not launch")
        return (base + 1.0 if config == dataclasses.asdict(wrong) else base.clone(),)

    fastest = candidates[-1]

    def timer(fn):
        fn()
        return [1.0] if fn.__defaults__[0] == dataclasses.asdict(fastest) else [2.0, 3.0, 2.5]

    entry = tune_kernel(name, runner, K=128, V=128, dtype=torch.bfloat16, timer=timer, compile_workers=1,
                        progress=False)
    assert entry["config"] == dataclasses.asdict(fastest)
    assert entry["time_ms"] == 1.0 and entry["default_ms"] == 2.5
    statuses = {tuple(sorted(r["config"].items())): r["status"] for r in entry["candidates"]}
    assert len(entry["candidates"]) == len(candidates)
    assert statuses[tuple(sorted(dataclasses.asdict(broken).items()))].startswith("error: RuntimeError")
    assert statuses[tuple(sorted(dataclasses.asdict(wrong).items()))].startswith("rejected")


@pytest.mark.compile
def test_build_compiles_in_processes_into_the_disk_cache(tmp_path, monkeypatch):
    """`build` with 2 workers compiles in spawned processes; their kernels land in TileLang's disk cache (here a fresh
    one, which the children read from the environment)."""
    from fla_tl.autotune.build import build
    from fla_tl.kernels.common.state_op import state_kernels

    monkeypatch.setenv("TILELANG_CACHE_DIR", str(tmp_path / "tlcache"))
    specs = state_kernels(64, "float16", ("fused_chunk",))[:2]
    results = build(specs, {"kind": "cuda", "arch": "sm_90a"}, workers=2)
    assert [ok for _, ok, _, _ in results] == [True, True], results
    assert sum(1 for p in (tmp_path / "tlcache").rglob("*") if p.is_file()) >= 2


@pytest.mark.gpu
def test_tuner_on_gpu_picks_an_agreeing_config_no_slower_than_the_default():
    """tune chunk_fwd_o's small space (V tile x threads) on this GPU: the winner passed the correctness gate and its
    median is at most the default's; its output matches the default config's."""
    import torch

    from fla_tl.autotune.tuner import make_runner, tune_kernel
    from fla_tl.testing import compare

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    runner = make_runner("chunk_fwd_o", N=2, T=1024, H=4, K=128, V=128, dtype=torch.bfloat16, device="cuda")
    entry = tune_kernel("chunk_fwd_o", runner, K=128, V=128, dtype=torch.bfloat16, compile_workers=2, progress=False)
    assert entry["default_ms"] is not None and entry["time_ms"] <= entry["default_ms"]
    winner = [r for r in entry["candidates"] if r["config"] == entry["config"]]
    assert winner and winner[0]["status"] == "ok"
    default = entry["candidates"][0]["config"]
    ok, detail = compare(runner(entry["config"])[0], runner(default)[0], torch.bfloat16)
    assert ok, detail


def test_every_op_has_an_ahead_of_time_kernel_list():
    """`python -m fla_tl compile` covers every registered op: each has a kernel list (empty for the ops fla 0.6.0
    dropped, which launch nothing)."""
    assert [op.name for op in registered_ops() if op.kernels is None] == []
    assert get_op("fused_chunk_gla").kernels(64, "bfloat16") == []


def test_compile_lists_every_ops_kernels_and_spaces(monkeypatch, capsys):
    """`compile --space` over every op at D = 64 and 256 plans without a failure: each tunable kernel's search space
    comes from the keywords its op lists (one head dim, none, or a fixed dtype), companions included."""
    from fla_tl.autotune import build as build_module
    from fla_tl.autotune.commands import compile_ahead

    built = []
    monkeypatch.setattr(build_module, "build", lambda specs, target, workers: built.extend(specs) or [])
    ops = [op.name for op in registered_ops()]
    assert compile_ahead("sm_90a", ops, [64, 256], ["bfloat16", "float32"], workers=1, space=True) == 0
    assert "FAIL" not in capsys.readouterr().out
    names = {s.factory.__name__ for s in built}
    assert {"fused_recurrent_delta_rule_bwd_dqk_kernel", "fused_recurrent_hgrn_fwd_kernel", "chunk_gate_cumsum_kernel",
            "combine_states_kernel", "normalize_bwd_c_kernel", "titans_bwd_chunk_kernel"} <= names
