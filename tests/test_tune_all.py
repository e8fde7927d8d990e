"""`python -m fla_tl tune --all` on a CPU, with the GPU parts faked (device info, runner, tuner): the shape set and
its buckets, the planned keys, resuming from a table, the estimate and progress bar, and failed keys."""

import contextlib

import pytest
import torch

import fla_tl.ops  # noqa: F401 - registers the ops
from fla_tl import cli
from fla_tl.autotune import commands, resolve, tuner
from fla_tl.autotune import table as tt
from fla_tl.autotune.configs import KERNELS
from fla_tl.cli import main
from fla_tl.registry import registered_ops

GPU = "NVIDIA H100 80GB HBM3"
# fla's benchmark shapes (B, T, H, D), and the sequence length the default tuning shape uses
FLA_SHAPES = ((1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128), (8, 1024, 8, 64),
              (8, 2048, 32, 256))
EXTRA_T = 4096


@pytest.fixture
def gpu(monkeypatch):
    """a machine that looks like an H100 to `tune`; the tuner stays fake (see `fake_tuner`)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tt, "device_info", lambda device=None: (GPU, "9.0"))
    monkeypatch.setattr(resolve, "device_info", lambda device=None: (GPU, "9.0"))


def fake_tuner(monkeypatch, fail=lambda runner: False, after=lambda runner: None):
    """record the (kernel, K, V, gate, T) each tuning call gets; raise for those `fail` picks."""
    tuned = []

    def tune_kernel(name, runner, **kw):
        if fail(runner):
            raise RuntimeError(f"{name} does not launch\nsecond line")
        tuned.append(runner)
        after(runner)
        return {"config": {"BV": 64}, "time_ms": 1.0, "default_ms": 2.0, "candidates": []}

    monkeypatch.setattr(tuner, "make_runner", lambda name, **kw: (name, kw["K"], kw["V"], kw["gate"], kw["T"]))
    monkeypatch.setattr(tuner, "tune_kernel", tune_kernel)
    return tuned


def _bucketed(keys):
    return {(k.name, k.K, k.V, k.gate, tt.seqlen_bucket(k.shape[1])) for k in keys}


def test_tune_shapes_cover_fla_benchmark_buckets():
    """every bucket of fla's benchmark shapes and of T = 4096 is tuned at every head dim, one shape per bucket."""
    wanted = {tt.seqlen_bucket(T) for _, T, _, _ in FLA_SHAPES} | {tt.seqlen_bucket(EXTRA_T)}
    shapes = commands.all_shapes()
    for D in (64, 128, 256):
        assert {tt.seqlen_bucket(T) for _, T, _, d in shapes if d == D} >= wanted, D
    assert sorted(commands.TUNE_DIMS) == [64, 128, 256]
    assert len(commands.TUNE_SHAPES) == len(wanted)
    assert len(shapes) == len(set(shapes)) == len(commands.TUNE_SHAPES) * len(commands.TUNE_DIMS)


def test_tune_all_plans_every_tunable_kernel(gpu):
    """the planned keys are each op's tunable kernels at every head dim, gate option and bucket, each once."""
    ops = [spec.name for spec in registered_ops()]
    keys, untuned = commands.plan_keys(ops, commands.all_shapes(), None, torch.device("cuda"))
    buckets = {tt.seqlen_bucket(T) for _, T, _ in commands.TUNE_SHAPES}
    expected = {(name, K, V, gate, b) for op in ops for D in commands.TUNE_DIMS
                for name, K, V, gate in tuner.op_kernels(op, D) or () for b in buckets}
    assert len(keys) == len({k.key for k in keys}) == len(expected)
    assert _bucketed(keys) == expected
    assert {gate for *_, gate, _ in expected} >= {"gamma", "g"}
    assert all(tuner.op_kernels(op, D) in (None, []) for op in untuned for D in commands.TUNE_DIMS)
    # --gates restricts the gate options
    gamma, _ = commands.plan_keys(ops, commands.all_shapes(), ("gamma",), torch.device("cuda"))
    assert _bucketed(gamma) == {k for k in expected if k[3] == "gamma"}


