"""The WY representation of the delta rule's chunks, shared by delta_rule and gated_delta_rule (and later KDA, RWKV7).

Per chunk of BT tokens with betas beta_i, keys k_i and, for gate "g", chunk-local cumulative log2 gates b_i (the
`gc` of `common.cumsum.chunk_gate_cumsum`; gate "none": b = 0):
  A_ij = beta_i (k_i . k_j) 2^(b_i - b_j) for i > j, 0 on and above the diagonal (both i, j inside the sequence);
  `solve_tril`: Ai = (I + A)^-1, fp32 `[Ttot, H, BT]` (row i of a chunk holds row i of its inverse);
  `apply_tril`: Ai diag(r) X for rows X `[Ttot, H, D]` and row scales r, in X's dtype (Ai and diag(r) X rounded to
  X's dtype for the tensor-core matmul, as fla). The WY pair is
  w = Ai diag(beta 2^b) K and u = Ai diag(beta) V (`wy_repr`), so that the chunk's state correction is
  u - w S (see `fla_tl.reference.delta_rule`).
The inverse is forward substitution in fp32 on CUDA cores, X_i = e_i - sum_{k < i} A_ik X_k, one 64-wide row per
step (A's key products run on tensor cores: exact products for bf16 / fp16 inputs, TF32 for fp32 ones, as fla).
Built and compile-tested; not yet run on a GPU (`tests/test_delta_rule.py::test_wy_kernels`).
"""

import tilelang.language as T
import torch

from .gates import gate_load, gate_or_dummy, gate_row, gate_state, head_decay
from .utils import TORCH_TO_TL, SeqMeta, cdiv, get_kernel, pad_dim, target_for


