"""Titans (linear memory): the chunked forward as one TileLang kernel, and the differentiable
`chunk_titans_linear_tl`.

Per chunk of BT tokens, with the memory M and momentum S entering it (both `[D, D]`, fp32 in registers), the
in-chunk coefficients beta, f, G, and the last rows gL = G[L], nL = N[L] and (beta_L, f_L, m_L) of
`fla_tl.reference.titans` (computed by PyTorch glue, `titans_chunk_coefs`, for all chunks at once):
  X = K M, Vn = vn(X, K, V) (fla's layer-norm gradient), O = diag(beta) Q M + diag(f) Q S - 2 A Vn,
  o = O + LN(O) w + b,   M <- beta_L M + f_L S - 2 (K * gL)^T Vn,   S <- m_L S - 2 (K * nL)^T Vn.
A = Q K^T * G (lower triangle) is one batched matmul of the glue (a [BT, BT] gemm has no warp partition for 8 warps).
One block per (sequence, head) walks the chunks (vn needs the whole row of K M). The backward is the autograd of the
chunked PyTorch form (recompute): no TileLang backward yet.
"""

import tilelang.language as T
import torch
import torch.nn.functional as F

from ...reference.titans import chunk_titans_linear_torch, titans_chunk_scalars
from ..common.utils import TORCH_TO_TL, cdiv, get_kernel, state_or_dummy, target_for


