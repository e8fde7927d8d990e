"""Based's and ReBased's public ops: fused_chunk_based (the chunked Taylor-feature kernels of `fused_chunk.py`),
parallel_based and parallel_rebased (the attention-form kernels of `parallel.py`).

The kernel-level call (`SCHEMA`): q, k `[B, T, H, K]`, v `[B, T, H, V]` and the score's scale; it returns the
unnormalised (o `[B, T, H, V]`, z `[B, T, H]`) in fp32 (fp64 for fp64 inputs), as the kernels do. The normalisation
`o / (z + eps)`, ReBased's `use_scale` and `return_both` layout are PyTorch in the public functions.
"""

import torch

from ...autotune.configs import BASED_CHUNK_MAX_K, PARALLEL_BASED_MAX_K
from ...reference.based import attention_form, based_feature, rebased_feature, recurrent_based, recurrent_rebased
from ...registry import (
    Backend,
    KernelSpec,
    OpSpec,
    check_backend_name,
    describe_inputs,
    register,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case, reference_dtype
from ...utils import join_graph, validate_linear_attention_inputs

SCHEMA = "Tensor q, Tensor k, Tensor v, float scale"
FUSED_CHUNK_MODULE = "fla_tl.kernels.based.fused_chunk"
PARALLEL_MODULE = "fla_tl.kernels.based.parallel"


def _check_head_dim(name: str, q: torch.Tensor, limit: int) -> None:
    if q.shape[-1] > limit:
        raise ValueError(f"{name}: the feature dim K must be <= {limit} (fla's limit), got {q.shape[-1]}")


def _based_run(spec: OpSpec, q, k, v, scale: float, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """the unnormalised (o, z) of the op's kernel-level call; for T = 0 no kernel runs and the empty outputs still
    reach the autograd graph of q, k, v (zero gradients)."""
    if q.shape[1] == 0:
        check_backend_name(spec, backend)
        o, z = _fake(dict(q=q, v=v))
        return tuple(join_graph([o, z], (q, k, v)))
    return tuple(spec.run(backend, q=q, k=k, v=v, scale=float(scale)))


def _describe(args: dict, backward: bool):
    return describe_inputs(args["q"], args["v"], None, None, backward)


def _fake(args: dict) -> list:
    q, v = args["q"], args["v"]
    acc = reference_dtype(q.dtype)
    return [q.new_empty(q.shape[:3] + v.shape[-1:], dtype=acc), q.new_empty(q.shape[:3], dtype=acc)]


def _tilelang(module: str, launchers, extra_reasons, description: str) -> Backend:
    """the tilelang backend on `launchers() -> (fwd(q, k, v, scale=), bwd(q, k, v, do, dz, scale=))` of `module`."""

    def fwd(q, k, v, scale, requires_grad):
        launch, _ = launchers()
        return launch(q.contiguous(), k.contiguous(), v.contiguous(), scale=scale)

    def bwd(args, outputs, grads):
        _, launch = launchers()
        q, k, v = args["q"], args["k"], args["v"]
        do, dz = grads
        do = torch.zeros(q.shape[:3] + v.shape[-1:], dtype=q.dtype, device=q.device) if do is None else do.to(q.dtype)
        dz = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device) if dz is None else dz.to(torch.float32)
        dq, dk, dv = launch(q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(), dz.contiguous(),
                            scale=args["scale"])
        return {"q": dq, "k": dk, "v": dv}

    caps = tilelang_capabilities(varlen=False, initial_state=False)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, module=module, extra_reasons=extra_reasons,
                   description=description)


def make_fused_chunk_based_backend() -> Backend:
    """the tilelang backend of fused_chunk_based: the chunked kernels of `fused_chunk.py`, which form the Taylor
    features of the 16-dim keys and queries on the fly (K <= 16, fla's limit; V <= 256), forward and backward; fp32
    inputs run the attention-form kernels."""

    def launchers():
        from .fused_chunk import fused_chunk_based_bwd, fused_chunk_based_fwd

        return fused_chunk_based_fwd, fused_chunk_based_bwd

    def extra_reasons(inputs) -> list[str]:
        if inputs.K > BASED_CHUNK_MAX_K:
            return [f"K = {inputs.K} > 16 (fla's limit for fused_chunk_based: its Taylor features grow as K^2)"]
        return []

    return _tilelang(FUSED_CHUNK_MODULE, launchers, extra_reasons,
                     "chunked Taylor features, TileLang kernels (K <= 16, V <= 256), fwd and bwd")


