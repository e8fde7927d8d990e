"""The plan of a benchmark run: its cases in (op, shape) groups, what a CSV already holds (resume), the time budget,
and the CSV and cache files. No GPU needed: the tests drive it on the CPU."""

from __future__ import annotations

import csv
import os
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from specs import OPS, Shape

CSV_COLUMNS = [
    "date", "gpu", "torch", "triton", "tilelang", "fla_version", "fla_tl_version",
    "op", "provider", "mode", "B", "T", "H", "D", "HV", "seqs", "dtype",
    "median_ms", "p20_ms", "p80_ms", "gbps", "pct_of_copy", "tflops", "peak_mem_mb",
    "ratio_to_fla", "gate_rel_rms", "gate", "fla_path", "timing", "status", "tile_configs",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# cases and groups


@dataclass(frozen=True)
class Case:
    """one row to measure; `skip` says why it is not run (None: run it)."""

    op: str
    shape: Shape
    mode: str
    provider: str
    skip: str | None = None

    def key(self, timing: str) -> tuple[str, str, str, str, str]:
        return self.op, self.shape.name, self.mode, self.provider, timing


@dataclass
class Group:
    """the cases of one (op, shape): every mode and provider, run together so fla_tl meets fla of the same run."""

    op: str
    shape: Shape
    cases: list[Case] = field(default_factory=list)

    def runnable(self) -> int:
        return sum(c.skip is None for c in self.cases)


def static_skip(op: str, shape: Shape, provider: str, skip_slow: bool,
                takes_cu_seqlens: Callable[[str], bool]) -> str | None:
    """why a case cannot run, known before any call: value heads, packed sequences, slow."""
    if op == "sdpa":
        dense = not (shape.HV or shape.seqs)
        return None if dense else "skipped: sdpa runs dense shapes only (no value heads, no packed sequences)"
    spec = OPS[op]
    if shape.HV and not spec.gva:
        return f"skipped: {op} takes no grouped value heads (HV = {shape.HV} != H = {shape.H})"
    if shape.seqs and not takes_cu_seqlens(op):
        return f"skipped: {op} takes no cu_seqlens (packed sequences)"
    if skip_slow and spec.slow and provider in spec.slow_providers and shape.B * shape.T * shape.H > spec.slow_bth:
        return f"skipped: slow (--skip-slow, B*T*H > {spec.slow_bth})"
    return None


def plan(args, takes_cu_seqlens: Callable[[str], bool], done: set | None = None,
         unavailable: dict[tuple[str, str], str] | None = None) -> list[Group]:
    """the groups in run order: per shape, sdpa once, then per op every mode with fla before fla_tl. Cases whose key
    (op, shape, mode, provider, timing) is in `done` are left out, and groups left empty with them; `unavailable`
    maps (op, provider) to the reason its function cannot be had (a package that does not import)."""
    order = [x for x in ("fla", "flashqla", "fla_tl") if x in args.providers]
    timing = "graph" if args.cuda_graph else "events"
    unavailable = unavailable or {}
    groups = []
    for shape in args.shapes:
        if "sdpa" in args.providers:
            groups.append(Group("sdpa", shape, [Case("sdpa", shape, m, "sdpa") for m in args.modes]))
        for op in args.ops:
            provs = [p for p in order if p != "flashqla" or OPS[op].flashqla]
            groups.append(Group(op, shape, [Case(op, shape, m, p) for m in args.modes for p in provs]))
    out = []
    for g in groups:
        cases = [Case(c.op, c.shape, c.mode, c.provider, unavailable.get((c.op, c.provider))
                      or static_skip(c.op, c.shape, c.provider, args.skip_slow, takes_cu_seqlens))
                 for c in g.cases if done is None or c.key(timing) not in done]
        if cases:
            out.append(Group(g.op, g.shape, cases))
    return out


def row_shape(row: dict) -> str:
    """the shape name of a CSV row (`Shape.name`); rows of files without the HV / seqs columns are dense."""
    hv = f"h{row['HV']}" if row.get("HV") else ""
    packed = f"n{row['seqs']}" if row.get("seqs") not in (None, "", "0") else ""
    return f"{row['B']}x{row['T']}x{row['H']}x{row['D']}{hv}{packed}"


def row_key(row: dict) -> tuple[str, str, str, str, str]:
    return row["op"], row_shape(row), row["mode"], row["provider"], row.get("timing") or "events"


def done_keys(rows: Iterable[dict]) -> set:
    """the keys of rows already measured: every row but the skipped ones (a skip is decided again on each run)."""
    return {row_key(r) for r in rows if not r.get("status", "").startswith("skipped")}


class Budget:
    """stops starting new groups once the next would end past `seconds` from `start`; the estimate per case is the
    mean time of the cases run so far (the first group always starts unless the budget is already spent)."""

    def __init__(self, seconds: float | None, start: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.start = start
        self.clock = clock
        self.cases = 0
        self.spent = 0.0

    def record(self, seconds: float) -> None:
        self.cases += 1
        self.spent += seconds

    def estimate(self) -> float | None:
        return self.spent / self.cases if self.cases else None

    def allows(self, cases: int) -> bool:
        if self.seconds is None or cases == 0:
            return True
        elapsed = self.clock() - self.start
        if elapsed >= self.seconds:
            return False
        est = self.estimate()
        return est is None or elapsed + est * cases <= self.seconds


# ---------------------------------------------------------------------------------------------------------------------
# files


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> None:
    """the whole file, written beside and renamed over it: a run killed mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in CSV_COLUMNS})
    os.replace(tmp, path)


def export_autotune(cache_dir: Path, path: Path) -> int:
    """write the autotune results under `cache_dir` (Triton's `*.autotune.json`, paths relative to it) to `path`,
    a .tar.gz; returns how many files it holds."""
    files = sorted(cache_dir.rglob("*.autotune.json")) if cache_dir.is_dir() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(cache_dir)))
    os.replace(tmp, path)
    return len(files)
