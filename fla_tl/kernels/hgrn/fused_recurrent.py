"""HGRN by one scan per channel: `h_t = exp(g_t) * h_{t-1} + x_t`, `o_t = h_t`, elementwise over `[Ttot, D]`.

One block per (sequence, BD channels), one thread per channel. Tiles of TB tokens of x and g (raw dtype) are staged
into shared memory by cp.async in a `T.Pipelined` loop, so the next tile loads while the current one is scanned; each
step writes its output straight from the thread (guarded at the sequence end, so varlen neighbours stay untouched).
The channels are viewed as `[D // VEC, VEC]`: VEC = 8 gives 16-byte copies where D and the pointers allow, VEC = 1 is
the fallback for any D. The backward walks back with the carried gradient c = exp(g_{t+1}) dh_{t+1}:
  dh_t = do_t + c,   dx_t = dh_t,   dg_t = dh_t * (o_t - x_t) (= dh_t * exp(g_t) h_{t-1}),   dh0 = exp(g_0) dh_0.
Gates are read in their dtype and applied in fp32; the state and the carried gradient stay in fp32.
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from ..common.utils import LOG2E, TORCH_TO_TL, get_kernel, state_or_dummy, target_for

# channels per vector of the aligned path (16 bytes of bf16 / fp16)
VEC_ALIGNED = 8
# the pipelined copies need warp specialization off (it would move them to a producer warpgroup with TMA)
PASS_CONFIGS = {"tl.disable_warp_specialized": True}


def fused_recurrent_hgrn_fwd_kernel(
    dtype: str,
    g_dtype: str,
    VEC: int = VEC_ALIGNED,
    # kernel config
    TB: int = 64,
    BD: int = 64,
    num_stages: int = 2,
):
    BDV = BD // VEC
    Ttot, DV, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("DV"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def fused_recurrent_hgrn_fwd(
        x: T.Tensor([Ttot, DV, VEC], dtype),
        g: T.Tensor([Ttot, DV, VEC], g_dtype),
        h0: T.Tensor([NH0, DV, VEC], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        o: T.Tensor([Ttot, DV, VEC], dtype),
        ht: T.Tensor([NHT, DV, VEC], "float32"),
        use_h0: T.int32,
        store_ht: T.int32,
    ):
        with T.Kernel(T.ceildiv(DV, BDV), N, threads=BD) as (i_d, i_n):
            bos = cu[i_n]
            eos = cu[i_n + 1]
            x_s = T.alloc_shared([TB, BDV, VEC], dtype)
            g_s = T.alloc_shared([TB, BDV, VEC], g_dtype)
            b_h = T.alloc_fragment([BDV, VEC], "float32")

            T.clear(b_h)
            if use_h0 == 1:
                for d, v in T.Parallel(BDV, VEC):
                    if i_d * BDV + d < DV:
                        b_h[d, v] = h0[i_n, i_d * BDV + d, v]
            for it in T.Pipelined(T.ceildiv(eos - bos, TB), num_stages=num_stages):
                # rows past the sequence end are staged too, and skipped by the scan
                T.copy(x[bos + it * TB, i_d * BDV, 0], x_s)
                T.copy(g[bos + it * TB, i_d * BDV, 0], g_s)
                for r in T.serial(TB):
                    for d, v in T.Parallel(BDV, VEC):
                        if bos + it * TB + r < eos:
                            b_h[d, v] = T.exp2(T.Cast("float32", g_s[r, d, v]) * LOG2E) * b_h[d, v] + T.Cast(
                                "float32", x_s[r, d, v])
                            if i_d * BDV + d < DV:
                                o[bos + it * TB + r, i_d * BDV + d, v] = b_h[d, v]
            if store_ht == 1:
                for d, v in T.Parallel(BDV, VEC):
                    if i_d * BDV + d < DV:
                        ht[i_n, i_d * BDV + d, v] = b_h[d, v]

    return fused_recurrent_hgrn_fwd


def fused_recurrent_hgrn_bwd_kernel(
    dtype: str,
    g_dtype: str,
    VEC: int = VEC_ALIGNED,
    # kernel config
    TB: int = 32,
    BD: int = 64,
    num_stages: int = 2,
):
    BDV = BD // VEC
    Ttot, DV, N, NH0, NHT = T.dynamic("Ttot"), T.dynamic("DV"), T.dynamic("N"), T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def fused_recurrent_hgrn_bwd(
        x: T.Tensor([Ttot, DV, VEC], dtype),
        g: T.Tensor([Ttot, DV, VEC], g_dtype),
        o: T.Tensor([Ttot, DV, VEC], dtype),
        do: T.Tensor([Ttot, DV, VEC], dtype),
        dht: T.Tensor([NHT, DV, VEC], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        dx: T.Tensor([Ttot, DV, VEC], dtype),
        dg: T.Tensor([Ttot, DV, VEC], g_dtype),
        dh0: T.Tensor([NH0, DV, VEC], "float32"),
        use_dht: T.int32,
        store_dh0: T.int32,
    ):
        with T.Kernel(T.ceildiv(DV, BDV), N, threads=BD) as (i_d, i_n):
            bos = cu[i_n]
            eos = cu[i_n + 1]
            nb = T.ceildiv(eos - bos, TB)
            x_s = T.alloc_shared([TB, BDV, VEC], dtype)
            g_s = T.alloc_shared([TB, BDV, VEC], g_dtype)
            o_s = T.alloc_shared([TB, BDV, VEC], dtype)
            do_s = T.alloc_shared([TB, BDV, VEC], dtype)
            b_c = T.alloc_fragment([BDV, VEC], "float32")
            b_dh = T.alloc_fragment([BDV, VEC], "float32")

            T.clear(b_c)
            if use_dht == 1:
                for d, v in T.Parallel(BDV, VEC):
                    if i_d * BDV + d < DV:
                        b_c[d, v] = dht[i_n, i_d * BDV + d, v]
            # tiles from the last to the first; the first one walked may run past the sequence end
            for jt in T.Pipelined(nb, num_stages=num_stages):
                T.copy(x[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], x_s)
                T.copy(g[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], g_s)
                T.copy(o[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], o_s)
                T.copy(do[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], do_s)
                for rr in T.serial(TB):
                    for d, v in T.Parallel(BDV, VEC):
                        if bos + (nb - 1 - jt) * TB + TB - 1 - rr < eos:
                            b_dh[d, v] = b_c[d, v] + T.Cast("float32", do_s[TB - 1 - rr, d, v])
                            b_c[d, v] = T.exp2(T.Cast("float32", g_s[TB - 1 - rr, d, v]) * LOG2E) * b_dh[d, v]
                            if i_d * BDV + d < DV:
                                dx[bos + (nb - 1 - jt) * TB + TB - 1 - rr, i_d * BDV + d, v] = b_dh[d, v]
                                # o_t - x_t = exp(g_t) h_{t-1}
                                dg[bos + (nb - 1 - jt) * TB + TB - 1 - rr, i_d * BDV + d, v] = b_dh[d, v] * (
                                    T.Cast("float32", o_s[TB - 1 - rr, d, v]) - T.Cast("float32", x_s[TB - 1 - rr, d, v]))
            if store_dh0 == 1:
                for d, v in T.Parallel(BDV, VEC):
                    if i_d * BDV + d < DV:
                        dh0[i_n, i_d * BDV + d, v] = b_c[d, v]

    return fused_recurrent_hgrn_bwd


fused_recurrent_hgrn_fwd_kernel.pass_configs = PASS_CONFIGS
fused_recurrent_hgrn_bwd_kernel.pass_configs = PASS_CONFIGS


def _meta_cu(x: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, int]:
    B, T = x.shape[:2]
    if cu_seqlens is None:
        return torch.arange(0, B + 1, dtype=torch.int32, device=x.device) * T, B
    return cu_seqlens.to(torch.int32), cu_seqlens.numel() - 1


def _vec(D: int, *tensors: torch.Tensor) -> int:
    """channels per vector: VEC_ALIGNED where D and every pointer allow 16-byte copies, else 1."""
    aligned = D % VEC_ALIGNED == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)
    return VEC_ALIGNED if aligned else 1


def _vectors(vec: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """`[..., D]` contiguous tensors as the kernels' `[rows, D // vec, vec]`."""
    return [t.view(-1, t.shape[-1] // vec, vec) for t in tensors]


def fused_recurrent_hgrn_fwd(x, g, *, initial_state, output_final_state, cu_seqlens, **config):
    """o `[B, T, D]` in x's dtype and the final state `[N, D]` fp32 or None; x, g `[B, T, D]` contiguous. `config`
    overrides the tile config (kernel "hgrn_fwd")."""
    D = x.shape[-1]
    cu, N = _meta_cu(x, cu_seqlens)
    o = torch.empty_like(x)
    h0, use_h0 = state_or_dummy(initial_state, x, (D,))
    ht = x.new_empty(N if output_final_state else 1, D, dtype=torch.float32)
    vec = _vec(D, x, g, o)
    config = tile_config("hgrn_fwd", x.view(-1, 1, D), K=0, V=0, gate="none", N=N, overrides=config)
    kernel = get_kernel(fused_recurrent_hgrn_fwd_kernel, target_for(x.device), dtype=TORCH_TO_TL[x.dtype],
                        g_dtype=TORCH_TO_TL[g.dtype], VEC=vec, **config)
    x_, g_, h0_, o_, ht_ = _vectors(vec, x, g, h0, o, ht)
    kernel(x_, g_, h0_, cu, o_, ht_, use_h0, int(output_final_state))
    return o, (ht if output_final_state else None)


def fused_recurrent_hgrn_bwd(x, g, o, do, dht, *, initial_state, cu_seqlens, **config):
    """(dx in x's dtype, dg in g's dtype, dh0 in initial_state's dtype or None); `config` overrides the tile config
    (kernel "hgrn_bwd")."""
    D = x.shape[-1]
    cu, N = _meta_cu(x, cu_seqlens)
    dht_, use_dht = state_or_dummy(dht, x, (D,))
    dx, dg = torch.empty_like(x), torch.empty_like(g)
    dh0 = x.new_empty(N if initial_state is not None else 1, D, dtype=torch.float32)
    vec = _vec(D, x, g, o, do, dx, dg)
    config = tile_config("hgrn_bwd", x.view(-1, 1, D), K=0, V=0, gate="none", N=N, overrides=config)
    kernel = get_kernel(fused_recurrent_hgrn_bwd_kernel, target_for(x.device), dtype=TORCH_TO_TL[x.dtype],
                        g_dtype=TORCH_TO_TL[g.dtype], VEC=vec, **config)
    x_, g_, o_, do_, dht_, dx_, dg_, dh0_ = _vectors(vec, x, g, o, do, dht_, dx, dg, dh0)
    kernel(x_, g_, o_, do_, dht_, cu, dx_, dg_, dh0_, use_dht, int(initial_state is not None))
    return dx, dg, (dh0.to(initial_state.dtype) if initial_state is not None else None)


__all__ = ["fused_recurrent_hgrn_bwd", "fused_recurrent_hgrn_fwd"]
