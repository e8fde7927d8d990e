"""The benchmark's op table, shapes and plan (`benchmarks/bench.py`, `specs.py`, `plan.py`, `table.py`) on the CPU:
every op's fla_tl call runs on its inputs at a tiny shape (dense, grouped value heads, packed sequences), the shape
syntax and named sets, the packed offsets, resume, the time budget, the autotune export, the dry-run listing and the
markdown tables. No GPU needed."""

import csv
import importlib
import importlib.util
import itertools
import pathlib
import sys
import tarfile

import pytest
import torch

_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, file: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _DIR / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _bench():
    # bench.py puts benchmarks/ on the path, so its `specs` and `plan` modules import after it
    return _load("fla_tl_bench", "bench.py")


def _specs():
    _bench()
    return importlib.import_module("specs")


def _plan():
    _bench()
    return importlib.import_module("plan")


def _table():
    return _load("fla_tl_bench_table", "table.py")


def _fla_tl_fn(op):
    module, attr = op.fla_tl.split(":")
    fn = getattr(importlib.import_module(module), attr, None)
    if fn is None:
        pytest.skip(f"{op.fla_tl} is not in fla_tl")
    return fn


def _run_on_cpu(name, shape):
    specs = _specs()
    op = specs.OPS[name]
    fn = _fla_tl_fn(op)
    torch.manual_seed(0)
    inputs = specs.op_inputs(op, shape, torch.float32, "cpu")
    out = fn(**inputs, **specs.op_consts(op, shape, "cpu"))
    o = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(o).all()
    return o, inputs


@pytest.mark.parametrize("name", sorted(_bench().OPS))
def test_bench_op_runs_on_cpu(name):
    op = _specs().OPS[name]
    shape = _specs().Shape(1, 32, 2, 16)
    o, inputs = _run_on_cpu(name, shape)
    assert o.shape[:2] == (1, 32) and o.shape[-1] == inputs.get("v", inputs.get("x")).shape[-1]
    assert op.flops(1, 32, 2, 16, 16) > 0


@pytest.mark.parametrize("name", [n for n, op in sorted(_bench().OPS.items()) if op.gva])
def test_bench_op_grouped_value_heads_on_cpu(name):
    """fla_tl takes v, beta and g with more heads (HV) than q and k: o is [B, T, HV, V]."""
    o, inputs = _run_on_cpu(name, _specs().Shape(1, 32, 2, 16, HV=4))
    assert inputs["q"].shape[2] == 2 and inputs["v"].shape[2] == 4
    assert o.shape == (1, 32, 4, 16)


def _packed_ops():
    specs = _specs()
    return [n for n, op in sorted(specs.OPS.items())
            if specs.takes_argument(getattr(importlib.import_module("fla_tl.ops"), op.registered_name, None) or
                                    (lambda: None), "cu_seqlens")]


@pytest.mark.parametrize("name", _packed_ops())
def test_bench_op_packed_on_cpu(name):
    """at a packed shape the call gets `cu_seqlens` (int64) of random lengths and B = 1."""
    shape = _specs().Shape(1, 100, 2, 16, seqs=3)
    consts = _specs().op_consts(_specs().OPS[name], shape, "cpu")
    assert consts["cu_seqlens"].dtype == torch.int64 and consts["cu_seqlens"].tolist()[-1] == 100
    o, _ = _run_on_cpu(name, shape)
    assert o.shape[:2] == (1, 100)


def test_every_bench_op_has_one_results_file():
    """results are filed as benchmarks/results/<gpu>-<op set>.csv: every op belongs to exactly one op set."""
    specs = _specs()
    members = [op for ops in specs.OP_SETS.values() for op in ops]
    assert sorted(members) == sorted(specs.OPS), "OP_SETS must list every op of OPS once"
    assert len(set(members)) == len(members)
    assert _bench().default_out("NVIDIA H100 80GB HBM3", ["chunk_retention"]).name == "h100-retention.csv"
    assert _bench().default_out("NVIDIA H200", ["chunk_gla", "chunk_hgrn"]).name == "h200-gla-family.csv"


def test_every_registered_chunk_op_is_benchmarked():
    """`--ops chunk` reads fla_tl's registry: each op it registers in mode chunk has an entry in OPS."""
    specs = _specs()
    modes = specs.registry_modes()
    chunk = {name for name, mode in modes.items() if mode == "chunk"}
    selected = specs.ops_of_mode("chunk", modes)
    assert chunk == {specs.OPS[n].registered_name for n in selected}
    assert "chunk_simple_gla_g" in selected and "parallel_retention" not in selected
    assert _bench().parse_ops("chunk,chunk_retention,parallel_retention") == selected + ["parallel_retention"]


