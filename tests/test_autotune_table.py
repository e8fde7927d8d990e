"""The per-GPU tuning table: keys, buckets, round trips, lookup order, bad files, concurrent writers, the cache CLI."""

import json
import logging
import multiprocessing
import os
import pathlib

import pytest

import fla_tl
from fla_tl.autotune import table as tt

GPU = "NVIDIA H100 80GB HBM3"
# the real package tables dir, before the fixture points it at a temp dir
_REAL_SHIPPED_DIR = tt._shipped_dir

KEY_ARGS = dict(
    gpu=GPU,
    capability="9.0",
    kernel="chunk_fwd_h",
    source="0123456789abcdef",
    dims={"H": 4, "K": 64, "V": 64},
    dtypes={"k": "bfloat16", "v": "bfloat16"},
    flags={"varlen": False, "initial_state": True},
    bucket=4096,
    tilelang="0.1.15",
    fla_tl="0.1.0",
)


def _entry(bt: int = 64, time_ms: float = 0.5) -> dict:
    config = {"BT": bt, "BK": 64, "num_stages": 2}
    failed = {"config": {"BT": 256}, "time_ms": None, "status": "compile error"}
    candidates = [{"config": config, "time_ms": time_ms, "status": "ok"}, failed]
    return {"config": config, "time_ms": time_ms, "candidates": candidates}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tt.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(tt.ENV_MODE, raising=False)
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(tt, "_shipped_dir", lambda: shipped)
    tt.clear_memory()
    yield tmp_path
    tt.clear_memory()