def titans_fwd_chunk_kernel(
    D: int,
    dtype: str,
    # kernel config
    BT: int = 16,
    threads: int = 256,
):
    B, Tn, H, NT = T.dynamic("B"), T.dynamic("Tn"), T.dynamic("H"), T.dynamic("NT")
    NH0, NHT = T.dynamic("NH0"), T.dynamic("NHT")

    @T.prim_func
    def titans_fwd_chunk(
        q: T.Tensor([B, Tn, H, D], dtype),
        k: T.Tensor([B, Tn, H, D], dtype),
        v: T.Tensor([B, Tn, H, D], dtype),
        w: T.Tensor([H, D], "float32"),
        bias: T.Tensor([H, D], "float32"),
        beta: T.Tensor([B, H, NT, BT], "float32"),
        f: T.Tensor([B, H, NT, BT], "float32"),
        A: T.Tensor([B, H, NT, BT, BT], "float32"),
        gL: T.Tensor([B, H, NT, BT], "float32"),
        nL: T.Tensor([B, H, NT, BT], "float32"),
        cL: T.Tensor([B, H, NT, 4], "float32"),
        h0: T.Tensor([NH0, D, D], "float32"),
        o: T.Tensor([B, Tn, H, D], dtype),
        ht: T.Tensor([NHT, D, D], "float32"),
        eps: T.float32,
        use_h0: T.int32,
        store_ht: T.int32,
    ):
        with T.Kernel(B * H, threads=threads) as i_bh:
            i_b = i_bh // H
            i_h = i_bh % H

            q_s = T.alloc_shared([BT, D], dtype)
            k_s = T.alloc_shared([BT, D], dtype)
            m_s = T.alloc_shared([D, D], dtype)
            s_s = T.alloc_shared([D, D], dtype)
            vn_s = T.alloc_shared([BT, D], dtype)
            kg_s = T.alloc_shared([BT, D], dtype)
            kn_s = T.alloc_shared([BT, D], dtype)
            a_s = T.alloc_shared([BT, BT], dtype)
            b_m = T.alloc_fragment([D, D], "float32")
            b_s = T.alloc_fragment([D, D], "float32")
            x_s = T.alloc_shared([BT, D], "float32")
            o_s = T.alloc_shared([BT, D], "float32")
            b_km = T.alloc_fragment([BT, D], "float32")  # gemm accumulators: K M and A Vn
            # row-reduced tiles in a layout of their own (a reduce over a gemm-accumulator layout does not lower)
            b_x = T.alloc_fragment([BT, D], "float32")  # K M, then its normalised form
            b_g = T.alloc_fragment([BT, D], "float32")
            b_t = T.alloc_fragment([BT, D], "float32")
            b_qm = T.alloc_fragment([BT, D], "float32")
            b_qs = T.alloc_fragment([BT, D], "float32")
            b_o = T.alloc_fragment([BT, D], "float32")
            r_1 = T.alloc_fragment([BT], "float32")
            r_2 = T.alloc_fragment([BT], "float32")
            r_std = T.alloc_fragment([BT], "float32")

            T.clear(b_s)
            T.clear(b_m)
            if use_h0 == 1:
                for i, j in T.Parallel(D, D):
                    b_m[i, j] = h0[i_bh, i, j]

            for c in T.serial(T.ceildiv(Tn, BT)):
                t0 = c * BT
                for i, j in T.Parallel(BT, D):
                    q_s[i, j] = T.if_then_else(t0 + i < Tn, q[i_b, t0 + i, i_h, j], 0)
                    k_s[i, j] = T.if_then_else(t0 + i < Tn, k[i_b, t0 + i, i_h, j], 0)
                T.copy(b_m, m_s)
                T.copy(b_s, s_s)
                T.gemm(k_s, m_s, b_km, clear_accum=True)  # [BT, D]
                T.gemm(q_s, m_s, b_qm, clear_accum=True)
                T.gemm(q_s, s_s, b_qs, clear_accum=True)

                # Vn from X = K M: x^ = LN(x), g = (w x^ + b - v + k) w, vn = D g - sum(g)/(s D) - x^ sum(g x^)/(s D)
                T.copy(b_km, x_s)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = x_s[i, j]
                T.reduce_sum(b_x, r_1, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = b_x[i, j] - r_1[i] / D
                    b_t[i, j] = b_x[i, j] * b_x[i, j]
                T.reduce_sum(b_t, r_2, dim=1)
                for i in T.Parallel(BT):
                    r_std[i] = T.sqrt(r_2[i] / D + eps)
                for i, j in T.Parallel(BT, D):
                    b_x[i, j] = b_x[i, j] / r_std[i]
                    b_g[i, j] = (w[i_h, j] * b_x[i, j] + bias[i_h, j]
                                 - T.if_then_else(t0 + i < Tn, v[i_b, t0 + i, i_h, j], 0) + k_s[i, j]) * w[i_h, j]
                    b_t[i, j] = b_g[i, j] * b_x[i, j]
                T.reduce_sum(b_g, r_1, dim=1)
                T.reduce_sum(b_t, r_2, dim=1)
                for i, j in T.Parallel(BT, D):
                    vn_s[i, j] = T.if_then_else(
                        t0 + i < Tn, D * b_g[i, j] - (r_1[i] + b_x[i, j] * r_2[i]) / (r_std[i] * D), 0)
                    kg_s[i, j] = k_s[i, j] * (-2.0 * gL[i_b, i_h, c, i])
                    kn_s[i, j] = k_s[i, j] * (-2.0 * nL[i_b, i_h, c, i])
                for i, j in T.Parallel(BT, BT):
                    a_s[i, j] = A[i_b, i_h, c, i, j]
                T.gemm(a_s, vn_s, b_km, clear_accum=True)  # [BT, D]

                # O = beta Q M + f Q S - 2 A Vn, then o = O + LN(O) w + b
                for i, j in T.Parallel(BT, D):
                    o_s[i, j] = beta[i_b, i_h, c, i] * b_qm[i, j] + f[i_b, i_h, c, i] * b_qs[i, j] - 2.0 * b_km[i, j]
                for i, j in T.Parallel(BT, D):
                    b_o[i, j] = o_s[i, j]
                T.reduce_sum(b_o, r_1, dim=1)
                for i, j in T.Parallel(BT, D):
                    b_t[i, j] = (b_o[i, j] - r_1[i] / D) * (b_o[i, j] - r_1[i] / D)
                T.reduce_sum(b_t, r_2, dim=1)
                for i in T.Parallel(BT):
                    r_std[i] = T.sqrt(r_2[i] / D + eps)
                for i, j in T.Parallel(BT, D):
                    if t0 + i < Tn:
                        o[i_b, t0 + i, i_h, j] = (b_o[i, j] + (b_o[i, j] - r_1[i] / D) / r_std[i] * w[i_h, j]
                                                  + bias[i_h, j])

                # M <- beta_L M + f_L S + (-2 K gL)^T Vn,  S <- m_L S + (-2 K nL)^T Vn
                for i, j in T.Parallel(D, D):
                    b_m[i, j] = cL[i_b, i_h, c, 0] * b_m[i, j] + cL[i_b, i_h, c, 1] * b_s[i, j]
                    b_s[i, j] = cL[i_b, i_h, c, 2] * b_s[i, j]
                T.gemm(kg_s, vn_s, b_m, transpose_A=True)
                T.gemm(kn_s, vn_s, b_s, transpose_A=True)

            if store_ht == 1:
                for i, j in T.Parallel(D, D):
                    ht[i_bh, i, j] = b_m[i, j]

    return titans_fwd_chunk


def titans_chunk_coefs(theta, alpha, eta, BT: int):
    """fp32 in-chunk coefficients of every chunk from `[B, T, H]` scalars: beta, f, gL, nL `[B, H, NT, BT]`, G
    `[B, H, NT, BT, BT]` and (beta_L, f_L, m_L, 0) `[B, H, NT, 4]` at each chunk's last token. The tokens past T are
    padded with theta = alpha = 0, eta = 1 (rows past the end never reach an output)."""
    B, T, H = theta.shape
    NT = cdiv(T, BT)
    pad = NT * BT - T
    theta, alpha, eta = (x.float().transpose(1, 2) for x in (theta, alpha, eta))
    theta, alpha = F.pad(theta, (0, pad)), F.pad(alpha, (0, pad))
    eta = F.pad(eta, (0, pad), value=1.0)
    beta, f, G, N, m = titans_chunk_scalars(*(x.view(B, H, NT, BT) for x in (theta, alpha, eta)))
    last = torch.full((NT,), BT - 1, device=theta.device)
    last[-1] = (T - 1) % BT
    ar = torch.arange(NT, device=theta.device)
    gL, nL = G[:, :, ar, last], N[:, :, ar, last]
    cL = torch.stack([beta[:, :, ar, last], f[:, :, ar, last], m[:, :, ar, last], torch.zeros_like(m[..., 0])], -1)
    return beta.contiguous(), f.contiguous(), G.contiguous(), gL.contiguous(), nL.contiguous(), cL.contiguous()


def titans_fwd(q, k, v, w, b, theta, alpha, eta, *, eps: float, chunk_size: int, initial_state,
               output_final_state: bool, threads: int = 256):
    """(o `[B, T, H, D]` in q's dtype, final memory fp32 `[B, H, D, D]` or None) by the TileLang kernel."""
    B, T, H, D = q.shape
    BT = chunk_size
    beta, f, G, gL, nL, cL = titans_chunk_coefs(theta.reshape(B, T, H), alpha.reshape(B, T, H),
                                                eta.reshape(B, T, H), BT)
    # the in-chunk attention (Q K^T * G), lower triangle incl. the diagonal: a batched matmul of the glue
    pad = G.shape[2] * BT - T
    qc, kc = ((F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).view(B, -1, BT, H, D).permute(0, 3, 1, 2, 4)
              for x in (q, k))
    A = (torch.matmul(qc, kc.transpose(-1, -2)).float() * G).tril().contiguous()
    o = torch.empty_like(q)
    ht = q.new_empty(B * H if output_final_state else 1, D, D, dtype=torch.float32)
    h0, use_h0 = state_or_dummy(initial_state, q, (D, D))
    kernel = get_kernel(titans_fwd_chunk_kernel, target_for(q.device), D=D, dtype=TORCH_TO_TL[q.dtype], BT=BT,
                        threads=threads)
    kernel(q.contiguous(), k.contiguous(), v.contiguous(), w.reshape(H, D).float().contiguous(),
           b.reshape(H, D).float().contiguous(), beta, f, A, gL, nL, cL, h0, o, ht, float(eps), use_h0,
           int(output_final_state))
    return o, (ht.view(B, H, D, D) if output_final_state else None)


class ChunkTitansLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, b, theta, alpha, eta, initial_state, eps, chunk_size, output_final_state):
        o, ht = titans_fwd(q, k, v, w, b, theta, alpha, eta, eps=eps, chunk_size=chunk_size,
                           initial_state=initial_state, output_final_state=output_final_state)
        ctx.save_for_backward(q, k, v, w, b, theta, alpha, eta, initial_state)
        ctx.eps, ctx.chunk_size, ctx.output_final_state = eps, chunk_size, output_final_state
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        # the autograd of the chunked PyTorch form, recomputed in fp32 (no TileLang backward yet)
        saved = ctx.saved_tensors
        inputs = [x.detach().float().requires_grad_() if x is not None else None for x in saved]
        with torch.enable_grad():
            o, ht = chunk_titans_linear_torch(*inputs[:8], ctx.eps, ctx.chunk_size, inputs[8],
                                              dht is not None and ctx.output_final_state)
            outs, grads_out = [o], [do.float()]
            if ht is not None:
                outs.append(ht)
                grads_out.append(dht.float())
            needed = [x for x in inputs if x is not None]
            grads = iter(torch.autograd.grad(outs, needed, grads_out, allow_unused=True))
        result = []
        for x, s in zip(inputs, saved):
            g = next(grads) if x is not None else None
            result.append(g.to(s.dtype) if g is not None else None)
        return (*result, None, None, None)


def chunk_titans_linear_tl(q, k, v, w, b, theta, alpha, eta, eps: float = 1e-6, chunk_size: int = 16,
                           initial_state=None, output_final_state: bool = False):
    """Titans (linear memory) by the TileLang forward kernel, differentiable (see the module docstring)."""
    return ChunkTitansLinearFunction.apply(q, k, v, w, b, theta, alpha, eta, initial_state, float(eps),
                                           int(chunk_size), bool(output_final_state))