def test_cli_tune_all_tunes_each_key_once(gpu, tmp_path, monkeypatch, capsys):
    tuned = fake_tuner(monkeypatch)
    out = tmp_path / "table.json"
    assert main(["tune", "--all", "--ops", "fused_recurrent_simple_gla", "--out", str(out)]) == 0
    expected = {(name, D, D, gate, T) for D in commands.TUNE_DIMS for _, T, _ in commands.TUNE_SHAPES
                for name in ("fused_recurrent_fwd", "fused_recurrent_bwd") for gate in ("gamma", "g")}
    # the per-token gate's reductions per head dim, its scans (no head dims: one key a bucket) once
    expected |= {(name, D, D, "none", T) for D in commands.TUNE_DIMS for _, T, _ in commands.TUNE_SHAPES
                 for name in ("gate_dot", "chunk_state_dot")}
    scans = {(name, T) for _, T, _ in commands.TUNE_SHAPES
             for name in ("gate_cumsum", "gate_grad_scan", "gate_grad_chunk_scan")}
    assert {t for t in tuned if (t[0], t[4]) not in scans} == expected
    assert {(t[0], t[4]) for t in tuned if (t[0], t[4]) in scans} == scans
    assert len(tuned) == len(expected) + len(scans)
    expected = tuned
    table = tt.TuningTable.load(out)
    assert len(table) == len(expected)
    entry = next(iter(table.entries.values()))
    assert set(entry["shape"]) == {"B", "T", "H", "D"}
    assert f"{len(expected)} tuned, 0 skipped (already in the table), 0 failed" in capsys.readouterr().out