def _write_shipped(key: str, entry: dict) -> None:
    path = tt.shipped_table_path(GPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": tt.FORMAT, "gpu": GPU, "entries": {key: entry}}))


def test_make_key_fields():
    base = tt.make_key(**KEY_ARGS)
    assert base == tt.make_key(**KEY_ARGS)
    changes = {
        "gpu": "NVIDIA H200",
        "capability": "9.0a",
        "kernel": "chunk_bwd_dh",
        "source": "fedcba9876543210",
        "dims": {"H": 4, "K": 128, "V": 64},
        "dtypes": {"k": "float16", "v": "bfloat16"},
        "flags": {"varlen": True, "initial_state": True},
        "bucket": 8192,
        "tilelang": "0.1.16",
        "fla_tl": "0.2.0",
    }
    assert set(changes) == set(KEY_ARGS)
    keys = {field: tt.make_key(**{**KEY_ARGS, field: value}) for field, value in changes.items()}
    for field, key in keys.items():
        assert key != base, field
    assert len(set(keys.values())) == len(keys)


def test_make_key_dict_order_and_defaults():
    reordered = {**KEY_ARGS, "dims": {"V": 64, "K": 64, "H": 4}, "flags": {"initial_state": True, "varlen": False}}
    assert tt.make_key(**reordered) == tt.make_key(**KEY_ARGS)
    args = {k: v for k, v in KEY_ARGS.items() if k not in ("tilelang", "fla_tl")}
    key = tt.make_key(**args)
    assert "tilelang=0.1.15" in key and "fla_tl=0.1.0" in key


def test_seqlen_bucket():
    cases = {1: 64, 63: 64, 64: 64, 65: 128, 500: 512, 1000: 1024, 4096: 4096, 4097: 8192, 65536: 65536,
             10**6: 65536}
    assert {t: tt.seqlen_bucket(t) for t in cases} == cases


def test_gpu_slug_and_paths(_cache):
    assert tt.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tt.gpu_slug("  NVIDIA  GeForce RTX 4090 (rev. A) ") == "nvidia-geforce-rtx-4090-rev-a"
    assert tt.user_table_path(GPU) == _cache / "cache" / "tables" / "nvidia-h100-80gb-hbm3.json"
    assert tt.shipped_table_path(GPU).name == "nvidia-h100-80gb-hbm3.json"


def test_shipped_dir_is_in_package():
    assert _REAL_SHIPPED_DIR() == pathlib.Path(fla_tl.__file__).resolve().parent / "autotune" / "tables"
    assert _REAL_SHIPPED_DIR().is_dir()


def test_mode(monkeypatch):
    assert tt.mode() == "lookup"
    for value in ("off", "lookup", "tune"):
        monkeypatch.setenv(tt.ENV_MODE, value)
        assert tt.mode() == value
    monkeypatch.setenv(tt.ENV_MODE, "always")
    with pytest.raises(ValueError, match=tt.ENV_MODE):
        tt.mode()


def test_device_info_and_source_hash():
    name, capability = tt.device_info()
    assert isinstance(name, str) and capability.count(".") == 1
    h = tt.source_hash(test_mode)
    assert len(h) == 16 and int(h, 16) >= 0
    assert tt.source_hash(_entry) == h
    assert tt.source_hash(tt.lookup) != h


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "t.json"
    table = tt.TuningTable(path, gpu=GPU)
    table.put("a", _entry(32))
    table.put("b", _entry(64))
    table.save()
    loaded = tt.TuningTable.load(path)
    assert len(loaded) == 2 and set(loaded.keys()) == {"a", "b"}
    assert loaded.get("a") == _entry(32)
    assert loaded.get("missing") is None
    assert loaded.gpu == GPU
    data = json.loads(path.read_text())
    assert data["format"] == tt.FORMAT
    with pytest.raises(TypeError):
        table.put("c", {"time_ms": 1.0})


def test_save_merges_with_disk(tmp_path):
    path = tmp_path / "t.json"
    first, second = tt.TuningTable.load(path), tt.TuningTable.load(path)
    first.put("a", _entry(32))
    first.put("shared", _entry(32))
    first.save()
    second.put("b", _entry(64))
    second.put("shared", _entry(128))
    second.save()
    loaded = tt.TuningTable.load(path)
    assert set(loaded.keys()) == {"a", "b", "shared"}
    assert loaded.get("shared")["config"]["BT"] == 128
    assert set(second.keys()) == {"a", "b", "shared"}


def test_lookup_prefers_user_table(monkeypatch):
    key = tt.make_key(**KEY_ARGS)
    assert tt.lookup(key, GPU) is None
    _write_shipped(key, _entry(32))
    tt.clear_memory()
    assert tt.lookup(key, GPU) == _entry(32)["config"]
    tt.record(key, GPU, _entry(128))
    assert tt.lookup(key, GPU) == _entry(128)["config"]
    tt.clear_memory()
    assert tt.lookup(key, GPU) == _entry(128)["config"]
    assert tt.TuningTable.load(tt.user_table_path(GPU)).get(key) == _entry(128)
    monkeypatch.setenv(tt.ENV_MODE, "off")
    assert tt.lookup(key, GPU) is None


def test_lookup_is_cached_in_memory():
    key = tt.make_key(**KEY_ARGS)
    tt.record(key, GPU, _entry(64))
    tt.user_table_path(GPU).unlink()
    assert tt.lookup(key, GPU) == _entry(64)["config"]


BAD_FILES = {
    "corrupt": ("{not json", "corrupt"),
    "truncated": (json.dumps({"format": 1, "gpu": GPU, "entries": {"k": _entry()}})[:-7], "truncated"),
    "wrong_format": (json.dumps({"format": 99, "gpu": GPU, "entries": {"k": _entry()}}), "format 99"),
    "not_object": ("[1, 2, 3]", "not a table"),
}


@pytest.mark.parametrize("name", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_file_ignored_once(tmp_path, caplog, name):
    text, reason = BAD_FILES[name]
    path = tmp_path / f"{name}.json"
    path.write_text(text)
    caplog.set_level(logging.WARNING, logger="fla_tl")
    for _ in range(3):
        assert len(tt.TuningTable.load(path)) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert str(path) in messages[0] and reason in messages[0]


def test_bad_entries_dropped(tmp_path, caplog):
    path = tmp_path / "t.json"
    entries = {"good": _entry(), "str": "oops", "no_config": {"time_ms": 1.0}, "bad_config": {"config": [64]}}
    path.write_text(json.dumps({"format": 1, "gpu": GPU, "entries": entries}))
    caplog.set_level(logging.WARNING, logger="fla_tl")
    for _ in range(2):
        table = tt.TuningTable.load(path)
        assert list(table.keys()) == ["good"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and str(path) in messages[0] and "dropped 3" in messages[0]


def test_unreadable_file_ignored(tmp_path, caplog):
    path = tmp_path / "dir.json"
    path.mkdir()
    caplog.set_level(logging.WARNING, logger="fla_tl")
    for _ in range(2):
        assert len(tt.TuningTable.load(path)) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and str(path) in messages[0] and "unreadable" in messages[0]


def test_missing_file_is_silent(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fla_tl")
    assert len(tt.TuningTable.load(tmp_path / "missing.json")) == 0
    assert tt.lookup("k", GPU) is None
    assert not caplog.records


def test_corrupt_user_table_falls_back_to_shipped(caplog):
    key = tt.make_key(**KEY_ARGS)
    _write_shipped(key, _entry(32))
    user = tt.user_table_path(GPU)
    user.parent.mkdir(parents=True)
    user.write_text("{")
    caplog.set_level(logging.WARNING, logger="fla_tl")
    assert tt.lookup(key, GPU) == _entry(32)["config"]
    tt.record(key, GPU, _entry(128))
    assert tt.TuningTable.load(user).get(key) == _entry(128)


def _writer(cache_dir: str, worker: int, barrier) -> None:
    os.environ[tt.ENV_CACHE] = cache_dir
    barrier.wait()
    for i in range(20):
        tt.record(f"worker{worker}-key{i}", GPU, _entry(16 * (i + 1), time_ms=float(i)))


def test_concurrent_writers(_cache):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(_cache / "cache"), w, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    path = tt.user_table_path(GPU)
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 40
    assert {f"worker{w}-key{i}" for w in range(2) for i in range(20)} == set(data["entries"])
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_cache_show_and_clear(_cache):
    key = tt.make_key(**KEY_ARGS)
    _write_shipped(key, _entry(32))
    tt.record(key, GPU, _entry(128, time_ms=0.25))
    tt.record(tt.make_key(**{**KEY_ARGS, "bucket": 8192}), GPU, _entry(64))
    text = tt.cache_show()
    assert str(_cache / "cache") in text
    assert "2 entries" in text and "1 entries" in text
    assert "chunk_fwd_h" in text and "H=4,K=64,V=64" in text and "BT=128" in text and "0.2500 ms" in text
    removed = tt.cache_clear()
    assert tt.user_table_path(GPU) in removed
    assert not tt.user_table_path(GPU).exists()
    assert tt.shipped_table_path(GPU).exists()
    assert tt.lookup(key, GPU) == _entry(32)["config"]
    assert "user tables: (none)" in tt.cache_show()


def test_shipped_tables_match_the_kernel_sources():
    """every shipped entry was tuned against the current source of its kernel's module: an edit to a module drops
    its entries at run time (they are ignored as stale), so a kernel edit re-tunes them on the GPU (or drops them until
    it can); an entry is never moved to a new source hash by hand."""
    from fla_tl.autotune.configs import KERNELS

    for path in sorted((pathlib.Path(fla_tl.__file__).parent / "autotune" / "tables").glob("*.json")):
        for key in json.loads(path.read_text())["entries"]:
            fields = dict(part.split("=", 1) for part in key.split("|"))
            assert fields["source"] == tt.source_hash(KERNELS[fields["kernel"]].factory), f"{path.name}: stale {key}"
