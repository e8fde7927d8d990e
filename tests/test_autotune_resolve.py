"""Which config a launcher runs: the heuristic, the table's entry, explicit overrides; bad or stale entries ignored."""

import dataclasses
import importlib
import inspect
import json
import linecache
import logging
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fla_tl.autotune import resolve
from fla_tl.autotune import table as tt
from fla_tl.autotune import tuner  # noqa: F401 - installs the tune-mode miss handler
from fla_tl.autotune.configs import KERNELS

GPU, CC = "NVIDIA H100 80GB HBM3", "9.0"


class FakeRef:
    """what `tile_config` reads of a launch's tensor: shape `[Ttot, H, K]`, dtype, device (a CUDA device object is
    built without a GPU; nothing is launched)."""

    def __init__(self, Ttot=8 * 4096, H=16, K=128, dtype=torch.bfloat16):
        self.shape = (Ttot, H, K)
        self.dtype = dtype
        self.device = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv(tt.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(tt.ENV_MODE, raising=False)
    monkeypatch.setattr(tt, "_shipped_dir", lambda: tmp_path / "shipped")
    monkeypatch.setattr(resolve, "device_info", lambda device=None: (GPU, CC))
    tt.clear_memory()
    resolve.clear_resolved()
    yield
    tt.clear_memory()
    resolve.clear_resolved()


def _key(name, K=128, V=128, T=4096, dtype="bfloat16"):
    return resolve.table_key(name, K, V, dtype, T, torch.device("cuda", 0))


def _factory(name):
    """the factory function `configs.KERNELS[name].factory` names."""
    module, attr = KERNELS[name].factory.split(":")
    return getattr(importlib.import_module(module), attr)


def _write(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": tt.FORMAT, "gpu": GPU, "entries": entries}))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_constant_heuristics_are_the_factory_defaults(name):
    """a heuristic that does not depend on the dims must equal the factory's keyword defaults, so the tables' configs
    and the factories speak of the same kernel."""
    factory = _factory(name)
    defaults = {p.name: p.default for p in inspect.signature(factory).parameters.values()
                if p.default is not inspect.Parameter.empty}
    config = resolve.heuristic_config(name, 128, 128, "bfloat16")
    assert set(config) <= set(defaults), f"{name}: config fields {set(config) - set(defaults)} are not keywords"
    # the fused kernels' defaults follow the shared memory, the grid-dependent ones the launch
    if name not in ("fused_chunk_fwd", "fused_chunk_bwd_dkv", "fused_recurrent_bwd") and not KERNELS[name].grid:
        assert config == {k: defaults[k] for k in config}


def test_lookup_falls_back_to_the_heuristic():
    ref = FakeRef()
    got = resolve.tile_config("chunk_fwd_h", ref, K=128, V=128, gate="gamma", N=8)
    assert got == resolve.heuristic_config("chunk_fwd_h", 128, 128, "bfloat16")


def test_cpu_tensors_take_the_heuristic():
    ref = torch.empty(64, 2, 32)
    assert resolve.tile_config("fused_recurrent_fwd", ref, K=32, V=32, gate="gamma", N=1) == \
        resolve.heuristic_config("fused_recurrent_fwd", 32, 32, "float32")


@pytest.mark.parametrize("where", ["user", "shipped"])
def test_table_entry_is_used(where):
    tuned = {"BK": 128, "BV": 32, "num_stages": 3, "threads": 256}
    path = tt.user_table_path(GPU) if where == "user" else tt.shipped_table_path(GPU)
    _write(path, {_key("chunk_fwd_h"): {"config": tuned, "time_ms": 0.1}})
    ref = FakeRef()
    assert resolve.tile_config("chunk_fwd_h", ref, K=128, V=128, gate="gamma", N=8) == tuned
    # another sequence-length bucket, dtype or dims: not this entry
    assert resolve.tile_config("chunk_fwd_h", FakeRef(Ttot=8 * 100), K=128, V=128, gate="gamma", N=8) != tuned
    assert resolve.tile_config("chunk_fwd_h", FakeRef(K=64), K=64, V=64, gate="gamma", N=8) != tuned
    assert resolve.resolution_counts() == {"table": 1, "heuristic": 2, "tuned": 0}


def test_mode_off_ignores_the_table(monkeypatch):
    tuned = {"BK": 128, "BV": 32, "num_stages": 3, "threads": 256}
    _write(tt.user_table_path(GPU), {_key("chunk_fwd_h"): {"config": tuned}})
    monkeypatch.setenv(tt.ENV_MODE, "off")
    got = resolve.tile_config("chunk_fwd_h", FakeRef(), K=128, V=128, gate="gamma", N=8)
    assert got == resolve.heuristic_config("chunk_fwd_h", 128, 128, "bfloat16")


def test_overrides_win():
    got = resolve.tile_config("fused_chunk_fwd", FakeRef(), K=128, V=128, gate="gamma", N=8, overrides={"BV": 32})
    assert got["BV"] == 32 and set(got) == {f.name for f in dataclasses.fields(KERNELS["fused_chunk_fwd"].config_cls)}


def test_resolved_once_per_process(monkeypatch):
    calls = []
    real = resolve._resolve
    monkeypatch.setattr(resolve, "_resolve", lambda *a: calls.append(a) or real(*a))
    ref = FakeRef()
    for _ in range(5):
        resolve.tile_config("chunk_bwd_dqk", ref, K=128, V=128, gate="gamma", N=8)
    assert len(calls) == 1


@pytest.mark.parametrize("bad", [{"BV": 64, "bogus": 1}, {"BV": 4096, "num_stages": 3, "threads": 256}],
                         ids=["unknown-field", "does-not-fit"])
def test_bad_table_config_is_ignored_with_a_warning(bad, caplog):
    _write(tt.user_table_path(GPU), {_key("fused_chunk_fwd"): {"config": bad}})
    with caplog.at_level(logging.WARNING, logger="fla_tl"):
        got = resolve.tile_config("fused_chunk_fwd", FakeRef(), K=128, V=128, gate="gamma", N=8)
    assert got == resolve.heuristic_config("fused_chunk_fwd", 128, 128, "bfloat16")
    assert "ignoring the tuned config of fused_chunk_fwd" in caplog.text


def test_stale_entry_is_ignored_with_one_warning(caplog):
    stale = _key("chunk_fwd_o").replace("source=", "source=0000")
    _write(tt.user_table_path(GPU), {stale: {"config": {"BV": 128, "threads": 256}}})
    with caplog.at_level(logging.WARNING, logger="fla_tl"):
        got = resolve.tile_config("chunk_fwd_o", FakeRef(), K=128, V=128, gate="gamma", N=8)
        resolve.clear_resolved()
        resolve.tile_config("chunk_fwd_o", FakeRef(), K=128, V=128, gate="gamma", N=8)
    assert got == resolve.heuristic_config("chunk_fwd_o", 128, 128, "bfloat16")
    assert caplog.text.count("ignoring stale entries for chunk_fwd_o") == 1


def test_tune_mode_tunes_a_miss_once_and_records_it(monkeypatch):
    """`tune` mode with a fake tuner (the timing needs a GPU): a miss is tuned, stored in the user table, then found
    by a fresh process (simulated by clearing the in-memory state) in `lookup` mode."""
    monkeypatch.setenv(tt.ENV_MODE, "tune")
    winner = {"BV": 32, "threads": 256}
    calls = []

    def fake_tune(name, runner, **kw):
        calls.append(name)
        return {"config": winner, "time_ms": 0.1, "default_ms": 0.2, "candidates": []}

    monkeypatch.setattr(tuner, "make_runner", lambda name, **kw: None)
    monkeypatch.setattr(tuner, "tune_kernel", fake_tune)
    assert resolve.tile_config("chunk_bwd_dv", FakeRef(), K=128, V=128, gate="gamma", N=8) == winner
    assert resolve.tile_config("chunk_bwd_dv", FakeRef(), K=128, V=128, gate="gamma", N=8) == winner
    assert calls == ["chunk_bwd_dv"]
    assert resolve.resolution_counts() == {"table": 0, "heuristic": 0, "tuned": 1}
    monkeypatch.setenv(tt.ENV_MODE, "lookup")
    tt.clear_memory()
    resolve.clear_resolved()
    assert resolve.tile_config("chunk_bwd_dv", FakeRef(), K=128, V=128, gate="gamma", N=8) == winner
    assert calls == ["chunk_bwd_dv"]
    assert resolve.resolution_counts() == {"table": 1, "heuristic": 0, "tuned": 0}


def test_tune_mode_without_a_tuner_takes_the_heuristic(monkeypatch, caplog):
    """`tune` mode before `fla_tl.autotune.tuner` is imported (no miss handler): the heuristic, one warning."""
    monkeypatch.setenv(tt.ENV_MODE, "tune")
    previous = resolve.set_miss_handler(None)
    try:
        with caplog.at_level(logging.WARNING, logger="fla_tl"):
            got = resolve.tile_config("chunk_bwd_dv", FakeRef(), K=128, V=128, gate="gamma", N=8)
    finally:
        resolve.set_miss_handler(previous)
    assert got == resolve.heuristic_config("chunk_bwd_dv", 128, 128, "bfloat16")
    assert "no tuner is installed" in caplog.text
    assert not tt.user_table_path(GPU).exists()


def test_compile_cli_takes_the_table_configs():
    from fla_tl.autotune.commands import _table_specs

    tuned = {"BK": 128, "BV": 32, "num_stages": 3, "threads": 256}
    _write(tt.user_table_path(GPU), {_key("chunk_fwd_h"): {"config": tuned}})
    specs = _table_specs("sm_90a", {"chunk_fwd_h", "chunk_fwd_o"})
    assert len(specs) == 1
    factory, kwargs = specs[0].factory, specs[0].kwargs
    assert factory is _factory("chunk_fwd_h")
    assert {k: kwargs[k] for k in tuned} == tuned and kwargs["K"] == 128 and kwargs["dtype"] == "bfloat16"
    assert _table_specs("sm_80", {"chunk_fwd_h"}) == []


# ---------------------------------------------------------------- layering: configs / table / resolve below the kernels


def test_lookup_modules_import_no_kernels():
    """importing `fla_tl.autotune.configs`, `.resolve` and `.table`, and making a table key (which hashes a kernel
    module's source), imports no `fla_tl.kernels` module, no tilelang and none of the modules above the kernels; the
    key's source hash, read from the file, is that of the imported module."""
    code = (
        "import sys, fla_tl.autotune.configs, fla_tl.autotune.resolve, fla_tl.autotune.table\n"
        "above = ('fla_tl.autotune.tuner', 'fla_tl.autotune.build', 'fla_tl.autotune.commands')\n"
        "low = ('fla_tl.kernels', 'tilelang')\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith(low) or m in above)\n"
        "print(loaded())\n"
        "key = fla_tl.autotune.resolve.table_key('chunk_fwd_h', 64, 64, 'bfloat16', 1024)\n"
        "print(loaded())\n"
        "print(fla_tl.autotune.table.parse_key(key)['source'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:2] == ["[]", "[]"], out
    assert out[2] == tt.source_hash(_factory("chunk_fwd_h"))


def test_kernels_import_nothing_above_them():
    """no module under fla_tl/kernels imports the tuner, the build helper or the CLI commands (they sit above)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "fla_tl" / "kernels"
    above = re.compile(r"autotune(\.|\s+import\s+[^\n]*\b)(tuner|build|commands)\b")
    found = [f"{path.relative_to(root)}: {line.strip()}" for path in sorted(root.rglob("*.py"))
             for line in path.read_text().splitlines() if above.search(line)]
    assert found == []


# the kernels whose tile sizes are their factories' fixed defaults (no config in `configs.KERNELS`): none. A new
# kernel gets a config, or joins this list with the reason.
FIXED_TILES = set()


def _launchers():
    """(the kernel factories, {factory name: [(module path, function) of every module-level function that names it]}
    over the kernel modules (their kernel lists in ops.py excluded), {module path: its functions that call
    `tile_config` directly or through a helper of the same module})."""
    import ast

    root = pathlib.Path(__file__).resolve().parents[1] / "fla_tl" / "kernels"
    factories = {m for path in root.rglob("*.py")
                 for m in re.findall(r"^def (\w+_kernel)\(", path.read_text(), re.M)} - {"get_kernel"}
    launchers, resolving = {}, {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "ops.py":
            continue
        functions = {node.name: node for node in ast.parse(path.read_text()).body
                     if isinstance(node, ast.FunctionDef) and node.name not in factories}
        names = {name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                 | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)} for name, node in functions.items()}
        direct = {name for name, used in names.items() if "tile_config" in used}
        resolving[path] = direct | {name for name, used in names.items() if used & direct}
        for name, used in names.items():
            for factory in used & factories:
                launchers.setdefault(factory, []).append((path, name))
    return factories, launchers, resolving


def test_every_launcher_resolves_its_tiles():
    """every launcher of a tunable kernel takes its tiles from `tile_config`, and every other kernel is named in
    FIXED_TILES: a new kernel gets a config in `configs.KERNELS` (or joins the list), and a launcher that bypasses
    `tile_config` fails here."""
    factories, launchers, resolving = _launchers()
    tunable = {f.split(":")[1] for name in KERNELS for f in (KERNELS[name].factory, *KERNELS[name].companions)}
    assert factories - tunable == FIXED_TILES
    bypass = [f"{path.name}:{fn} launches {factory}" for factory in sorted(tunable)
              for path, fn in launchers.get(factory, []) if fn not in resolving[path]
              and not fn.endswith("_kernels")]
    assert bypass == []


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_source_file_is_the_modules(name):
    """the source a table key hashes for a module not imported yet is the imported module's source."""
    module_name = KERNELS[name].factory.split(":")[0]
    module = importlib.import_module(module_name)
    path = tt._source_file(module_name)
    assert pathlib.Path(path) == pathlib.Path(module.__file__)
    assert "".join(linecache.getlines(path)) == inspect.getsource(module)


@pytest.mark.parametrize(("N", "gate", "dtype", "K", "want"), [
    (8, "none", torch.bfloat16, 128, dict(BV=128, threads=256)),  # 8 x 16 heads: a full grid
    (2, "none", torch.bfloat16, 128, dict(BV=32, threads=256)),  # 2 x 16 heads: narrower tiles, more blocks
    (2, "g", torch.bfloat16, 128, dict(BV=32, threads=256)),
    (8, "g", torch.bfloat16, 128, dict(BV=128, threads=256)),
    (2, "none", torch.float32, 128, dict(BV=64, threads=128)),  # fp32 and K > 128: the kernels' defaults
    (2, "g", torch.bfloat16, 256, dict(BV=64, threads=128)),
])
def test_delta_pass_defaults_follow_the_grid(monkeypatch, N, gate, dtype, K, want):
    """the delta rules' passes take the large-grid config while a grid of V tiles of 128 covers three quarters of the
    multiprocessors, else the small-grid one; explicit keywords win over either."""
    monkeypatch.setattr(resolve, "_sm_count", lambda device: 132)
    for name in ("chunk_delta_fwd_h", "chunk_delta_bwd_dhu", "fused_chunk_delta_fwd"):
        ref = FakeRef(Ttot=N * 4096, K=K, dtype=dtype)
        assert resolve.tile_config(name, ref, K=K, V=K, gate=gate, N=N) == want, name
        assert resolve.tile_config(name, ref, K=K, V=K, gate=gate, N=N, overrides={"BV": 64}) == {**want, "BV": 64}