def test_cli_tune_rejects_shapes_with_all_and_unknown_gates(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--all", "--shapes", "1x64x1x64"])
    assert "not with --all" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--gates", "gamma,decay"])
    assert "--gates" in capsys.readouterr().err


def test_tune_resumes_skipping_fresh_keys_and_retuning_stale_ones(gpu, tmp_path, monkeypatch, capsys):
    """a table holding some fresh keys and one stale key (another source hash): the fresh ones are skipped, the
    stale one is tuned again under the current key, the rest are tuned."""
    ops = ["fused_chunk_retention"]
    keys, _ = commands.plan_keys(ops, commands.all_shapes(), None, torch.device("cuda"))
    fresh, stale = keys[:7], keys[7]
    out = tmp_path / "table.json"
    table = tt.TuningTable.load(out)
    for k in fresh:
        table.put(k.key, {"config": {"BV": 32}})
    fields = tt.parse_key(stale.key)
    table.put(stale.key.replace(f"source={fields['source']}", "source=0123456789abcdef"), {"config": {"BV": 32}})
    table.save()
    tuned = fake_tuner(monkeypatch)
    assert main(["tune", "--all", "--ops", ",".join(ops), "--out", str(out)]) == 0
    done = {(k.name, k.K, k.V, k.gate, k.shape[1]) for k in keys}
    assert set(tuned) == done - {(k.name, k.K, k.V, k.gate, k.shape[1]) for k in fresh}
    assert (stale.name, stale.K, stale.V, stale.gate, stale.shape[1]) in tuned
    table = tt.TuningTable.load(out)
    assert all(table.get(k.key)["config"] == {"BV": 32} for k in fresh)
    assert table.get(stale.key)["config"] == {"BV": 64}
    text = capsys.readouterr().out
    assert f"{len(keys)} keys, {len(fresh)} already in {out} (skipped), {len(keys) - len(fresh)} to tune" in text
    assert f"{len(keys) - len(fresh)} tuned, {len(fresh)} skipped (already in the table), 0 failed" in text


def test_tune_cut_off_keeps_finished_keys_and_continues(gpu, tmp_path, monkeypatch):
    """a run stopped after 4 keys (here an interrupt) keeps them; the next run tunes only the others."""
    out = str(tmp_path / "table.json")
    args = ["tune", "--all", "--ops", "fused_chunk_retention", "--out", out]

    def stop(runner):
        if len(tuned) == 5:
            raise KeyboardInterrupt

    tuned = fake_tuner(monkeypatch, after=stop)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    # the fifth key was cut off
    first = tuned[:4]
    assert len(tt.TuningTable.load(out)) == 4
    tuned = fake_tuner(monkeypatch)
    assert main(args) == 0
    keys, _ = commands.plan_keys(["fused_chunk_retention"], commands.all_shapes(), None, torch.device("cuda"))
    assert not set(first) & set(tuned) and len(first) + len(tuned) == len(keys)
    assert len(tt.TuningTable.load(out)) == len(keys)


def test_tune_reports_a_failed_key_and_goes_on(gpu, tmp_path, monkeypatch, capsys):
    tuned = fake_tuner(monkeypatch, fail=lambda runner: runner[0] == "fused_chunk_bwd_dkv" and runner[1] == 64)
    out = tmp_path / "table.json"
    assert main(["tune", "--all", "--ops", "fused_chunk_retention", "--out", str(out)]) == 1
    n = len(commands.TUNE_SHAPES)
    lines = capsys.readouterr().out.splitlines()
    failures = [line for line in lines if line.startswith("FAIL ")]
    assert len(failures) == n
    assert failures[0].startswith("FAIL fused_chunk_bwd_dkv K=64 V=64 gamma T<=1024 at 8x1024x8x64: RuntimeError: "
                                  "fused_chunk_bwd_dkv does not launch")
    assert len(tuned) == len(tt.TuningTable.load(out)) == 2 * n * len(commands.TUNE_DIMS) - n
    assert f"{len(tuned)} tuned, 0 skipped (already in the table), {n} failed" in lines[-1]
    # the next run tries only the failed keys again
    tuned = fake_tuner(monkeypatch)
    assert main(["tune", "--all", "--ops", "fused_chunk_retention", "--out", str(out)]) == 0
    assert {(r[0], r[1]) for r in tuned} == {("fused_chunk_bwd_dkv", 64)} and len(tuned) == n


class FakeBar:
    def __init__(self, total):
        self.total, self.n, self.descriptions = total, 0, []

    def update(self, n=1):
        self.n += n

    def set_description_str(self, text, refresh=True):
        self.descriptions.append((self.n, text))


def test_tune_prints_an_estimate_and_shows_progress(gpu, tmp_path, monkeypatch, capsys):
    """the estimate counts the keys to tune and their fitting candidates at the documented cost per candidate; the
    bar starts at the skipped keys, names each kernel, and from the fourth key on estimates from the measured
    seconds per candidate."""
    clock = [0.0]
    bars = []

    @contextlib.contextmanager
    def progress(total):
        bars.append(FakeBar(total))
        yield bars[-1]

    monkeypatch.setattr(cli, "progress", progress)
    monkeypatch.setattr(commands.time, "perf_counter", lambda: clock[0])
    keys, _ = commands.plan_keys(["fused_chunk_retention"], commands.all_shapes(), None, torch.device("cuda"))
    out = tmp_path / "table.json"
    table = tt.TuningTable.load(out)
    table.put(keys[0].key, {"config": {"BV": 32}})
    table.save()
    todo = keys[1:]
    cost = [len(KERNELS[k.name].candidates(k.K, k.V, "bfloat16")) for k in todo]
    # each key takes 0.5 s per candidate
    fake_tuner(monkeypatch, after=lambda runner: clock.__setitem__(0, clock[0] + 0.5 * cost[len(bar_keys(bars))]))
    assert main(["tune", "--all", "--ops", "fused_chunk_retention", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    estimate = commands._duration(sum(cost) * commands.SECONDS_PER_CANDIDATE)
    assert (f"{len(keys)} keys, 1 already in {out} (skipped), {len(todo)} to tune: {sum(cost)} candidate configs, "
            f"about {estimate} at {commands.SECONDS_PER_CANDIDATE:g} s per candidate") in text
    bar = bars[0]
    assert bar.total == len(keys) and bar.n == len(keys)
    assert [n for n, _ in bar.descriptions] == list(range(1, len(keys)))
    assert all(text.startswith(k.label) for k, (_, text) in zip(todo, bar.descriptions))
    assert f"(~{estimate} left)" in bar.descriptions[0][1]
    i = commands.MEASURED_AFTER
    assert f"(~{commands._duration(0.5 * sum(cost[i:]))} left)" in bar.descriptions[i][1]


def bar_keys(bars):
    """the keys the bar has shown so far, less the one running."""
    return bars[0].descriptions[:-1]


@pytest.mark.gpu
@pytest.mark.parametrize("name, gate", [("chunk_fwd_h", "gk"), ("chunk_bwd_dh", "gk"), ("fused_recurrent_fwd", "gk"),
                                        ("fused_recurrent_bwd", "gk"), ("chunk_fwd_o", "none")])
def test_runner_launches_every_gate_option(name, gate):
    """the tuner's runner for the gate options `tune --all` adds (per-key gate, no gate): finite outputs, and the last
    candidate of the search space agrees with the default."""
    import dataclasses

    from fla_tl.testing import compare

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    runner = tuner.make_runner(name, N=2, T=300, H=4, K=64, V=64, dtype=torch.bfloat16, device="cuda", gate=gate)
    candidates = KERNELS[name].candidates(64, 64, "bfloat16")
    default = tuner._outputs(runner(dataclasses.asdict(candidates[0])))
    other = tuner._outputs(runner(dataclasses.asdict(candidates[-1])))
    assert default and all(torch.isfinite(x.float()).all() for x in default)
    for a, b in zip(other, default):
        ok, detail = compare(a, b, torch.bfloat16)
        assert ok, detail


def _kernel_pairs():
    """(kernel, gate option) of every tunable kernel as the registered ops launch it at D = 64."""
    pairs = {(name, gate) for op in registered_ops()
             for name, _, _, gate in (tuner.op_kernels(op.name, 64) or [])}
    return sorted(pairs, key=lambda p: (p[0], str(p[1])))


def test_every_tunable_kernel_is_launched_by_an_op():
    assert {name for name, _ in _kernel_pairs()} == set(KERNELS)


@pytest.mark.parametrize("name, gate", _kernel_pairs())
def test_runner_hands_each_config_to_its_kernel(name, gate, monkeypatch):
    """the tuner's runner, on the CPU with the kernels faked: every candidate reaches the kernel's factory as keywords
    it takes, with the candidate's values (a runner that drops or misnames the config would time one kernel many
    times, or fail on the GPU)."""
    import dataclasses
    import importlib
    import inspect
    import sys

    from fla_tl.kernels.rwkv6 import bonus

    module_name, factory_name = KERNELS[name].factory.split(":")
    importlib.import_module(module_name)
    calls = []

    def fake_get_kernel(factory, target, **kwargs):
        inspect.signature(factory).bind(**kwargs)
        calls.append((factory.__name__, kwargs))
        return lambda *args, **kw: None

    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("fla_tl.kernels") and hasattr(mod, "get_kernel"):
            monkeypatch.setattr(mod, "get_kernel", fake_get_kernel)
    monkeypatch.setattr(bonus, "_use_kernels", lambda x: True)  # RWKV6's bonus takes its kernels on CUDA only
    runner = tuner.make_runner(name, N=2, T=130, H=2, K=64, V=64, dtype=torch.bfloat16, device="cpu", gate=gate)
    for config in KERNELS[name].candidates(64, 64, "bfloat16", gate):
        calls.clear()
        runner(dataclasses.asdict(config))
        got = [kw for factory, kw in calls if factory == factory_name]
        assert got, f"{name}: the runner did not launch {factory_name}"
        assert all(kw[f] == v for f, v in dataclasses.asdict(config).items() for kw in got), (config, got)
