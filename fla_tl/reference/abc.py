"""Pure-PyTorch ABC (attention with bounded-memory control): GSA without a forget gate, its slot gates derived from
the running normaliser of the slot logits `s` (see :mod:`fla_tl.reference.gsa`).

`s' = exp(s - z)`, `g_t = z_{t-1} - z_t` with `z = logcumsumexp(s)` over time (`g_0 = 0`); then keys to slots
`ok_t = scale * hk_t^T q_t` with `hk_t = hk_{t-1} diag(exp(g_t)) + k_t s'_t^T`, a softmax over the M slots, and
slots to values `o_t = hv_t^T softmax(ok_t)` with `hv_t = diag(exp(g_t)) hv_{t-1} + s'_t v_t^T`.
"""

import torch

from .gsa import chunk_gsa_torch, recurrent_gsa


def recurrent_abc(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    r"""
    ABC by the token-by-token recurrence in fp32 (fp64 when any input is fp64): the ground truth.

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`. s (torch.Tensor): slot logits
            `[B, T, H, M]`.
        initial_state (Optional[Tuple[torch.Tensor, torch.Tensor]]): `[B, H, K, M]` and `[B, H, M, V]`.
        output_final_state (bool): Default: `False`.

    Returns:
        o `[B, T, H, V]` and the final states (or None) in the compute dtype; the scale is `K ** -0.5`.

    Examples::
        >>> q, k, v, s = (torch.randn(2, 50, 4, d) for d in (16, 16, 8, 6))
        >>> o, (hk, hv) = recurrent_abc(q, k, v, s, output_final_state=True)
    """
    return recurrent_gsa(q, k, v, s, None, initial_state=initial_state, output_final_state=output_final_state)


def chunk_abc_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """ABC in chunks (the `torch` backend); same arguments and returns as :func:`recurrent_abc`."""
    return chunk_gsa_torch(q, k, v, s, None, initial_state=initial_state, output_final_state=output_final_state,
                           chunk_size=chunk_size)