def make_parallel_based_backend(based: bool) -> Backend:
    """the tilelang backend of parallel_based / parallel_rebased: the attention-form kernels of `parallel.py`
    (K <= 128, V <= 256), forward and backward."""

    def launchers():
        from .parallel import parallel_based_bwd, parallel_based_fwd

        def fwd(q, k, v, *, scale):
            return parallel_based_fwd(q, k, v, scale=scale, based=based)

        def bwd(q, k, v, do, dz, *, scale):
            return parallel_based_bwd(q, k, v, do, dz, scale=scale, based=based)

        return fwd, bwd

    def extra_reasons(inputs) -> list[str]:
        if inputs.K > PARALLEL_BASED_MAX_K:
            return [f"K = {inputs.K} > 128 (fla's limit for the attention form)"]
        return []

    return _tilelang(PARALLEL_MODULE, launchers, extra_reasons,
                     "attention form, TileLang kernels (K <= 128, V <= 256), fwd and bwd")


def _torch(feature) -> Backend:
    """the attention form of `fla_tl.reference.based` (query blocks), unnormalised, in fp32 (fp64 for fp64)."""

    def run(q, k, v, scale):
        o, z = attention_form(q, k, v, scale, feature)
        return o.transpose(1, 2).contiguous(), z.transpose(1, 2).contiguous()

    return torch_backend(run, torch_capabilities(varlen=False, initial_state=False))


def _fused_chunk_kernels(D: int, dtype: str) -> list[KernelSpec]:
    """q, k of fla's feature dim 16 and V = D at the launchers' tiles; fp32 inputs take the attention form."""
    if dtype == "float32":
        return _parallel_kernels(BASED_CHUNK_MAX_K, D, dtype, based=True)
    from ...autotune.resolve import heuristic_config
    from ..common.state_op import stage_spec

    # every default the grid can pick (`based_chunk_heuristic`): a full grid, and one block on many multiprocessors
    K = BASED_CHUNK_MAX_K
    names = [f"based_{name}_fused_chunk" for name in ("fwd", "bwd_dq", "bwd_dkv")]
    specs = []
    for name in names:
        configs = [heuristic_config(name, K, D, dtype, grid=grid) for grid in (None, (1, 1 << 10))]
        specs += [stage_spec(name, K, D, dtype, "none", c) for i, c in enumerate(configs) if c not in configs[:i]]
    return specs


def _parallel_kernels(K: int, V: int, dtype: str, based: bool) -> list[KernelSpec]:
    """the attention-form kernels at head dims K (<= 128), V and the launchers' tiles."""
    from ..common.state_op import stage_spec

    if K > PARALLEL_BASED_MAX_K:
        return []
    return [stage_spec(name, K, V, dtype, "none", based=based)
            for name in ("parallel_based_fwd", "parallel_based_bwd_dq", "parallel_based_bwd_dkv")]


def _cases(reference, norm_option: str):
    """(2, 70, 2, 16) q, k, v against the token-by-token recurrence on the explicit feature map, normalised or not."""

    def cases(device, dtype):
        q, k, v = (torch.randn(2, 70, 2, 16, device=device).to(dtype) for _ in range(3))
        return [Case(label, dict(q=q, k=k, v=v, **{norm_option: norm}), ("q", "k", "v"), reference, outputs=("o",),
                     dtype=dtype, out_dtypes={"o": dtype})
                for label, norm in (("dense", True), ("dense unnormalised", False))]

    return cases


def _spec(name: str, variant: str, mode: str, reference, tilelang: Backend, feature, kernels, cases) -> OpSpec:
    return OpSpec(name=name, variant=variant, mode=mode, reference=reference, backends=[tilelang, _torch(feature)],
                  schema=SCHEMA, outputs=2, grads=("q", "k", "v"), describe=_describe, fake=_fake, kernels=kernels,
                  cases=cases)


FUSED_CHUNK = _spec("fused_chunk_based", "based", "fused_chunk", recurrent_based, make_fused_chunk_based_backend(),
                    based_feature, _fused_chunk_kernels, _cases(recurrent_based, "use_norm"))
PARALLEL_BASED = _spec("parallel_based", "based", "parallel", recurrent_based, make_parallel_based_backend(True),
                       based_feature, lambda D, dtype: _parallel_kernels(D, D, dtype, based=True),
                       _cases(recurrent_based, "use_norm"))