# ---------------------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8x4096x16x128", (8, 4096, 16, 128, None, 0)),
        (" 1x32768x16x128h64 ", (1, 32768, 16, 128, 64, 0)),
        ("1x65536x16x128n16", (1, 65536, 16, 128, None, 16)),
        ("1x4096x4x64h8n3", (1, 4096, 4, 64, 8, 3)),
        # HV = H is the dense shape
        ("2x100x16x128h16", (2, 100, 16, 128, None, 0)),
    ],
    ids=["dense", "gva", "packed", "gva-packed", "hv-equals-h"],
)
def test_parse_shape(text, want):
    shape = _specs().parse_shape(text)
    assert (shape.B, shape.T, shape.H, shape.D, shape.HV, shape.seqs) == want
    assert _specs().parse_shape(shape.name) == shape


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("8x4096x16", "expected BxTxHxD"),
        ("8x4096x16x128x2", "expected BxTxHxD"),
        ("1x100x16x128h24", "multiple of H = 16"),
        ("1x100x16x128h8", "multiple of H = 16"),
        ("2x100x16x128n4", "B = 1"),
        ("1x10x16x128n11", "N <= T"),
        ("0x10x16x128", "positive"),
    ],
)
def test_parse_shape_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        _specs().parse_shape(text)


def test_named_shape_sets():
    specs = _specs()

    def names(text):
        return [s.name for s in specs.parse_shapes(text)]

    fla = ["8x4096x16x128", "1x8192x96x128", "2x16384x16x128", "4x2048x16x128", "4x4096x64x128", "8x1024x8x64",
           "8x2048x32x256"]
    assert names("fla") == fla
    assert names("main") == ["8x4096x16x128"]
    assert names("packed") == ["1x65536x16x128n16"]
    assert names("flashqla") == ["1x32768x16x128h32", "1x32768x16x128h64", "2x16384x16x128"]
    # sets and shapes mix, in order, each shape once
    assert names("main,packed,fla,4x64x2x32") == ["8x4096x16x128", "1x65536x16x128n16", *fla[1:], "4x64x2x32"]
    with pytest.raises(ValueError, match="or a set: fla, main, packed, flashqla"):
        specs.parse_shapes("fla,nosuchset")


@pytest.mark.parametrize(("T", "n"), [(65536, 16), (100, 3), (10, 10), (5, 1)])
def test_packed_cu_seqlens(T, n):
    specs = _specs()
    cu = specs.packed_cu_seqlens(T, n)
    assert len(cu) == n + 1 and cu[0] == 0 and cu[-1] == T
    assert all(b > a for a, b in itertools.pairwise(cu)), "every sequence has at least one token"
    assert specs.packed_cu_seqlens(T, n) == cu, "fixed seed: every run packs the same lengths"
    if 2 < n < T:
        assert len({b - a for a, b in itertools.pairwise(cu)}) > 1, "random lengths"
        assert specs.packed_cu_seqlens(T, n, seed=1) != cu
    with pytest.raises(ValueError, match="must be in"):
        specs.packed_cu_seqlens(T, T + 1)


# ---------------------------------------------------------------------------------------------------------------------
# the plan: skips, resume, time budget


def _args(*argv):
    return _bench().parse_args(["--dry-run", *argv])


def _keys(groups):
    return [(c.op, c.shape.name, c.mode, c.provider) for g in groups for c in g.cases]