def solve_tril_kernel(K: int, dtype: str, beta_dtype: str, gate: str, BT: int = 64, threads: int = 128):
    KP = pad_dim(K)
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")

    @T.prim_func
    def solve_tril(
        k: T.Tensor([Ttot, H, K], dtype),
        beta: T.Tensor([Ttot, H], beta_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        ai: T.Tensor([Ttot, H, BT], "float32"),
    ):
        with T.Kernel(NT, H, threads=threads) as (i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)
            gate_load(gate, lg, gc, t0, nvalid, i_h, BT)

            k_s = T.alloc_shared([BT, KP], dtype)
            kb_s = T.alloc_shared([BT, KP], dtype)
            a_s = T.alloc_shared([BT, BT], "float32")
            x_s = T.alloc_shared([BT, BT], "float32")
            b_a = T.alloc_fragment([BT, BT], "float32")
            b_p = T.alloc_fragment([BT, BT], "float32")
            b_r = T.alloc_fragment([BT], "float32")

            for i, j in T.Parallel(BT, KP):
                k_s[i, j] = T.if_then_else(i < nvalid and j < K, k[t0 + i, i_h, j], 0)
                kb_s[i, j] = T.if_then_else(
                    i < nvalid and j < K, T.Cast(dtype, T.Cast("float32", k[t0 + i, i_h, j]) * beta[t0 + i, i_h]), 0
                )
            T.gemm(kb_s, k_s, b_a, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(BT, BT):
                a_s[i, j] = T.if_then_else(
                    i > j and i < nvalid, b_a[i, j] * T.exp2(gate_row(gate, lg, i) - gate_row(gate, lg, j)), 0
                )
                x_s[i, j] = T.if_then_else(i == j, 1.0, 0.0)
            # forward substitution: row i of the inverse from the rows above it (rows k >= i carry A_ik = 0)
            for i in T.serial(1, BT):
                for kk, j in T.Parallel(BT, BT):
                    b_p[kk, j] = a_s[i, kk] * x_s[kk, j]
                T.reduce_sum(b_p, b_r, dim=0)
                for j in T.Parallel(BT):
                    x_s[i, j] = T.if_then_else(i == j, 1.0, 0.0) - b_r[j]
            for i, j in T.Parallel(BT, BT):
                if i < nvalid:
                    ai[t0 + i, i_h, j] = x_s[i, j]

    return solve_tril


def apply_tril_kernel(D: int, dtype: str, beta_dtype: str, gate: str, BT: int = 64, BD: int = 64, threads: int = 128):
    """y = Ai diag(beta 2^b) x (gate "g") or Ai diag(beta) x, one [BT, BD] tile per block."""
    Ttot, H, N, NT, NG = T.dynamic("Ttot"), T.dynamic("H"), T.dynamic("N"), T.dynamic("NT"), T.dynamic("NG")
    ND = cdiv(D, BD)

    @T.prim_func
    def apply_tril(
        x: T.Tensor([Ttot, H, D], dtype),
        beta: T.Tensor([Ttot, H], beta_dtype),
        g_gamma: T.Tensor([H], "float32"),
        gc: T.Tensor([NG, H], "float32"),
        ai: T.Tensor([Ttot, H, BT], "float32"),
        cu: T.Tensor([N + 1], "int32"),
        chunk_indices: T.Tensor([NT, 2], "int32"),
        y: T.Tensor([Ttot, H, D], dtype),
    ):
        with T.Kernel(ND, NT, H, threads=threads) as (i_d, i_c, i_h):
            i_n = chunk_indices[i_c, 0]
            t0 = cu[i_n] + chunk_indices[i_c, 1] * BT
            nvalid = T.min(cu[i_n + 1] - t0, BT)
            lg = gate_state(gate, g_gamma, i_h, BT)
            gate_load(gate, lg, gc, t0, nvalid, i_h, BT)

            ai_s = T.alloc_shared([BT, BT], dtype)
            x_s = T.alloc_shared([BT, BD], dtype)
            b_y = T.alloc_fragment([BT, BD], "float32")
            for i, j in T.Parallel(BT, BT):
                ai_s[i, j] = T.if_then_else(i < nvalid and j < nvalid, ai[t0 + i, i_h, j], 0)
            for i, j in T.Parallel(BT, BD):
                x_s[i, j] = T.if_then_else(
                    i < nvalid and i_d * BD + j < D,
                    T.Cast(dtype, T.Cast("float32", x[t0 + i, i_h, i_d * BD + j]) * beta[t0 + i, i_h]
                           * T.exp2(gate_row(gate, lg, i))),
                    0,
                )
            T.gemm(ai_s, x_s, b_y, clear_accum=True)
            for i, j in T.Parallel(BT, BD):
                if i < nvalid and i_d * BD + j < D:
                    y[t0 + i, i_h, i_d * BD + j] = b_y[i, j]

    return apply_tril


def solve_tril(k, beta, *, meta: SeqMeta, gate: str = "none", gc=None, BT: int = 64):
    """(I + A)^-1 per chunk, fp32 `[Ttot, H, BT]`; k `[Ttot, H, K]`, beta `[Ttot, H]`, gc `[Ttot, H]` for gate "g"."""
    Ttot, H, K = k.shape
    ai = k.new_empty(Ttot, H, BT, dtype=torch.float32)
    if meta.NT == 0:
        return ai
    kernel = get_kernel(solve_tril_kernel, target_for(k.device), K=K, dtype=TORCH_TO_TL[k.dtype],
                        beta_dtype=TORCH_TO_TL[beta.dtype], gate=gate, BT=BT)
    # the gate hooks take a per-head constant; gc already carries any (a zero one here)
    kernel(k, beta, head_decay(None, H, k.device), gate_or_dummy(gc, k), meta.cu, meta.chunk_indices, ai)
    return ai


def apply_tril(x, beta, ai, *, meta: SeqMeta, gate: str = "none", gc=None, BT: int = 64):
    """Ai diag(beta [2^b]) x `[Ttot, H, D]` in x's dtype."""
    Ttot, H, D = x.shape
    y = torch.empty_like(x)
    if meta.NT == 0:
        return y
    kernel = get_kernel(apply_tril_kernel, target_for(x.device), D=D, dtype=TORCH_TO_TL[x.dtype],
                        beta_dtype=TORCH_TO_TL[beta.dtype], gate=gate, BT=BT)
    kernel(x, beta, head_decay(None, H, x.device), gate_or_dummy(gc, x), ai, meta.cu, meta.chunk_indices, y)
    return y


def wy_repr(k, v, beta, *, meta: SeqMeta, gc=None, BT: int = 64):
    """(w = Ai diag(beta 2^b) K, u = Ai diag(beta) V, Ai): the WY pair of every chunk; gc None means no gate."""
    gate = "g" if gc is not None else "none"
    k, v, beta = k.contiguous(), v.contiguous(), beta.contiguous()
    ai = solve_tril(k, beta, meta=meta, gate=gate, gc=gc, BT=BT)
    w = apply_tril(k, beta, ai, meta=meta, gate=gate, gc=gc, BT=BT)
    u = apply_tril(v, beta, ai, meta=meta, gate="none", BT=BT)
    return w, u, ai
