"""Based and ReBased on the linear-attention kernels, through their feature maps (K <= 16; `fused_chunk_based`).

A polynomial kernel is a dot product of feature maps, so causal Based / ReBased attention is linear attention (no
decay) on phi(q), phi(k), with a ones column appended to v for the normaliser z:
  Based:   phi(x) = [1, x, x_i x_j (i < j), x_i^2 / sqrt(2)],  phi(a) . phi(b) = 1 + a.b + (a.b)^2 / 2
  ReBased: phi(x) = [x_i x_j sqrt(2) (i < j), x_i^2],         phi(a) . phi(b) = (a.b)^2
With K <= 16 the features have at most 1 + 16 + 136 = 153 dims, within the kernels' 256. The maps, the ones column
and the final division are PyTorch (differentiable) around `chunk_simple_gla`'s TileLang kernels.
"""

import torch

MAX_K = 16


def feature_map(x: torch.Tensor, based: bool) -> torch.Tensor:
    """`[..., K]` -> `[..., F]`, F = 1 + K + K(K+1)/2 (Based) or K(K+1)/2 (ReBased). The pair products x_i x_j (i < j,
    row-major) are built from slices, whose backward is dense (a gather `x[..., i]` had an atomic scatter for its
    backward: 25 ms of fused_chunk_based's 150 at 8x4096x16 on the H100)."""
    K = x.shape[-1]
    cross = torch.cat([x[..., a : a + 1] * x[..., a + 1 :] for a in range(K)], -1)
    square = x * x
    if based:
        return torch.cat([torch.ones_like(x[..., :1]), x, cross, square * (0.5 ** 0.5)], -1)
    return torch.cat([cross * (2 ** 0.5), square], -1)


def feature_attention(q, k, v, scale: float, based: bool, backend: str | None = None):
    """(o `[B, T, H, V]`, z `[B, T, H]`), both fp32 (fp64 for fp64 inputs): unnormalised causal attention with the
    polynomial kernel, by linear attention on the feature maps (`fla_tl.ops.chunk_simple_gla`, no decay). The maps and
    the kernels run in fp32 (TF32 matmuls) whatever the input dtype: ReBased's normaliser z = sum_j (q.k_j)^2 has no
    constant term and can be tiny, and a bf16 z or feature map made dq miss the bf16 tolerance on the GPU (relative
    RMS error 8.8e-2)."""
    from ...ops import chunk_simple_gla

    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    fq, fk = feature_map(q * scale, based), feature_map(k, based)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    o1, _ = chunk_simple_gla(fq, fk, v1, scale=1.0, backend=backend)
    return o1[..., :-1], o1[..., -1]