def test_plan_order_and_skips():
    args = _args("--ops", "chunk_delta_rule,chunk_gated_delta_rule,chunk_titans_linear", "--shapes",
                 "1x32768x16x128h64,8x4096x16x128", "--providers", "fla_tl,fla,flashqla,sdpa", "--skip-slow")
    groups = _plan().plan(args, lambda op: True)
    assert [(g.op, g.shape.name) for g in groups][:4] == [
        ("sdpa", "1x32768x16x128h64"), ("chunk_delta_rule", "1x32768x16x128h64"),
        ("chunk_gated_delta_rule", "1x32768x16x128h64"), ("chunk_titans_linear", "1x32768x16x128h64")]
    by = {(c.op, c.shape.name, c.mode, c.provider): c.skip for g in groups for c in g.cases}
    # fla before FlashQLA before fla_tl; FlashQLA only where the op has a counterpart
    gdn = [c.provider for g in groups[2:3] for c in g.cases if c.mode == "fwd"]
    assert gdn == ["fla", "flashqla", "fla_tl"]
    assert ("chunk_delta_rule", "8x4096x16x128", "fwd", "flashqla") not in by
    assert "grouped value heads" in by["chunk_delta_rule", "1x32768x16x128h64", "fwd", "fla_tl"]
    assert by["chunk_gated_delta_rule", "1x32768x16x128h64", "fwdbwd", "flashqla"] is None
    assert "dense shapes" in by["sdpa", "1x32768x16x128h64", "fwd", "sdpa"]
    # titans: only fla's pure-PyTorch reference is slow
    assert "slow" in by["chunk_titans_linear", "8x4096x16x128", "fwd", "fla"]
    assert by["chunk_titans_linear", "8x4096x16x128", "fwd", "fla_tl"] is None
    packed = _plan().plan(_args("--ops", "chunk_hgrn,chunk_retention", "--shapes", "packed", "--providers",
                                "fla_tl,fla,sdpa"), _bench().cu_seqlens_check(_args("--shapes", "packed")))
    skips = {(c.op, c.provider): c.skip for g in packed for c in g.cases}
    assert "takes no cu_seqlens" in skips["chunk_hgrn", "fla_tl"] and skips["chunk_retention", "fla"] is None
    assert "dense shapes" in skips["sdpa", "sdpa"]


def _row(op, shape, mode, provider, status="ok (5 reps)", timing="events", **kw):
    shape = _specs().parse_shape(shape)
    return {"date": "2026-01-01T00:00:00", "gpu": "NVIDIA H100 80GB HBM3", "op": op, "provider": provider,
            "mode": mode, "B": shape.B, "T": shape.T, "H": shape.H, "D": shape.D, "HV": shape.HV or "",
            "seqs": shape.seqs or "", "timing": timing, "status": status, "median_ms": "1.0", **kw}


def test_resume_skips_rows_in_the_csv(tmp_path):
    plan = _plan()
    out = tmp_path / "h100.csv"
    plan.write_csv(out, [
        _row("chunk_retention", "8x4096x16x128", "fwd", "fla"),
        _row("chunk_retention", "8x4096x16x128", "fwd", "fla_tl", status="error: RuntimeError: x"),
        _row("chunk_retention", "8x4096x16x128", "fwdbwd", "fla"),
        _row("chunk_retention", "8x4096x16x128", "fwdbwd", "fla_tl"),
        # a skip is decided again; a graph-timed row is another key
        _row("chunk_retention", "1x8192x96x128", "fwd", "fla", status="skipped: fla.ops not importable (x)"),
        _row("chunk_retention", "1x8192x96x128", "fwd", "fla_tl", timing="graph"),
        _row("chunk_gated_delta_rule", "1x32768x16x128h64", "fwd", "fla"),
        _row("chunk_gla", "1x65536x16x128n16", "fwd", "fla"),
    ])
    rows = plan.read_csv(out)
    assert [plan.row_shape(r) for r in rows[-2:]] == ["1x32768x16x128h64", "1x65536x16x128n16"]
    done = plan.done_keys(rows)
    assert len(done) == 7
    args = _args("--ops", "chunk_retention,chunk_gated_delta_rule,chunk_gla", "--shapes",
                 "main,1x8192x96x128,1x32768x16x128h64,packed", "--modes", "fwd,fwdbwd", "--providers", "fla_tl,fla")
    groups = plan.plan(args, lambda op: True, done)
    left = _keys(groups)
    # the (chunk_retention, main) group is done whole and left out
    assert ("chunk_retention", "8x4096x16x128") not in {(g.op, g.shape.name) for g in groups}
    assert ("chunk_retention", "1x8192x96x128", "fwd", "fla") in left
    assert ("chunk_retention", "1x8192x96x128", "fwd", "fla_tl") in left
    assert ("chunk_gated_delta_rule", "1x32768x16x128h64", "fwd", "fla") not in left
    assert ("chunk_gla", "1x65536x16x128n16", "fwd", "fla") not in left
    assert ("chunk_gla", "1x65536x16x128n16", "fwd", "fla_tl") in left
    total = len(args.ops) * len(args.shapes) * 2 * 2
    assert len(left) == total - 6
    graph = plan.plan(_args("--ops", "chunk_retention", "--shapes", "1x8192x96x128", "--modes", "fwd",
                            "--providers", "fla_tl", "--cuda-graph"), lambda op: True, done)
    assert graph == []


