"""Linear attention's normalisation (fla's `normalize=True`) as TileLang stages: `key_sum_normalize`, which the ops
run on a GPU (`tests/test_linear_attn.py::test_normalize_kernels` and the op tests check it there)."""

from .normalize import key_sum_normalize

__all__ = ["key_sum_normalize"]
