"""ABC's slot normaliser by one scan per slot channel: from the raw slot logits s `[Ttot, D]` (D = H * M) of each
sequence, the running log-sum-exp over time z_t = log sum_{j <= t} exp(s_j), the normalised slots sn_t = exp(s_t - z_t)
and the log gates g_t = z_{t-1} - z_t (g = 0 at a sequence's first token). The same math as
`fla_tl.reference.gsa.slot_gates` (PyTorch's logcumsumexp along time, which is slow on CUDA for this layout).

Backward, walking back with R_t = sum_{u >= t} dz_u exp(z_t - z_u) (every factor exp(z_t - z_u) <= 1, z grows):
  dz_t = -sn_t dsn_t - dg_t [t > first] + dg_{t+1},   R_t = dz_t + exp(z_t - z_{t+1}) R_{t+1},
  ds_t = sn_t (dsn_t + R_t).
One block per (sequence, BD channels), one thread per channel; tiles of TB tokens staged in shared memory by a
`T.Pipelined` loop (as `kernels/hgrn`). s is read in its dtype, z and g are fp32, sn is written in `out_dtype`.
"""

import tilelang.language as T
import torch

from ...autotune.resolve import tile_config
from ..common.utils import TORCH_TO_TL, get_kernel, target_for

# 16-byte vectors of bf16 / fp16 logits
VEC_ALIGNED = 8
# the pipelined copies need warp specialization off (it would move them to a producer warpgroup with TMA)
PASS_CONFIGS = {"tl.disable_warp_specialized": True}


def slot_normaliser_fwd_kernel(dtype: str, out_dtype: str, VEC: int = VEC_ALIGNED, TB: int = 64, BD: int = 64,
                               num_stages: int = 2):
    BDV = BD // VEC
    Ttot, DV, N = T.dynamic("Ttot"), T.dynamic("DV"), T.dynamic("N")

    @T.prim_func
    def slot_normaliser_fwd(
        s: T.Tensor([Ttot, DV, VEC], dtype),
        cu: T.Tensor([N + 1], "int32"),
        sn: T.Tensor([Ttot, DV, VEC], out_dtype),
        g: T.Tensor([Ttot, DV, VEC], "float32"),
        z: T.Tensor([Ttot, DV, VEC], "float32"),
    ):
        with T.Kernel(T.ceildiv(DV, BDV), N, threads=BD) as (i_d, i_n):
            bos = cu[i_n]
            eos = cu[i_n + 1]
            s_s = T.alloc_shared([TB, BDV, VEC], dtype)
            b_z = T.alloc_fragment([BDV, VEC], "float32")
            b_m = T.alloc_fragment([BDV, VEC], "float32")
            b_n = T.alloc_fragment([BDV, VEC], "float32")

            for d, v in T.Parallel(BDV, VEC):
                b_z[d, v] = -T.infinity("float32")
            for it in T.Pipelined(T.ceildiv(eos - bos, TB), num_stages=num_stages):
                # rows past the sequence end are staged too, and skipped by the scan
                T.copy(s[bos + it * TB, i_d * BDV, 0], s_s)
                for r in T.serial(TB):
                    for d, v in T.Parallel(BDV, VEC):
                        if bos + it * TB + r < eos:
                            b_m[d, v] = T.max(b_z[d, v], T.Cast("float32", s_s[r, d, v]))
                            b_n[d, v] = b_m[d, v] + T.log(
                                T.exp(b_z[d, v] - b_m[d, v]) + T.exp(T.Cast("float32", s_s[r, d, v]) - b_m[d, v]))
                            if i_d * BDV + d < DV:
                                t = bos + it * TB + r
                                sn[t, i_d * BDV + d, v] = T.exp(T.Cast("float32", s_s[r, d, v]) - b_n[d, v])
                                g[t, i_d * BDV + d, v] = T.if_then_else(t > bos, b_z[d, v] - b_n[d, v], 0)
                                z[t, i_d * BDV + d, v] = b_n[d, v]
                            b_z[d, v] = b_n[d, v]

    return slot_normaliser_fwd