def test_resume_reads_files_of_the_old_columns(tmp_path):
    """rows written before the HV, seqs and timing columns are dense, event-timed rows."""
    out = tmp_path / "old.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "gpu", "op", "provider", "mode", "B", "T", "H", "D", "status"])
        w.writeheader()
        w.writerow({"date": "d", "gpu": "g", "op": "chunk_gla", "provider": "flash_qla", "mode": "fwd", "B": 8,
                    "T": 4096, "H": 16, "D": 128, "status": "ok (50 reps)"})
    assert _plan().done_keys(_plan().read_csv(out)) == {("chunk_gla", "8x4096x16x128", "fwd", "flash_qla", "events")}


def test_dry_run_lists_only_what_the_csv_lacks(tmp_path, capsys):
    out = tmp_path / "h100.csv"
    _plan().write_csv(out, [_row("chunk_retention", "8x4096x16x128", m, p) for m in ("fwd", "fwdbwd")
                            for p in ("fla", "fla_tl")])
    assert _bench().main(["--dry-run", "--ops", "chunk_retention", "--shapes", "main,4x2048x16x128",
                          "--providers", "fla_tl,fla", "--resume", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8x4096x16x128" not in text.split("note\n", 1)[1]
    assert "4 cases to run in 1 (op, shape) groups, 0 skipped (4 rows already in" in text


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize(
    ("spent", "cases", "now", "next_cases", "allowed"),
    [
        (None, 0, 10.0, 4, True),  # nothing run yet: the first group starts
        (None, 0, 100.0, 4, False),  # the budget is spent already
        (80.0, 4, 80.0, 1, False),  # 20 s per case: 80 + 20 > 90
        (80.0, 8, 80.0, 1, True),  # 10 s per case: 80 + 10 <= 90
        (80.0, 8, 80.0, 2, False),  # a group is started whole or not at all
        (80.0, 8, 85.0, 0, True),  # a group of skipped cases costs nothing
    ],
)
def test_time_budget(spent, cases, now, next_cases, allowed):
    clock = _Clock()
    budget = _plan().Budget(90.0, start=0.0, clock=clock)
    for _ in range(cases):
        budget.record(spent / cases)
    clock.t = now
    assert budget.allows(next_cases) is allowed


def test_no_time_budget_never_stops():
    budget = _plan().Budget(None, start=0.0, clock=lambda: 1e9)
    budget.record(1e6)
    assert budget.allows(100)


def test_parse_args_rejects():
    bench = _bench()
    for argv, match in ((["--ops", "chunkz"], "unknown op 'chunkz'"), (["--shapes", "8x4096"], "expected BxTxHxD"),
                        (["--resume", "--append"], "give one"), (["--time-budget", "0"], "seconds > 0"),
                        (["--providers", "flash_qla"], "unknown provider")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_export_autotune(tmp_path):
    cache = tmp_path / "cache"
    (cache / "ab12").mkdir(parents=True)
    (cache / "cd34").mkdir()
    (cache / "ab12" / "chunk_fwd_kernel.autotune.json").write_text("{}")
    (cache / "cd34" / "chunk_fwd_kernel.cubin").write_bytes(b"\0" * 10)
    n = _plan().export_autotune(cache, tmp_path / "out" / "autotune.tgz")
    assert n == 1
    with tarfile.open(tmp_path / "out" / "autotune.tgz") as tar:
        assert tar.getnames() == ["ab12/chunk_fwd_kernel.autotune.json"]


# ---------------------------------------------------------------------------------------------------------------------
# the dry run and the tables


def test_dry_run_fla_shapes_chunk_ops(capsys):
    """`--dry-run --shapes fla --ops chunk`: every chunk op at the seven shapes, both modes, fla_tl / fla / sdpa."""
    assert _bench().main(["--dry-run", "--shapes", "fla", "--ops", "chunk"]) == 0
    text = capsys.readouterr().out
    ops = _specs().ops_of_mode("chunk")
    body = [line.split() for line in text.splitlines()[2:] if line and line.split()[0] in (*ops, "sdpa")]
    assert {(x[0], x[1], x[2], x[3]) for x in body} == {
        (op, prov, mode, shape.name) for shape in _specs().NAMED_SHAPES["fla"] for op in ops
        for mode in ("fwd", "fwdbwd") for prov in ("fla", "fla_tl")} | {
        ("sdpa", "sdpa", mode, shape.name) for shape in _specs().NAMED_SHAPES["fla"] for mode in ("fwd", "fwdbwd")}
    n = len(ops) * 7 * 2 * 2 + 7 * 2
    assert f"{n} cases to run in {len(ops) * 7 + 7} (op, shape) groups, 0 skipped" in text


def test_table_reads_new_and_old_rows(tmp_path):
    path = tmp_path / "h100.csv"
    rows = [
        _row("chunk_gated_delta_rule", "1x32768x16x128h64", "fwd", "fla_tl", ratio_to_fla="0.500"),
        _row("chunk_gated_delta_rule", "1x32768x16x128h64", "fwd", "fla", median_ms="2.0"),
        _row("chunk_gated_delta_rule", "1x32768x16x128h64", "fwd", "flash_qla", median_ms="0.25"),
        _row("chunk_gla", "1x65536x16x128n16", "fwdbwd", "fla_tl", timing="graph"),
    ]
    _plan().write_csv(path, rows)
    lines = _table().full_table(_table().load([str(path)]))
    assert lines[0].endswith("| flashqla ms |")
    assert "| chunk_gated_delta_rule | fwd | 1x32768x16x128h64 | 1.000 | 2.000 | 0.500 | 0.250 |" in lines
    assert "| chunk_gla | fwd+bwd graph | 1x65536x16x128n16 | 1.000 | - | - | - |" in lines


# ---------------------------------------------------------------------------------------------------------------------
# the run loop on the CPU: a stand-in timer, fla and FlashQLA absent


class _FakeTimer:
    def __init__(self, *args, **kwargs):
        pass

    def run(self, step, reset):
        for _ in range(2):
            reset()
            step()
        return [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.fixture
def cpu_bench(monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "Timer", _FakeTimer)
    monkeypatch.setattr(bench, "peak_memory_mb", lambda step, reset: 0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    # the providers that are not here: their rows are skipped with the reason
    monkeypatch.setitem(sys.modules, "fla", None)
    monkeypatch.setitem(sys.modules, "flash_qla", None)
    # main sets these for fla and Triton: set here, they are put back after the test
    for name, value in (("TRITON_CACHE_DIR", ""), ("FLA_CACHE_RESULTS", "1"), ("FLA_DISABLE_BACKEND_DISPATCH", "1")):
        monkeypatch.setenv(name, value)
    return bench


def test_run_writes_resumes_and_stops_on_budget(cpu_bench, tmp_path, capsys):
    out, cache = tmp_path / "h100.csv", tmp_path / "cache"
    (cache / "ab12").mkdir(parents=True)
    (cache / "ab12" / "k.autotune.json").write_text("{}")
    argv = ["--ops", "chunk_retention,chunk_gated_delta_rule,chunk_hgrn", "--shapes", "1x64x2x16,1x64x2x16n3",
            "--providers", "fla_tl,fla,flashqla", "--dtype", "fp32", "--out", str(out), "--no-plot",
            "--cache-dir", str(cache), "--cache-export", str(tmp_path / "autotune.tgz")]
    assert cpu_bench.main(argv) == 0
    assert capsys.readouterr().out.strip().endswith("all cases done")
    rows = _plan().read_csv(out)
    by = {_plan().row_key(r)[:4]: r for r in rows}
    assert len(rows) == 3 * 2 * 2 * 2 + 2 * 2  # + FlashQLA's rows of the gated delta rule
    tl = by["chunk_retention", "1x64x2x16", "fwd", "fla_tl"]
    assert tl["status"] == "ok (5 reps)" and tl["median_ms"] == "3.0000" and tl["timing"] == "events"
    assert tl["gate"] == "PASS (vs reference)"
    assert by["chunk_retention", "1x64x2x16", "fwd", "fla"]["status"].startswith("skipped: fla.ops.retention")
    assert "not importable" in by["chunk_gated_delta_rule", "1x64x2x16n3", "fwdbwd", "flashqla"]["status"]
    packed = by["chunk_gated_delta_rule", "1x64x2x16n3", "fwdbwd", "fla_tl"]
    assert packed["status"] == "ok (5 reps)" and packed["seqs"] == "3" and packed["gate"].startswith("n/a")
    assert "takes no cu_seqlens" in by["chunk_hgrn", "1x64x2x16n3", "fwd", "fla_tl"]["status"]
    assert (tmp_path / "autotune.tgz").exists() and (cache / "ab12" / "k.autotune.json").exists()

    # resume: nothing left to measure; the skipped rows are decided again and replace the old ones
    assert cpu_bench.main([*argv, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resume: 10 rows in" in text and "0 cases to run" in text
    assert len(_plan().read_csv(out)) == len(rows)

    # a new shape with a spent budget: nothing starts, the CSV keeps its rows, exit 0
    assert cpu_bench.main([*argv, "--resume", "--shapes", "1x64x2x16,2x32x2x16", "--time-budget", "1e-9"]) == 0
    text = capsys.readouterr().out
    assert "6 cases in 3 (op, shape) groups left: run again with --resume" in text
    assert len(_plan().read_csv(out)) == len(rows)
