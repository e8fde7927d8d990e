"""The per-GPU tuning table: keys, JSON files shipped with the package and in the user cache, and lookups.

A table is one JSON file per GPU, `{"format": 1, "gpu": ..., "entries": {key: entry}}`. A key names everything
that decides the best config (GPU, compute capability, kernel, its source hash, dims, dtypes, flags, the
sequence-length bucket, the tilelang and fla_tl versions), so a stale entry is never matched, only ignored.
`lookup` reads the user table, then the shipped one; `record` writes the user table under a file lock, merging
with what other processes wrote. Bad files are ignored with one warning each, never raised.
"""

import fcntl
import functools
import hashlib
import importlib.metadata
import inspect
import json
import linecache
import logging
import os
import pathlib
import re
import sys
import tempfile
import textwrap

import torch

from ..utils import log_once

ENV_MODE = "FLA_TL_AUTOTUNE"
ENV_CACHE = "FLA_TL_CACHE_DIR"
FORMAT = 1

_MODES = ("off", "lookup", "tune")
_MIN_BUCKET = 64
_MAX_BUCKET = 65536


def mode() -> str:
    """the autotune mode from `FLA_TL_AUTOTUNE`: "off", "lookup" (default) or "tune"."""
    value = os.environ.get(ENV_MODE, "").strip().lower() or "lookup"
    if value not in _MODES:
        raise ValueError(f"{ENV_MODE} must be one of {', '.join(_MODES)}, got {os.environ[ENV_MODE]!r}")
    return value


def seqlen_bucket(T: int) -> int:
    """the smallest power of two >= max(T, 64), capped at 65536."""
    return min(1 << (max(int(T), _MIN_BUCKET) - 1).bit_length(), _MAX_BUCKET)


def _source_file(name: str) -> str:
    """the source file of module `name`, looked up in the folders of its deepest imported package (nothing is
    imported)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        package = sys.modules.get(".".join(parts[:i]))
        if getattr(package, "__path__", None) is not None:
            break
    else:
        raise OSError(f"no imported package holds {name}")
    folders = [pathlib.Path(p, *parts[i:-1]) for p in package.__path__]
    for folder in folders:
        for path in (folder / f"{parts[-1]}.py", folder / parts[-1] / "__init__.py"):
            if path.is_file():
                return str(path)
    raise OSError(f"no source file for {name}")


def _module_source(name: str) -> str:
    """the source text of module `name` (as `inspect.getsource` gives it); read from its file without executing it
    when it is not imported yet."""
    module = sys.modules.get(name)
    if module is not None:
        return inspect.getsource(module)
    origin = _source_file(name)
    lines = linecache.getlines(origin)
    if not lines:
        raise OSError(f"cannot read {origin}")
    return "".join(lines)


@functools.cache
def _module_hash(name: str) -> str:
    try:
        text = _module_source(name)
    except (OSError, TypeError):
        # no source (frozen or compiled): fall back to the module name, stale entries then go unnoticed
        text = name
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_hash(factory) -> str:
    """16 hex chars of sha256 over the source of the module that defines `factory`: a function, or its
    "module:function" name (`configs.TunableKernel.factory`; the module is read, not imported, when not loaded)."""
    if isinstance(factory, str):
        return _module_hash(factory.partition(":")[0])
    return _module_hash(inspect.unwrap(factory).__module__)


@functools.cache
def _device_info(index: int) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def device_info(device=None) -> tuple[str, str]:
    """(gpu name, "major.minor") of a CUDA device, the current one by default; ("cpu", "0.0") without CUDA."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "cpu", "0.0"
    return _device_info(torch.cuda.current_device() if device.index is None else device.index)


