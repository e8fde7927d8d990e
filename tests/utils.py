"""The tests' helpers are the check harness of `fla_tl.testing` (one harness, shared with `python -m fla_tl check`
and the benchmarks' gate); this module re-exports what the tests use from it."""

from fla_tl.testing import TOLERANCES, Case, assert_matches, check_states, compare, poison_allocator, rms, run_check

__all__ = ["TOLERANCES", "Case", "assert_close", "assert_matches", "check_op", "check_states", "poison_allocator",
           "rms", "run_check"]


def assert_close(name, actual, expected, dtype) -> None:
    """relative-RMS check against the tolerance of `dtype`; fails on a shape mismatch and on any NaN or inf."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: one of actual / expected is None"
        return
    ok, detail = compare(actual, expected, dtype)
    assert ok, f"{name}: {detail}"


check_op = check_states