def slot_normaliser_bwd_kernel(dtype: str, dsn_dtype: str, VEC: int = VEC_ALIGNED, TB: int = 32, BD: int = 64,
                               num_stages: int = 2):
    BDV = BD // VEC
    Ttot, DV, N = T.dynamic("Ttot"), T.dynamic("DV"), T.dynamic("N")

    @T.prim_func
    def slot_normaliser_bwd(
        s: T.Tensor([Ttot, DV, VEC], dtype),
        z: T.Tensor([Ttot, DV, VEC], "float32"),
        dsn: T.Tensor([Ttot, DV, VEC], dsn_dtype),
        dg: T.Tensor([Ttot, DV, VEC], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        ds: T.Tensor([Ttot, DV, VEC], dtype),
    ):
        with T.Kernel(T.ceildiv(DV, BDV), N, threads=BD) as (i_d, i_n):
            bos = cu[i_n]
            eos = cu[i_n + 1]
            nb = T.ceildiv(eos - bos, TB)
            s_s = T.alloc_shared([TB, BDV, VEC], dtype)
            z_s = T.alloc_shared([TB, BDV, VEC], "float32")
            dsn_s = T.alloc_shared([TB, BDV, VEC], dsn_dtype)
            dg_s = T.alloc_shared([TB, BDV, VEC], "float32")
            # carried from token t + 1: R, dg and z (z = +inf before the last token: exp(z_t - z_{t+1}) = 0)
            b_r = T.alloc_fragment([BDV, VEC], "float32")
            b_dg = T.alloc_fragment([BDV, VEC], "float32")
            b_z = T.alloc_fragment([BDV, VEC], "float32")
            b_sn = T.alloc_fragment([BDV, VEC], "float32")
            b_zt = T.alloc_fragment([BDV, VEC], "float32")
            b_dgt = T.alloc_fragment([BDV, VEC], "float32")

            T.clear(b_r)
            T.clear(b_dg)
            for d, v in T.Parallel(BDV, VEC):
                b_z[d, v] = T.infinity("float32")
            for jt in T.Pipelined(nb, num_stages=num_stages):
                T.copy(s[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], s_s)
                T.copy(z[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], z_s)
                T.copy(dsn[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], dsn_s)
                T.copy(dg[bos + (nb - 1 - jt) * TB, i_d * BDV, 0], dg_s)
                for rr in T.serial(TB):
                    for d, v in T.Parallel(BDV, VEC):
                        if bos + (nb - 1 - jt) * TB + TB - 1 - rr < eos:
                            t = bos + (nb - 1 - jt) * TB + TB - 1 - rr
                            b_zt[d, v] = z_s[TB - 1 - rr, d, v]
                            b_sn[d, v] = T.exp(T.Cast("float32", s_s[TB - 1 - rr, d, v]) - b_zt[d, v])
                            b_dgt[d, v] = T.if_then_else(t > bos, dg_s[TB - 1 - rr, d, v], 0)
                            b_r[d, v] = (
                                -b_sn[d, v] * T.Cast("float32", dsn_s[TB - 1 - rr, d, v]) - b_dgt[d, v] + b_dg[d, v]
                                + T.exp(b_zt[d, v] - b_z[d, v]) * b_r[d, v]
                            )
                            if i_d * BDV + d < DV:
                                ds[t, i_d * BDV + d, v] = b_sn[d, v] * (
                                    T.Cast("float32", dsn_s[TB - 1 - rr, d, v]) + b_r[d, v])
                            b_dg[d, v] = b_dgt[d, v]
                            b_z[d, v] = b_zt[d, v]

    return slot_normaliser_bwd


slot_normaliser_fwd_kernel.pass_configs = PASS_CONFIGS
slot_normaliser_bwd_kernel.pass_configs = PASS_CONFIGS


def _cu(s: torch.Tensor, cu_seqlens) -> torch.Tensor:
    B, T = s.shape[:2]
    if cu_seqlens is None:
        return torch.arange(0, B + 1, dtype=torch.int32, device=s.device) * T
    return cu_seqlens.to(torch.int32)


def _vec(D: int, *tensors: torch.Tensor) -> int:
    return VEC_ALIGNED if D % VEC_ALIGNED == 0 and all(t.data_ptr() % 16 == 0 for t in tensors) else 1


def _vectors(x: torch.Tensor, vec: int) -> torch.Tensor:
    """`[B, T, H, M]` contiguous as the kernels' `[rows, H * M // vec, vec]`."""
    return x.view(-1, x.shape[2] * x.shape[3] // vec, vec)


def slot_normaliser_fwd(s: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                        out_dtype: torch.dtype | None = None, **config):
    """ABC's (normalised slots `[B, T, H, M]` in `out_dtype` (default s's), log gates fp32, the running log-sum-exp
    z fp32 for the backward) from the raw slot logits `s` (bf16 / fp16 / fp32, CUDA): the forward of
    `fla_tl.reference.gsa.slot_gates` on TileLang scans; `config` overrides the tile config (kernel
    "slot_normaliser_fwd")."""
    s = s.contiguous()
    out_dtype = out_dtype or s.dtype
    D = s.shape[2] * s.shape[3]
    cu = _cu(s, cu_seqlens)
    sn = torch.empty_like(s, dtype=out_dtype)
    g, z = (torch.empty_like(s, dtype=torch.float32) for _ in range(2))
    vec = _vec(D, s, sn, g, z)
    config = tile_config("slot_normaliser_fwd", s.view(-1, 1, D), K=0, V=0, gate="none", N=cu.numel() - 1,
                         overrides=config)
    kernel = get_kernel(slot_normaliser_fwd_kernel, target_for(s.device), dtype=TORCH_TO_TL[s.dtype],
                        out_dtype=TORCH_TO_TL[out_dtype], VEC=vec, **config)
    kernel(_vectors(s, vec), cu, *(_vectors(x, vec) for x in (sn, g, z)))
    return sn, g, z


def slot_normaliser_bwd(s: torch.Tensor, z: torch.Tensor, dsn: torch.Tensor | None, dg: torch.Tensor | None,
                        cu_seqlens: torch.Tensor | None = None, **config) -> torch.Tensor:
    """ds in s's dtype from the gradients of the normalised slots `dsn` and of the log gates `dg` (None: zero) and
    the forward's z (:func:`slot_normaliser_fwd`); `config` overrides the tile config (kernel
    "slot_normaliser_bwd")."""
    s = s.contiguous()
    D = s.shape[2] * s.shape[3]
    cu = _cu(s, cu_seqlens)
    z = z.contiguous()
    dsn = torch.zeros_like(z) if dsn is None else dsn.contiguous()
    dg = torch.zeros_like(z) if dg is None else dg.float().contiguous()
    ds = torch.empty_like(s)
    vec = _vec(D, s, z, dsn, dg, ds)
    config = tile_config("slot_normaliser_bwd", s.view(-1, 1, D), K=0, V=0, gate="none", N=cu.numel() - 1,
                         overrides=config)
    kernel = get_kernel(slot_normaliser_bwd_kernel, target_for(s.device), dtype=TORCH_TO_TL[s.dtype],
                        dsn_dtype=TORCH_TO_TL[dsn.dtype], VEC=vec, **config)
    kernel(*(_vectors(x, vec) for x in (s, z, dsn, dg)), cu, _vectors(ds, vec))
    return ds
