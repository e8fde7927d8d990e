"""KDA token by token on a state pool (serving): the tilelang forward on the ops' `[B, T, ...]` tensors with the
states read from and written back to pool slots in place, around `common.fused_recurrent_delta`'s forward kernel.
Training (and every call without a pool) runs the delta rules' shared entry points of `delta_rule.fused_recurrent`,
which take the per-key gate."""

import torch

from ..common.fused_recurrent_delta import GateActivation, fused_recurrent_delta_rule_fwd, packed


def fused_recurrent_kda_pool_fwd(
    q, k, v, g, beta, pool, slots, accepted, *, scale: float, state_v_first: bool, cu_seqlens,
    use_qk_l2norm_in_kernel: bool, act: GateActivation | None = None,
) -> torch.Tensor:
    """o `[B, T, HV, V]` in q's dtype for `[B, T, H, K]` q, k, `[B, T, HV, V]` v, activated log gates g
    `[B, T, HV, K]` and betas `[B, T, HV]`; the states live in `pool` `[P, HV, K, V]` fp32 contiguous (`[P, HV, V, K]`
    with `state_v_first`), `slots` `[N, NI]` int32, `accepted` `[N]` int32 or None (see
    `common.fused_recurrent_delta.fused_recurrent_delta_rule_fwd`); the pool is updated in place."""
    B, T = q.shape[:2]
    HV, V = v.shape[2:]
    meta, q_, k_, v_, beta_, g_ = packed(q, k, v, beta, g, cu_seqlens, use_qk_l2norm_in_kernel)
    o, _, _ = fused_recurrent_delta_rule_fwd(
        q_, k_, v_, beta_, g_, scale=scale, initial_state=pool, output_final_state=False, state_v_first=state_v_first,
        meta=meta, store_w=False, slots=slots, accepted=accepted, act=act,
    )
    return o.view(B, T, HV, V)
