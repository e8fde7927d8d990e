"""The command line as a new user meets it: help without heavy imports, `check` (subset, summary, skipped builds),
`list`, `cache show | clear`, and `compile` over a user table with malformed keys."""

import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import fla_tl.ops  # noqa: F401 - registers the ops
from fla_tl.autotune import commands
from fla_tl.autotune import table as tt
from fla_tl.cli import WIDTH, _plan, main
from fla_tl.registry import get_op, registered_ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"
KEY_ARGS = {"gpu": GPU, "capability": "9.0", "kernel": "fused_chunk_fwd", "source": "0123456789abcdef",
            "dims": {"K": 64, "V": 64}, "dtypes": {"dtype": "bfloat16"}, "flags": {"gate": "gamma"}, "bucket": 4096,
            "tilelang": "0.1.15", "fla_tl": "0.1.0"}


@pytest.fixture
def cpu(monkeypatch):
    """a machine without a CUDA GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_nvcc(monkeypatch):
    """a machine without nvcc: not on PATH, no CUDA_HOME / CUDA_PATH, no default install."""
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(commands, "CUDA_DEFAULT_HOMES", ())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """an empty user cache and no shipped tables."""
    monkeypatch.setenv(tt.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(tt, "_shipped_dir", lambda: tmp_path / "shipped")
    tt.clear_memory()
    yield tmp_path / "cache"
    tt.clear_memory()


def _write_table(path: pathlib.Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": tt.FORMAT, "gpu": GPU, "entries": entries}))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("command", ["", "list", "check", "compile", "tune", "cache"])
def test_help_imports_neither_torch_nor_tilelang(command):
    code = (
        "import sys\n"
        "from fla_tl.cli import main\n"
        "try:\n"
        f"    main({[command, '--help'] if command else ['--help']!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tilelang', 'tvm', 'numpy'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "usage: python -m fla_tl" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_check_default_runs_the_smallest_case_of_every_op():
    """the default plan: one case per op that has cases, in one dtype; --full: every case."""
    specs = registered_ops()
    plan, broken = _plan(specs, torch.device("cpu"), (torch.float64,), full=False)
    assert not broken
    assert [spec.name for spec, _, _ in plan] == [s.name for s in specs if s.cases is not None]
    assert all(len(cases) == 1 for _, _, cases in plan)
    full, _ = _plan(specs, torch.device("cpu"), (torch.float64, torch.float32), full=True)
    assert sum(len(c) for _, _, c in full) > 2 * len(plan)


def test_check_summary_and_one_skipped_line(cpu, no_nvcc, capsys):
    """a CPU machine without nvcc: one line per op, the refused ops named, and one line for what was skipped."""
    assert main(["check", "--ops", "chunk_hgrn,fused_recurrent_hgrn,fused_chunk_gla", "--compile"]) == 0
    out = capsys.readouterr().out
    lines = _lines(out)
    assert all(len(line) <= WIDTH for line in lines), out
    assert next(line for line in lines if line.startswith("chunk_hgrn")).split()[1:3] == ["pass", "1/1"]
    assert "not provided" in next(line for line in lines if line.startswith("fused_chunk_gla"))
    skipped = [line for line in lines if "skipped" in line and "kernel builds" in line]
    assert len(skipped) == 1
    assert "no CUDA GPU" in skipped[0] and "no nvcc on PATH" in skipped[0]
    assert "2 ops passed, 0 failed, 1 without cases" in out


def test_check_default_says_builds_need_a_flag(cpu, capsys):
    assert main(["check", "--ops", "chunk_hgrn"]) == 0
    skipped = [line for line in _lines(capsys.readouterr().out) if line.startswith("skipped:")]
    assert len(skipped) == 1 and "kernel builds (add --compile or --full)" in skipped[0]


def test_check_full_runs_every_case_in_two_dtypes(cpu, no_nvcc, capsys):
    assert main(["check", "--ops", "fused_recurrent_hgrn,chunk_delta_rule", "--full"]) == 0
    lines = _lines(capsys.readouterr().out)
    header = next(line for line in lines if line.startswith("op "))
    assert header.split()[:3] == ["op", "float64", "float32"]
    n = len(get_op("chunk_delta_rule").cases(torch.device("cpu"), torch.float64))
    row = next(line for line in lines if line.startswith("chunk_delta_rule"))
    assert row.split()[1:5] == ["pass", f"{n}/{n}", "pass", f"{n}/{n}"]


def test_check_failure_fits_the_terminal_and_exits_nonzero(cpu, monkeypatch, capsys):
    from fla_tl import cli

    monkeypatch.setattr(cli, "_run_case", lambda spec, case, backend: ("FAIL", "do: " + "rms err 1.0e+00 " * 30))
    assert main(["check", "--ops", "chunk_hgrn"]) == 1
    out = capsys.readouterr().out
    assert all(len(line) <= WIDTH for line in _lines(out)), out
    row = next(line for line in _lines(out) if line.startswith("chunk_hgrn"))
    assert "FAIL 0/1" in row and "do: rms err" in row
    assert "FAILED" in out


def test_check_verbose_and_out_file_give_every_case(cpu, no_nvcc, tmp_path, capsys):
    path = tmp_path / "check.txt"
    assert main(["check", "--ops", "fused_recurrent_hgrn", "--full", "-v", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    n = len(get_op("fused_recurrent_hgrn").cases(torch.device("cpu"), torch.float64))
    detail = path.read_text()
    for dtype in ("float64", "float32"):
        assert sum(line.startswith(f"fused_recurrent_hgrn  {dtype}") for line in detail.splitlines()) == n
    assert "worst" in detail and detail.splitlines()[0] in out


def test_check_out_file_that_cannot_be_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--out", str(tmp_path / "missing" / "check.txt")])
    assert e.value.code == 2 and "--out: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("ok", [True, False], ids=["built", "failed"])
def test_check_compile_reports_the_builds(ok, cpu, monkeypatch, capsys):
    """with nvcc, --compile builds the retention kernels; a failed build fails the check and is named."""
    calls = []

    def fake_build(specs, arch, workers, verbose):
        calls.append(arch)
        return [(s.name, ok, 0.1, "" if ok else "RuntimeError: nvcc failed") for s in specs]

    monkeypatch.setattr(commands, "find_nvcc", lambda: ("/usr/bin/nvcc", ""))
    monkeypatch.setattr(commands, "build_kernels", fake_build)
    assert main(["check", "--ops", "chunk_hgrn", "--compile"]) == (0 if ok else 1)
    out = capsys.readouterr().out
    n = len(get_op("chunk_retention").kernels(64, "bfloat16")) + len(
        get_op("fused_recurrent_retention").kernels(64, "bfloat16"))
    assert calls == ["sm_90a"]
    assert f"kernel builds for sm_90a: {n if ok else 0} built, {0 if ok else n} failed" in out
    assert ("FAIL chunk_fwd_h: RuntimeError: nvcc failed" in out) != ok
    assert not [line for line in _lines(out) if line.startswith("skipped:") and "kernel builds" in line]


def test_build_kernels_reports_a_crash_per_kernel(monkeypatch):
    from fla_tl.autotune import build as build_module

    def fake(specs, target, workers):
        if specs[0].name == "chunk_fwd_o":
            raise ImportError("no tilelang")
        return [(specs[0].name, True, 0.0, "")]

    monkeypatch.setattr(build_module, "build", fake)
    monkeypatch.setattr(commands, "quiet_tilelang", lambda: None)
    specs = get_op("chunk_retention").kernels(64, "bfloat16")[:2]
    assert [s.name for s in specs] == ["chunk_fwd_h", "chunk_fwd_o"]
    results = commands.build_kernels(specs, "sm_90a", workers=1)
    assert [(name, ok) for name, ok, _, _ in results] == [("chunk_fwd_h", True), ("chunk_fwd_o", False)]
    assert "ImportError: no tilelang" in results[1][3]


def test_quiet_tilelang_keeps_only_warnings():
    loggers = [logging.getLogger(name) for name in ("tilelang", "tvm")]
    levels = [logger.level for logger in loggers]
    try:
        commands.quiet_tilelang()
        assert all(logger.getEffectiveLevel() == logging.WARNING for logger in loggers)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def test_find_nvcc(tmp_path, monkeypatch, no_nvcc):
    assert commands.find_nvcc()[0] is None
    home = tmp_path / "cuda"
    monkeypatch.setenv("CUDA_HOME", str(home))
    path, reason = commands.find_nvcc()
    assert path is None and reason == f"no nvcc in $CUDA_HOME ({home})"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("")
    assert commands.find_nvcc() == (str(home / "bin" / "nvcc"), "")


def test_list_fits_the_terminal_with_readable_columns(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), out
    header = lines[0].split("  ")
    assert [h.strip() for h in header if h.strip()] == ["op", "mode", "backends", "tilelang supports"]
    ops = [spec.name for spec in registered_ops()]
    assert [line.split()[0] for line in lines[2:2 + len(ops)]] == ops
    assert "h0: initial_state" in out and "fused_chunk_gla is not provided" in out


def test_list_verbose_gives_every_backend(capsys):
    assert main(["list", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + sum(len(spec.backends) for spec in registered_ops())
    assert "min cc" in lines[0]


@pytest.mark.parametrize("key", [
    "a",
    "kernel=fused_chunk_fwd|dims=K64|cc=9.0",
    tt.make_key(**KEY_ARGS).replace("dims=K=64,V=64", "dims=K64"),
    tt.make_key(**KEY_ARGS).replace("bucket=4096", "bucket=big"),
    tt.make_key(**KEY_ARGS) + "|extra=1",
], ids=["no-fields", "missing-fields", "bad-dims", "bad-bucket", "extra-field"])
def test_key_fields_refuses_malformed_keys(key):
    assert tt.key_fields(key) is None


def test_key_fields_round_trip():
    fields = tt.key_fields(tt.make_key(**KEY_ARGS))
    assert fields["dims"] == {"K": "64", "V": "64"} and fields["flags"] == {"gate": "gamma"}
    assert fields["bucket"] == 4096 and fields["source"] == "0123456789abcdef"


def test_cache_show_tells_every_key_field(cache, capsys):
    """two entries that differ only in the gate option read differently; every field of a key is shown."""
    for gate, bv in (("gamma", 64), ("g", 32)):
        key = tt.make_key(**{**KEY_ARGS, "flags": {"gate": gate}})
        tt.record(key, GPU, {"config": {"BV": bv, "num_stages": 2, "threads": 128}, "time_ms": 0.5})
    tt.record("not-a-key", GPU, {"config": {"BV": 64}})
    assert main(["cache", "show"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= WIDTH for line in out.splitlines() if str(cache) not in line), out
    entries = [line for line in out.splitlines() if line.strip().startswith("fused_chunk_fwd")]
    assert len(entries) == 2 and len(set(entries)) == 2
    assert any("gate=gamma" in line for line in entries) and any("gate=g " in line + " " for line in entries)
    for value in ("fused_chunk_fwd", "K=64,V=64", "dtype=bfloat16", "T<=4096", f"gpu={GPU}", "cc=9.0",
                  "source=0123456789abcdef", "tilelang=0.1.15", "fla_tl=0.1.0"):
        assert value in out, value
    assert "malformed key (never matched): not-a-key" in out


def test_cache_clear_on_a_read_only_dir(cache, monkeypatch, capsys):
    tt.record(tt.make_key(**KEY_ARGS), GPU, {"config": {"BV": 64}})
    path = tt.user_table_path(GPU)

    def unlink(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    assert main(["cache", "clear"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert str(path) in captured.err and "Permission denied" in captured.err
    assert "Traceback" not in captured.err


def test_compile_ignores_malformed_keys_of_the_user_table(cache, monkeypatch, capsys, caplog):
    """a user table with malformed keys: `compile` builds what it would without them, with one warning."""
    from fla_tl.autotune import build as build_module

    built = []
    monkeypatch.setattr(build_module, "build", lambda specs, target, workers: built.extend(specs) or [
        (s.name, True, 0.0, "") for s in specs])
    monkeypatch.setattr(commands, "find_nvcc", lambda: ("/usr/bin/nvcc", ""))
    monkeypatch.setattr(commands, "quiet_tilelang", lambda: None)
    bad = tt.make_key(**KEY_ARGS).replace("dims=K=64,V=64", "dims=K64")
    path = cache / "tables" / "nvidia-h100-80gb-hbm3.json"
    _write_table(path, {bad: {"config": {"BV": 64}}, "junk": {"config": {}}})
    caplog.set_level(logging.WARNING, logger="fla_tl")
    argv = ["compile", "--ops", "fused_chunk_retention", "--dims", "64", "--workers", "1"]
    assert main(argv) == 0
    assert main(argv) == 0
    assert len(built) == 2 * len(get_op("fused_chunk_retention").kernels(64, "bfloat16"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "2 malformed key(s)" in warnings[0]
    assert "0 failed" in capsys.readouterr().out


def test_compile_without_nvcc_says_so_in_one_line(no_nvcc, capsys):
    assert main(["compile", "--ops", "fused_chunk_retention", "--dims", "64"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no nvcc on PATH" in err