def gpu_slug(name: str) -> str:
    """a file-name-safe form of a gpu name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(dist: str, fallback: str | None = None) -> str:
    try:
        return fallback or importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@functools.cache
def _versions() -> tuple[str, str]:
    import fla_tl

    return _version("tilelang"), _version("fla-tl", getattr(fla_tl, "__version__", None))


def _join(d: dict) -> str:
    return ",".join(f"{k}={d[k]}" for k in sorted(d))


def make_key(*, gpu: str, capability: str, kernel: str, source: str, dims: dict, dtypes: dict, flags: dict,
             bucket: int, tilelang: str | None = None, fla_tl: str | None = None) -> str:
    """a deterministic key naming every input of a tuning result; dict fields are sorted by name."""
    default_tilelang, default_fla_tl = _versions()
    fields = {
        "kernel": kernel,
        "dims": _join(dims),
        "dtypes": _join(dtypes),
        "flags": _join(flags),
        "bucket": int(bucket),
        "gpu": gpu,
        "cc": capability,
        "source": source,
        "tilelang": default_tilelang if tilelang is None else tilelang,
        "fla_tl": default_fla_tl if fla_tl is None else fla_tl,
    }
    return "|".join(f"{k}={v}" for k, v in fields.items())


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV_CACHE) or "~/.cache/fla_tl").expanduser()


def _shipped_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent / "tables"


def shipped_table_path(gpu: str) -> pathlib.Path:
    """the table shipped with the package for `gpu`."""
    return _shipped_dir() / f"{gpu_slug(gpu)}.json"


def user_table_path(gpu: str) -> pathlib.Path:
    """the table in the user cache (`FLA_TL_CACHE_DIR`, default ~/.cache/fla_tl) for `gpu`."""
    return _cache_dir() / "tables" / f"{gpu_slug(gpu)}.json"


def _valid_entry(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("config"), dict)


def _read(path: pathlib.Path) -> tuple[str | None, dict]:
    """(gpu, entries) of the file at `path`; a missing file is empty, a bad one is empty and warned about once."""
    def bad(reason: str) -> tuple[None, dict]:
        log_once(("autotune.load", str(path), reason), f"ignoring tuning table {path}: {reason}", logging.WARNING)
        return None, {}

    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, {}
    except (OSError, UnicodeDecodeError) as e:
        return bad(f"unreadable ({type(e).__name__}: {e})")
    try:
        data = json.loads(text)
    except ValueError as e:
        return bad(f"corrupt or truncated JSON ({e})")
    if not isinstance(data, dict):
        return bad(f"not a table (a JSON {type(data).__name__}, expected an object)")
    if data.get("format") != FORMAT:
        return bad(f"format {data.get('format')!r}, expected {FORMAT}")
    if not isinstance(data.get("entries"), dict):
        return bad("not a table ('entries' is not an object)")
    entries = {k: v for k, v in data["entries"].items() if _valid_entry(v)}
    if len(entries) < len(data["entries"]):
        n = len(data["entries"]) - len(entries)
        log_once(("autotune.load", str(path), "entries"),
                 f"tuning table {path}: dropped {n} entries that are not objects with a 'config' object",
                 logging.WARNING)
    gpu = data.get("gpu")
    return gpu if isinstance(gpu, str) else None, entries


class TuningTable:
    """one JSON file: {"format": 1, "gpu": ..., "entries": {key: entry}}; an entry is a dict with at least
    "config" (dict of tile keywords -> int/bool/str), "time_ms" (float), and "candidates" (list of
    {"config": ..., "time_ms": ... or null, "status": str})."""

    def __init__(self, path, gpu: str | None = None):
        self.path = pathlib.Path(path)
        self.gpu = gpu
        self.entries: dict[str, dict] = {}
        # keys put since the last load or save: these win over the file on save
        self._dirty: set[str] = set()

    @classmethod
    def load(cls, path) -> "TuningTable":
        """the table at `path`; empty when the file is missing or bad (warned once per path and reason)."""
        table = cls(path)
        table.gpu, table.entries = _read(table.path)
        return table

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        if not _valid_entry(entry):
            raise TypeError(f"a tuning entry must be a dict with a 'config' dict, got {entry!r}")
        self.entries[key] = entry
        self._dirty.add(key)

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self):
        return self.entries.keys()

    def save(self) -> None:
        """merge with the file on disk under an exclusive lock (this table's new entries win), then write atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            gpu, entries = _read(self.path)
            entries.update({k: self.entries[k] for k in self._dirty})
            self.gpu = self.gpu or gpu
            data = {"format": FORMAT, "gpu": self.gpu, "entries": entries}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path)
            except BaseException:
                pathlib.Path(tmp).unlink(missing_ok=True)
                raise
            self.entries, self._dirty = entries, set()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)


# tables loaded in this process, by path; and the (user, shipped) pair by (gpu, cache dir setting)
_tables: dict[str, TuningTable] = {}
_pairs: dict[tuple, tuple[TuningTable, TuningTable]] = {}


def _table(path: pathlib.Path) -> TuningTable:
    table = _tables.get(str(path))
    if table is None:
        table = _tables[str(path)] = TuningTable.load(path)
    return table


def parse_key(key: str) -> dict:
    """the fields of a key made by `make_key`."""
    return dict(part.partition("=")[::2] for part in key.split("|"))


# the fields of a key, in `make_key`'s order
KEY_FIELDS = ("kernel", "dims", "dtypes", "flags", "bucket", "gpu", "cc", "source", "tilelang", "fla_tl")


def key_fields(key: str) -> dict | None:
    """the fields of a key made by `make_key`, with dims, dtypes and flags as dicts of strings and bucket an int;
    None for a malformed key (other fields, a list item that is not `name=value`, a bucket that is not an int)."""
    fields = parse_key(key)
    if tuple(fields) != KEY_FIELDS or key.count("|") != len(KEY_FIELDS) - 1:
        return None
    try:
        for name in ("dims", "dtypes", "flags"):
            items = [item.split("=") for item in fields[name].split(",")] if fields[name] else []
            fields[name] = dict(items)
        fields["bucket"] = int(fields["bucket"])
    except ValueError:
        return None
    return fields


