"""HGRN by one scan per channel: `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t`, elementwise over `[Ttot, D]`.

One block per (sequence, BD channels), one thread per channel. TB tokens are staged into shared memory with coalesced
loads, stepped one by one from there, and stored back, so the serial chain only waits on shared memory. The backward
walks back with the carried gradient c = exp(g_{t+1}) dh_{t+1}:
  dh_t = do_t + c,   dx_t = dh_t,   dg_t = dh_t * (o_t - x_t) (= dh_t * exp(g_t) h_{t-1}),   dh0 = exp(g_0) dh_0.
Gates are read and accumulated in fp32.
"""

import tilelang.language as T
import torch

from ..common.utils import TORCH_TO_TL, get_kernel, state_or_dummy, target_for


def fused_recurrent_hgrn_fwd_kernel(
    dtype: str,
    g_dtype: str,
    # kernel config
    TB: int = 32,
    BD: int = 128,
):
    Ttot, D, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("D"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def fused_recurrent_hgrn_fwd(
        x: T.Tensor([Ttot, D], dtype),
        g: T.Tensor([Ttot, D], g_dtype),
        h0: T.Tensor([NH0, D], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        o: T.Tensor([Ttot, D], dtype),
        ht: T.Tensor([NHT, D], "float32"),
        use_h0: T.int32,
        store_ht: T.int32,
    ):
        with T.Kernel(T.ceildiv(D, BD), N, threads=BD) as (i_d, i_n):
            bos = cu[i_n]
            eos = cu[i_n + 1]
            x_s = T.alloc_shared([TB, BD], "float32")
            a_s = T.alloc_shared([TB, BD], "float32")
            b_h = T.alloc_fragment([BD], "float32")

            T.clear(b_h)
            if use_h0 == 1:
                for d in T.Parallel(BD):
                    if i_d * BD + d < D:
                        b_h[d] = h0[i_n, i_d * BD + d]
            for it in T.serial(T.ceildiv(eos - bos, TB)):
                t0 = bos + it * TB
                for r, d in T.Parallel(TB, BD):
                    valid = t0 + r < eos and i_d * BD + d < D
                    x_s[r, d] = T.if_then_else(valid, T.Cast("float32", x[t0 + r, i_d * BD + d]), 0)
                    # past the sequence end: a zero log gate and zero input leave h unchanged
                    a_s[r, d] = T.if_then_else(valid, T.Cast("float32", g[t0 + r, i_d * BD + d]), 0)
                for r in T.serial(TB):
                    for d in T.Parallel(BD):
                        b_h[d] = T.exp(a_s[r, d]) * b_h[d] + x_s[r, d]
                        x_s[r, d] = b_h[d]
                for r, d in T.Parallel(TB, BD):
                    if t0 + r < eos and i_d * BD + d < D:
                        o[t0 + r, i_d * BD + d] = x_s[r, d]
            if store_ht == 1:
                for d in T.Parallel(BD):
                    if i_d * BD + d < D:
                        ht[i_n, i_d * BD + d] = b_h[d]

    return fused_recurrent_hgrn_fwd


def fused_recurrent_hgrn_bwd_kernel(
    dtype: str,
    g_dtype: str,
    # kernel config
    TB: int = 32,
    BD: int = 128,
):
    Ttot, D, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("D"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def fused_recurrent_hgrn_bwd(
        x: T.Tensor([Ttot, D], dtype),
        g: T.Tensor([Ttot, D], g_dtype),
        o: T.Tensor([Ttot, D], dtype),
        do: T.Tensor([Ttot, D], dtype),
        dht: T.Tensor([NHT, D], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        dx: T.Tensor([Ttot, D], dtype),
        dg: T.Tensor([Ttot, D], g_dtype),
        dh0: T.Tensor([NH0, D], "float32"),
        use_dht: T.int32,
        store_dh0: T.int32,
    ):
        with T.Kernel(T.ceildiv(D, BD), N, threads=BD) as (i_d, i_n):
            bos = cu[i_n]
            eos = cu[i_n + 1]
            nb = T.ceildiv(eos - bos, TB)
            a_s = T.alloc_shared([TB, BD], "float32")
            do_s = T.alloc_shared([TB, BD], "float32")
            xo_s = T.alloc_shared([TB, BD], "float32")
            b_c = T.alloc_fragment([BD], "float32")

            T.clear(b_c)
            if use_dht == 1:
                for d in T.Parallel(BD):
                    if i_d * BD + d < D:
                        b_c[d] = dht[i_n, i_d * BD + d]
            for jt in T.serial(nb):
                t0 = bos + (nb - 1 - jt) * TB
                for r, d in T.Parallel(TB, BD):
                    valid = t0 + r < eos and i_d * BD + d < D
                    a_s[r, d] = T.if_then_else(valid, T.Cast("float32", g[t0 + r, i_d * BD + d]), 0)
                    do_s[r, d] = T.if_then_else(valid, T.Cast("float32", do[t0 + r, i_d * BD + d]), 0)
                    # o_t - x_t = exp(g_t) h_{t-1}
                    xo_s[r, d] = T.if_then_else(
                        valid,
                        T.Cast("float32", o[t0 + r, i_d * BD + d]) - T.Cast("float32", x[t0 + r, i_d * BD + d]),
                        0,
                    )
                for rr in T.serial(TB):
                    for d in T.Parallel(BD):
                        # rows past the sequence end have zero do and gate 0: c passes through unchanged
                        b_c[d] = b_c[d] + do_s[TB - 1 - rr, d]  # dh_t
                        xo_s[TB - 1 - rr, d] = b_c[d] * xo_s[TB - 1 - rr, d]  # dg_t
                        do_s[TB - 1 - rr, d] = b_c[d]  # dx_t
                        b_c[d] = T.exp(a_s[TB - 1 - rr, d]) * b_c[d]
                for r, d in T.Parallel(TB, BD):
                    if t0 + r < eos and i_d * BD + d < D:
                        dx[t0 + r, i_d * BD + d] = do_s[r, d]
                        dg[t0 + r, i_d * BD + d] = xo_s[r, d]
            if store_dh0 == 1:
                for d in T.Parallel(BD):
                    if i_d * BD + d < D:
                        dh0[i_n, i_d * BD + d] = b_c[d]

    return fused_recurrent_hgrn_bwd


def _meta_cu(x: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, int]:
    B, T, D = x.shape
    if cu_seqlens is None:
        return torch.arange(0, B + 1, dtype=torch.int32, device=x.device) * T, B
    return cu_seqlens.to(torch.int32), cu_seqlens.numel() - 1


def fused_recurrent_hgrn_fwd(x, g, *, initial_state, output_final_state, cu_seqlens, **config):
    """o `[B, T, D]` in x's dtype and the final state `[N, D]` fp32 or None; x, g `[B, T, D]` contiguous."""
    B, T, D = x.shape
    cu, N = _meta_cu(x, cu_seqlens)
    o = torch.empty_like(x)
    h0, use_h0 = state_or_dummy(initial_state, x, (D,))
    ht = x.new_empty(N if output_final_state else 1, D, dtype=torch.float32)
    kernel = get_kernel(fused_recurrent_hgrn_fwd_kernel, target_for(x.device), dtype=TORCH_TO_TL[x.dtype],
                        g_dtype=TORCH_TO_TL[g.dtype], **config)
    kernel(x.view(-1, D), g.view(-1, D), h0, cu, o.view(-1, D), ht, use_h0, int(output_final_state))
    return o, (ht if output_final_state else None)


def fused_recurrent_hgrn_bwd(x, g, o, do, dht, *, initial_state, cu_seqlens, **config):
    """(dx in x's dtype, dg in g's dtype, dh0 in initial_state's dtype or None)."""
    B, T, D = x.shape
    cu, N = _meta_cu(x, cu_seqlens)
    dht_, use_dht = state_or_dummy(dht, x, (D,))
    dx, dg = torch.empty_like(x), torch.empty_like(g)
    dh0 = x.new_empty(N if initial_state is not None else 1, D, dtype=torch.float32)
    kernel = get_kernel(fused_recurrent_hgrn_bwd_kernel, target_for(x.device), dtype=TORCH_TO_TL[x.dtype],
                        g_dtype=TORCH_TO_TL[g.dtype], **config)
    kernel(x.view(-1, D), g.view(-1, D), o.view(-1, D), do.view(-1, D), dht_, cu, dx.view(-1, D), dg.view(-1, D),
           dh0, use_dht, int(initial_state is not None))
    return dx, dg, (dh0.to(initial_state.dtype) if initial_state is not None else None)


__all__ = ["fused_recurrent_hgrn_fwd", "fused_recurrent_hgrn_bwd"]


class _HGRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, initial_state, output_final_state, cu_seqlens):
        x, g = x.contiguous(), g.contiguous()
        h0 = initial_state.contiguous() if initial_state is not None else None
        o, ht = fused_recurrent_hgrn_fwd(x, g, initial_state=h0, output_final_state=output_final_state,
                                         cu_seqlens=cu_seqlens)
        ctx.save_for_backward(x, g, o, h0, cu_seqlens)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        x, g, o, h0, cu_seqlens = ctx.saved_tensors
        dx, dg, dh0 = fused_recurrent_hgrn_bwd(x, g, o, do.contiguous(), dht.contiguous() if dht is not None else None,
                                               initial_state=h0, cu_seqlens=cu_seqlens)
        return dx, dg, dh0, None, None


def hgrn(x, g, initial_state=None, output_final_state: bool = False, cu_seqlens=None):
    """(o `[B, T, D]` in x's dtype, final state `[N, D]` fp32 or None), differentiable in x, g and initial_state."""
    return _HGRN.apply(x, g, initial_state, output_final_state, cu_seqlens)