PARALLEL_REBASED = _spec("parallel_rebased", "rebased", "parallel", recurrent_rebased,
                         make_parallel_based_backend(False), rebased_feature,
                         lambda D, dtype: _parallel_kernels(D, D, dtype, based=False),
                         _cases(recurrent_rebased, "use_normalize"))


@register(FUSED_CHUNK)
def fused_chunk_based(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    use_norm: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    r"""
    Based: causal linear attention with the 2nd-order Taylor feature map, `a_ij = 1 + s_ij + s_ij^2 / 2`,
    `s_ij = scale * q_i . k_j`; normalised by `sum_j a_ij + 1e-6` when `use_norm`. `[B, T, H, K]` with `K <= 16`
    (fla's limit); returns `o` `[B, T, H, V]`. `scale` defaults to `K ** -0.5`; a non-finite one raises `ValueError`.

    Range: the feature map is computed in fp32 (fp64 for fp64 inputs) and overflows for large `|s_ij|`: `s_ij^2`
    passes fp32's 3.4e38 near `|s_ij| ~ 1.8e19`, and the sums over `j` (up to T terms) reach it sooner; the output
    is then inf / NaN, as with fla. With bf16 / fp16 inputs the output is cast to q's dtype, whose range is the
    tighter limit (fp16: 65504, reached by the unnormalised output of `use_norm=False` long before fp32 overflows).

    Examples::
        >>> q, k, v = torch.randn(2, 300, 4, 16), torch.randn(2, 300, 4, 16), torch.randn(2, 300, 4, 64)
        >>> o = fused_chunk_based(q, k, v)
    """
    validate_linear_attention_inputs(q, k, v, scale=scale)
    _check_head_dim("fused_chunk_based", q, BASED_CHUNK_MAX_K)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, z = _based_run(FUSED_CHUNK, q, k, v, scale, backend)
    return (o / (z[..., None] + 1e-6) if use_norm else o).to(q.dtype)


@register(PARALLEL_BASED)
def parallel_based(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    use_norm: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    r"""
    Based in the parallel (attention) form; same math as :func:`fused_chunk_based` with `K <= 128`.

    `scale` defaults to `K ** -0.5`; a non-finite one raises `ValueError`. Range: the Taylor feature map
    `1 + s + s^2 / 2` (`s = scale * q_i . k_j`) is computed in fp32 (fp64 for fp64 inputs) and overflows when
    `|s|` nears 1.8e19 (`s^2` passes fp32's 3.4e38; the sums over up to T keys reach it sooner), giving inf / NaN as
    fla does; with bf16 / fp16 inputs the output dtype's range is the tighter limit (fp16: 65504, reached first by
    the unnormalised output of `use_norm=False`).

    Examples::
        >>> q, k, v = torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64)
        >>> o = parallel_based(q, k, v, use_norm=False)
    """
    validate_linear_attention_inputs(q, k, v, scale=scale)
    _check_head_dim("parallel_based", q, PARALLEL_BASED_MAX_K)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, z = _based_run(PARALLEL_BASED, q, k, v, scale, backend)
    return (o / (z[..., None] + 1e-6) if use_norm else o).to(q.dtype)


@register(PARALLEL_REBASED)
def parallel_rebased(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-5,
    use_scale: bool = True,
    use_normalize: bool = True,
    return_both: bool = False,
    backend: str | None = None,
):
    r"""
    ReBased: causal linear attention with the squared feature map, `a_ij = s_ij^2`, `s_ij = scale * q_i . k_j`
    (`scale = K ** -0.5` when `use_scale`, else 1); normalised by `sum_j a_ij + eps` when `use_normalize`. `K <= 128`.
    Returns `o` `[B, T, H, V]`, or with `return_both` the unnormalised `o` `[B, H, T, V]` and `z` `[B, H, T]` (fla's
    layout), in q's dtype.

    Examples::
        >>> q, k, v = torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64), torch.randn(2, 300, 4, 64)
        >>> o = parallel_rebased(q, k, v)
    """
    validate_linear_attention_inputs(q, k, v)
    _check_head_dim("parallel_rebased", q, PARALLEL_BASED_MAX_K)
    o, z = _based_run(PARALLEL_REBASED, q, k, v, q.shape[-1] ** -0.5 if use_scale else 1.0, backend)
    if return_both:
        return o.transpose(1, 2).to(q.dtype), z.transpose(1, 2).to(q.dtype)
    return (o / (z[..., None] + eps) if use_normalize else o).to(q.dtype)