# fields that change when the code changes: an entry that matches a key in everything else is stale
_VERSION_FIELDS = ("source", "tilelang", "fla_tl")


def _warn_stale(table: TuningTable, key: str) -> None:
    """warn once per table and kernel when it holds the key's entry only for another source hash or version."""
    want = parse_key(key)
    same = {k: v for k, v in want.items() if k not in _VERSION_FIELDS}
    for other in table.keys():
        fields = parse_key(other)
        if all(fields.get(k) == v for k, v in same.items()):
            changed = ", ".join(f"{k} {fields.get(k)} (now {want[k]})" for k in _VERSION_FIELDS
                                if fields.get(k) != want[k])
            log_once(("autotune.stale", str(table.path), want["kernel"]),
                     f"tuning table {table.path}: ignoring stale entries for {want['kernel']} ({changed}); "
                     "using the heuristic config: re-tune with `python -m fla_tl tune`", logging.WARNING)
            return


def lookup(key: str, gpu: str) -> dict | None:
    """the tuned config for `key` from the user table, else the shipped one, else None (always None when "off").
    Stale entries (same kernel, dims and GPU, other source hash or version) are ignored with one warning."""
    if mode() == "off":
        return None
    pair = _pairs.get((gpu, os.environ.get(ENV_CACHE)))
    if pair is None:
        pair = _pairs[(gpu, os.environ.get(ENV_CACHE))] = (_table(user_table_path(gpu)),
                                                            _table(shipped_table_path(gpu)))
    for table in pair:
        entry = table.get(key)
        if entry is not None:
            return entry["config"]
    for table in pair:
        _warn_stale(table, key)
    return None


def record(key: str, gpu: str, entry: dict) -> None:
    """put `entry` into the user table for `gpu` and save it; a failed write is warned about and kept in memory."""
    table = _table(user_table_path(gpu))
    table.gpu = table.gpu or gpu
    table.put(key, entry)
    try:
        table.save()
    except OSError as e:
        log_once(("autotune.save", str(table.path), type(e).__name__),
                 f"could not save tuning table {table.path} ({type(e).__name__}: {e}); keeping it in memory",
                 logging.WARNING)


def clear_memory() -> None:
    """forget the tables loaded in this process."""
    _tables.clear()
    _pairs.clear()


# key fields that name where an entry was tuned, not what it tunes: shown once per table when every entry shares them
_ORIGIN_FIELDS = ("gpu", "cc", "source", "tilelang", "fla_tl")


def _describe(path: pathlib.Path) -> list[str]:
    """a table's lines for `cache show`: per entry, every key field (those every entry shares once, in the table's
    line), then its config and time."""
    table = TuningTable.load(path)
    parsed = {key: key_fields(key) for key in sorted(table.keys())}
    good = [f for f in parsed.values() if f is not None]
    shared = {k: good[0][k] for k in _ORIGIN_FIELDS if good and all(f[k] == good[0][k] for f in good)}
    lines = [f"  {path}: {len(table)} entries"]
    if shared:
        lines += textwrap.wrap(" ".join(f"{k}={v}" for k, v in shared.items()), 100,
                               initial_indent="    every entry: ", subsequent_indent="      ")
    for key, fields in parsed.items():
        entry = table.get(key)
        if fields is None:
            lines.append(f"    malformed key (never matched): {key}")
        else:
            what = [fields["kernel"]] + [",".join(f"{k}={v}" for k, v in fields[name].items()) or f"no {name}"
                                         for name in ("dims", "dtypes", "flags")]
            origin = [f"{k}={fields[k]}" for k in _ORIGIN_FIELDS if k not in shared]
            lines.append(f"    {'  '.join(what)}  T<={fields['bucket']}" + "".join(f"  {o}" for o in origin))
        config = " ".join(f"{k}={v}" for k, v in sorted(entry["config"].items()))
        time_ms = entry.get("time_ms")
        time = f"{time_ms:.4f} ms" if isinstance(time_ms, (int, float)) else "no time"
        lines.append(f"      -> {config} ({time})")
    return lines


def cache_show() -> str:
    """the cache dir, then each user and shipped table with its entries: every key field, the config and time."""
    lines = [f"cache dir: {_cache_dir()}"]
    for title, folder in (("user tables", _cache_dir() / "tables"), ("shipped tables", _shipped_dir())):
        paths = sorted(folder.glob("*.json"))
        lines.append(f"{title}:" if paths else f"{title}: (none)")
        for path in paths:
            lines += _describe(path)
    return "\n".join(lines)


def cache_clear() -> list[pathlib.Path]:
    """delete the user tables (and their lock files), not the shipped ones; return the removed paths."""
    removed = []
    for path in sorted((_cache_dir() / "tables").glob("*.json*")):
        if path.is_file():
            path.unlink()
            removed.append(path)
    clear_memory()
    return removed
