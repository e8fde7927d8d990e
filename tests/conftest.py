"""Markers: `gpu` tests need CUDA, `compile` tests need nvcc and tilelang; both skip with a reason elsewhere;
`compile_all` (more builds) runs only with `FLA_TL_COMPILE_ALL=1`. The `poisoned_cuda` fixture NaN-fills the GPU
allocator before a test."""

import importlib
import importlib.util
import os
import shutil

import pytest
import torch


def _compile_skip_reason() -> str | None:
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH"
    if importlib.util.find_spec("tilelang") is None:
        return "tilelang is not installed"
    try:
        importlib.import_module("tilelang")
    except Exception as e:  # noqa: BLE001 - any import failure means the compile tests cannot run
        return f"tilelang is not importable: {type(e).__name__}: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    reason = _compile_skip_reason() if any("compile" in item.keywords for item in items) else None
    compile_skip = pytest.mark.skip(reason=reason) if reason else None
    all_skip = None if os.environ.get("FLA_TL_COMPILE_ALL") == "1" else pytest.mark.skip(
        reason="opt-in: set FLA_TL_COMPILE_ALL=1 to build every kernel of every op")
    for item in items:
        if gpu_skip is not None and "gpu" in item.keywords:
            item.add_marker(gpu_skip)
        if compile_skip is not None and "compile" in item.keywords:
            item.add_marker(compile_skip)
        if all_skip is not None and "compile_all" in item.keywords:
            item.add_marker(all_skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture
def poisoned_cuda():
    """fill the CUDA caching allocator's free memory with NaN first, so an output element a kernel never writes fails
    the comparison; synchronize after the test so an asynchronous error is reported by it."""
    from fla_tl.testing import poison_allocator

    poison_allocator("cuda")
    yield
    torch.cuda.synchronize()


def pytest_runtest_logreport(report):
    """with FLA_TL_TEST_LOG set, append each failure's report to that file as it happens (a run cut off by a
    time limit still leaves its failures behind; with xdist this runs in the controller)."""
    import os

    path = os.environ.get("FLA_TL_TEST_LOG")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} [{report.when}] {report.duration:.1f}s\n{report.longreprtext[-6000:]}\n")
    elif path and report.when == "call":
        with open(path + ".passed", "a") as f:
            f.write(f"{report.nodeid} {report.outcome} {report.duration:.1f}s\n")
