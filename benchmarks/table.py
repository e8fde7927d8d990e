"""Markdown tables from bench.py's CSV files (the tables of benchmarks/README.md and README.md).

    python benchmarks/table.py benchmarks/results/h100-*.csv
        one row per (op, mode, shape): fla_tl ms, fla ms, ratio (fla_tl / fla), and FlashQLA's ms where measured
    python benchmarks/table.py --ratios --shape 8x4096x16x128 benchmarks/results/*.csv
        one row per op with a ratio at that shape: the ratio of each (GPU, mode)

Where a file holds several rows of an (op, provider, mode, shape), the newest counts. Numbers are printed as recorded.
Shapes read as bench.py names them: `h<HV>` value heads, `n<N>` packed sequences; rows timed by CUDA graph replay
(`--cuda-graph`) have their own mode, `fwd graph` / `fwd+bwd graph`.
"""

import argparse
import csv
import re
from pathlib import Path

MODES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
# the provider's name in files written before it was renamed
PROVIDER_NAMES = {"flash_qla": "flashqla"}
PREFIXES = ("chunk_", "fused_chunk_", "fused_recurrent_", "parallel_")


def op_order(op: str) -> tuple:
    """ops of one variant together (chunk, fused_chunk, fused_recurrent, parallel), variants by name."""
    for i, prefix in enumerate(PREFIXES):
        if op.startswith(prefix):
            return op[len(prefix):], i
    return op, len(PREFIXES)


def shape_of(row: dict) -> str:
    """the shape's name as bench.py gives it (files without the HV / seqs columns hold dense shapes)."""
    hv = f"h{row['HV']}" if row.get("HV") else ""
    packed = f"n{row['seqs']}" if row.get("seqs") not in (None, "", "0") else ""
    return f"{row['B']}x{row['T']}x{row['H']}x{row['D']}{hv}{packed}"


def mode_of(row: dict) -> str:
    """`fwd` / `fwdbwd`, with ` graph` for rows timed by CUDA graph replay."""
    return row["mode"] + (" graph" if row.get("timing") == "graph" else "")


def mode_label(mode: str) -> str:
    base, _, graph = mode.partition(" ")
    return MODES[base] + (f" {graph}" if graph else "")


def mode_rank(mode: str) -> tuple:
    base, _, graph = mode.partition(" ")
    return bool(graph), list(MODES).index(base)


def load(paths: list[str]) -> dict[tuple, dict]:
    """(gpu, op, provider, mode, shape) -> the newest row; ordered by file, op, shape (as first met) and mode."""
    rows: dict[tuple, dict] = {}
    order: dict[tuple, tuple] = {}
    shapes: dict[str, int] = {}
    for n, path in enumerate(paths):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                shape = shape_of(r)
                shapes.setdefault(shape, len(shapes))
                provider = PROVIDER_NAMES.get(r["provider"], r["provider"])
                mode = mode_of(r)
                key = (r["gpu"], r["op"], provider, mode, shape)
                if key not in rows or r["date"] >= rows[key]["date"]:
                    rows[key] = r
                order.setdefault(key, (n, op_order(r["op"]), shapes[shape], mode_rank(mode)))
    return {key: rows[key] for key in sorted(rows, key=lambda k: order[k])}


def short_gpu(name: str) -> str:
    m = re.search(r"\b([A-Za-z]*\d{3,}[A-Za-z]*)\b", name)
    return m.group(1).upper() if m else name


def ms(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("median_ms"):
        return f"{float(row['median_ms']):.3f}"
    return "error" if row.get("status", "").startswith("error") else "-"


def full_table(rows: dict[tuple, dict]) -> list[str]:
    qla = any(key[2] == "flashqla" for key in rows)
    out = ["| op | mode | shape | fla_tl ms | fla ms | ratio |" + (" flashqla ms |" if qla else ""),
           "|---|---|---|---|---|---|" + ("---|" if qla else "")]
    for (gpu, op, provider, mode, shape), tl in rows.items():
        if provider != "fla_tl":
            continue
        fla = rows.get((gpu, op, "fla", mode, shape))
        ratio = tl.get("ratio_to_fla") or "-"
        line = f"| {op} | {mode_label(mode)} | {shape} | {ms(tl)} | {ms(fla)} | {ratio} |"
        if qla:
            line += f" {ms(rows.get((gpu, op, 'flashqla', mode, shape)))} |"
        out.append(line)
    return out


def ratio_table(rows: dict[tuple, dict], shape: str) -> list[str]:
    cols = list(dict.fromkeys((gpu, mode) for (gpu, _, p, mode, s) in rows if p == "fla_tl" and s == shape))
    cols.sort(key=lambda c: (short_gpu(c[0]), mode_rank(c[1])))
    # the ops with a ratio at this shape, variants by name
    ops = sorted({op for (_, op, p, _, s), r in rows.items() if p == "fla_tl" and s == shape and r.get("ratio_to_fla")},
                 key=op_order)
    head = " | ".join(f"{short_gpu(g)} {mode_label(m)}" for g, m in cols)
    out = [f"| op | {head} |", "|---" * (len(cols) + 1) + "|"]
    for op in ops:
        cells = []
        for gpu, mode in cols:
            tl = rows.get((gpu, op, "fla_tl", mode, shape))
            cells.append((tl.get("ratio_to_fla") or "-") if tl else "")
        out.append(f"| {op} | " + " | ".join(cells) + " |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="bench.py CSV files")
    p.add_argument("--ratios", action="store_true", help="one row per op: the ratio per GPU and mode at --shape")
    p.add_argument("--shape", default="8x4096x16x128", help="the shape of --ratios (default 8x4096x16x128)")
    args = p.parse_args(argv)
    missing = [x for x in args.csv if not Path(x).is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    rows = load(args.csv)
    print("\n".join(ratio_table(rows, args.shape) if args.ratios else full_table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
