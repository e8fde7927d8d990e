"""Linear attention's normalisation (fla's `normalize=True`) as TileLang stages: `key_sum_normalize`.

Built, compile-tested, not yet run on a GPU: the ops keep the PyTorch stage (`fla_tl.reference.linear_attn`) until
`tests/test_linear_attn.py::test_normalize_kernels` passes on one.
"""

from .normalize import key_sum_normalize

__all__ = ["key_sum_normalize"]
