"""Every op of `benchmarks/bench.py` runs on its inputs: the fla_tl callable exists and gives an output of the right
shape on the CPU (torch backend) at a tiny shape, so a benchmark entry never first fails on the device."""

import importlib
import importlib.util
import pathlib
import sys

import pytest
import torch

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _bench():
    if "fla_tl_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fla_tl_bench", _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fla_tl_bench"] = module
        spec.loader.exec_module(module)
    return sys.modules["fla_tl_bench"]


@pytest.mark.parametrize("name", sorted(_bench().OPS))
def test_bench_op_runs_on_cpu(name):
    op = _bench().OPS[name]
    module, attr = op.fla_tl.split(":")
    fn = getattr(importlib.import_module(module), attr)
    B, T, H, D = 1, 32, 2, 16
    torch.manual_seed(0)
    inputs = op.inputs(B, T, H, D, torch.float32, "cpu")
    consts = op.consts(B, T, H, D, "cpu") if op.consts else {}
    out = fn(**inputs, **consts)
    o = out[0] if isinstance(out, tuple) else out
    assert o.shape[:2] == (B, T) and o.shape[-1] == inputs.get("v", inputs.get("x")).shape[-1]
    assert torch.isfinite(o).all()
    assert op.flops(B, T, H, D, D) > 0


def test_every_bench_op_has_one_results_file():
    """results are filed as benchmarks/results/<gpu>-<op set>.csv: every op belongs to exactly one op set."""
    bench = _bench()
    sets = [s for s, members in bench.OP_SETS.items() for _ in members]
    members = [op for ops in bench.OP_SETS.values() for op in ops]
    assert sorted(members) == sorted(bench.OPS), "OP_SETS must list every op of OPS once"
    assert len(set(members)) == len(members) and len(sets) == len(members)
    assert bench.default_out("NVIDIA H100 80GB HBM3", ["chunk_retention"]).name == "h100-retention.csv"
    assert bench.default_out("NVIDIA H200", ["chunk_gla", "chunk_hgrn"]).name == "h200-gla-family.csv"
