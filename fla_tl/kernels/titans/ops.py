"""Titans' public op: chunk_titans_linear (fla's linear memory), on the chunked kernels of `chunk.py`.

The kernel-level call (`SCHEMA`): q, k, v `[B, T, H, D]`, the layer norm's w, b (H * D elements), theta, alpha, eta
(`[B, T, H, 1]` or `[B, T, H]`), the initial memory `[B, H, D, D]`, eps, chunk_size and `output_final_state`; it
returns (o `[B, T, H, D]` in q's dtype, the final memory `[B, H, D, D]` in fp32, fp64 for fp64 inputs, or None). The
TileLang kernels take chunk sizes `TITANS_TL_CHUNK_SIZES` only: the chunk size goes to the verifier through
`OpInputs.options`, so an automatic choice falls back to the torch backend and a requested tilelang raises.
"""

import torch

from ...autotune.configs import TITANS_MAX_D
from ...reference.titans import chunk_titans_linear_torch, recurrent_titans_linear
from ...registry import (
    AUTO,
    Backend,
    KernelSpec,
    OpSpec,
    check_backend_name,
    describe_inputs,
    register,
    select_backend,
    tilelang_capabilities,
    torch_backend,
    torch_capabilities,
)
from ...testing import Case, reference_dtype
from ...utils import check_device, check_tensor, join_graph

TITANS_TL_CHUNK_SIZES = (16, 32, 64)
MODULE = "fla_tl.kernels.titans.chunk"
SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor w, Tensor b, Tensor theta, Tensor alpha, Tensor eta, "
          "Tensor? initial_state, float eps, int chunk_size, bool output_final_state")
TENSORS = ("q", "k", "v", "w", "b", "theta", "alpha", "eta", "initial_state")


def _validate_titans(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state) -> None:
    """the checks of chunk_titans_linear, each error naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v), ("w", w), ("b", b), ("theta", theta), ("alpha", alpha),
                    ("eta", eta)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.device != q.device:
            raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {x.device}")
    if q.dim() != 4:
        raise ValueError(f"`q` must have shape [B, T, H, D], got {tuple(q.shape)}")
    B, T, H, D = q.shape
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"`{name}` must have the shape of `q` [B, T, H, D] = {list(q.shape)} (fla requires DK == "
                             f"DV), got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"`{name}` must have the dtype of `q` ({q.dtype}), got {x.dtype}")
    if D == 0:
        raise ValueError("`q` must have a head dim D > 0")
    for name, x in (("w", w), ("b", b)):
        if x.numel() != H * D:
            raise ValueError(f"`{name}` must have H * D = {H * D} elements ([H, D] = [{H}, {D}]), got shape "
                             f"{tuple(x.shape)}")
    for name, x in (("theta", theta), ("alpha", alpha), ("eta", eta)):
        if tuple(x.shape) not in ((B, T, H, 1), (B, T, H)):
            raise ValueError(f"`{name}` must have shape [B, T, H, 1] = {[B, T, H, 1]} (or [B, T, H]), got "
                             f"{tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"`eps` must be a positive number, got {eps!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_device("initial_state", initial_state, q.device)
        if tuple(initial_state.shape) != (B, H, D, D):
            raise ValueError(f"`initial_state` must have shape [B, H, D, D] = {[B, H, D, D]}, got "
                             f"{tuple(initial_state.shape)}")


def _describe(args: dict, backward: bool):
    q = args["q"]
    return describe_inputs(q, q, args["initial_state"], None, backward, chunk_size=args["chunk_size"])


def _fake(args: dict) -> list:
    q = args["q"]
    B, T, H, D = q.shape
    ht = q.new_empty(B, H, D, D, dtype=reference_dtype(q.dtype)) if args["output_final_state"] else None
    return [q.new_empty(q.shape), ht]


def _extra_reasons(inputs) -> list[str]:
    reasons = []
    if inputs.K % 16:
        reasons.append(f"D = {inputs.K} is not a multiple of 16")
    chunk_size = inputs.options.get("chunk_size")
    if chunk_size is not None and chunk_size not in TITANS_TL_CHUNK_SIZES:
        reasons.append(f"chunk_size = {chunk_size} is not one of the kernels' {TITANS_TL_CHUNK_SIZES}")
    return reasons


def make_titans_backend() -> Backend:
    """the tilelang backend of chunk_titans_linear: `chunk.py` (one block per sequence and head walks the chunks with
    the memory and momentum in registers; the backward walks them in reverse from the states the forward stored, or
    recomputes the chunked PyTorch form where the TileLang backward does not run)."""

    def fwd(q, k, v, w, b, theta, alpha, eta, initial_state, eps, chunk_size, output_final_state, requires_grad):
        from .chunk import chunk_titans_linear_fwd

        return chunk_titans_linear_fwd(q, k, v, w, b, theta, alpha, eta, initial_state, eps=eps,
                                       chunk_size=chunk_size, output_final_state=output_final_state,
                                       requires_grad=requires_grad)

    def bwd(args, outputs, grads):
        from .chunk import chunk_titans_linear_bwd

        do, dht = grads
        states = outputs[2:4] if len(outputs) > 2 else None
        found = chunk_titans_linear_bwd(*(args[n] for n in TENSORS), do, dht, states, eps=args["eps"],
                                        chunk_size=args["chunk_size"])
        return dict(zip(TENSORS, found))

    def residuals(args, requires_grad):
        """the states entering each chunk (hm, hs) `[B * H * NT, D, D]` in q's dtype, when the TileLang backward
        will run."""
        from .chunk import tl_backward

        q, chunk_size = args["q"], args["chunk_size"]
        B, T, H, D = q.shape
        if not (requires_grad and tl_backward(D, chunk_size, q.dtype)):
            return []
        NS = B * H * -(-T // chunk_size)
        return [q.new_empty(NS, D, D), q.new_empty(NS, D, D)]

    caps = tilelang_capabilities(varlen=False, max_head_dim=TITANS_MAX_D)
    return Backend(name="tilelang", capabilities=caps, fwd=fwd, bwd=bwd, residuals=residuals, module=MODULE,
                   extra_reasons=_extra_reasons, description="the TileLang kernels")


def _titans_torch(q, k, v, w, b, theta, alpha, eta, initial_state, eps, chunk_size, output_final_state):
    o, ht = chunk_titans_linear_torch(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state,
                                      output_final_state)
    return o.to(q.dtype).contiguous(), ht


def _kernels(D: int, dtype: str) -> list[KernelSpec]:
    """the forward kernel at each chunk size the kernels take, and the backward where the launcher runs it (bf16 /
    fp16 within the shared-memory budget); none for a D the kernels refuse."""
    from ..common.state_op import stage_spec
    from .chunk import TL_BACKWARD, bwd_fits

    if D % 16 or D > TITANS_MAX_D:
        return []
    specs = []
    for BT in TITANS_TL_CHUNK_SIZES:
        specs.append(stage_spec("titans_fwd_chunk", D, D, dtype, "none", BT=BT))
        if TL_BACKWARD and dtype in ("bfloat16", "float16") and bwd_fits(D, BT, 2):
            specs.append(stage_spec("titans_bwd_chunk", D, D, dtype, "none", BT=BT))
    return specs


def _cases(device, dtype):
    B, T, H, D = 2, 37, 2, 16
    q, k, v = (torch.randn(B, T, H, D, device=device) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    w, b = 1 + 0.1 * torch.randn(H, D, device=device), 0.1 * torch.randn(H, D, device=device)
    theta, alpha = 0.1 * torch.rand(B, T, H, 1, device=device), 0.2 * torch.rand(B, T, H, 1, device=device)
    eta, h0 = 0.5 + 0.5 * torch.rand(B, T, H, 1, device=device), 0.1 * torch.randn(B, H, D, D, device=device)
    args = {n: x.to(dtype) for n, x in zip(TENSORS, (q, k, v, w, b, theta, alpha, eta, h0))}
    return [Case("dense", {**args, "chunk_size": 16, "output_final_state": True}, TENSORS, recurrent_titans_linear,
                 dtype=dtype, out_dtypes={"o": dtype, "ht": reference_dtype(dtype)})]


CHUNK = OpSpec(
    name="chunk_titans_linear", variant="titans", mode="chunk", reference=recurrent_titans_linear,
    backends=[make_titans_backend(), torch_backend(_titans_torch, torch_capabilities(varlen=False))],
    schema=SCHEMA, outputs=2, grads=TENSORS, describe=_describe, fake=_fake, kernels=_kernels, cases=_cases,
)


@register(CHUNK)
def chunk_titans_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
):
    r"""
    Titans with a linear memory (fla's `chunk_titans_linear`, in the `[B, T, H, D]` layout of its
    `chunk_titans_linear_ref`): per head, with the memory M and the momentum S (S_0 = 0),
    `S_t = eta_t S_{t-1} - 2 theta_t k_t^T vn_t`, `M_t = (1 - alpha_t) M_{t-1} + S_t`,
    `o_t = q_t M_t + LN(q_t M_t) w + b`, where vn_t is fla's layer-norm reconstruction gradient of (k_t, v_t) taken at
    the memory entering the token's chunk of `chunk_size` tokens (see `fla_tl.reference.titans`). Unlike fla 0.6.0
    (plain PyTorch) it has TileLang kernels: the forward, and the backward for bf16 / fp16 (D = 128 with chunk_size
    16, D = 64 with any); other cases take a PyTorch-recompute backward. Every input gets a gradient.

    Args:
        q, k, v (torch.Tensor): `[B, T, H, D]` (fla requires DK == DV).
        w, b (torch.Tensor): the layer-norm weight and bias `[H, D]` (any shape of H * D elements).
        theta, alpha, eta (torch.Tensor): per-token learning rate, memory decay and momentum `[B, T, H, 1]` (or
            `[B, T, H]`), already activated (alpha < 1, eta > 0).
        eps (float): the layer-norm epsilon. Default: `1e-6`.
        chunk_size (int): the tokens that share one gradient memory (part of the semantics). Default: `16`; the
            TileLang kernels take 16, 32 or 64 (others run the torch backend).
        initial_state (Optional[torch.Tensor]): the memory `[B, H, D, D]`. Default: `None` (zeros).
        output_final_state (bool): Default: `False`.
        backend (Optional[str]): `"tilelang"`, `"torch"` or None (automatic).

    Returns:
        o `[B, T, H, D]` in q's dtype (fla's reference returns float32); the final memory `[B, H, D, D]` in float32
        (float64 for float64 inputs), or `None`. For T not a multiple of `chunk_size` the final memory is the one after
        the last token (fla's reference pads the sequence and its final state includes the pad tokens' updates).

    Examples::
        >>> q, k, v = (torch.randn(2, 300, 4, 64) for _ in range(3))
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> w, b = torch.ones(4, 64), torch.zeros(4, 64)
        >>> theta, alpha, eta = torch.rand(2, 300, 4, 1) * 0.1, torch.rand(2, 300, 4, 1) * 0.1, torch.rand(2, 300, 4, 1)
        >>> o, ht = chunk_titans_linear(q, k, v, w, b, theta, alpha, eta, output_final_state=True)
    """
    _validate_titans(q, k, v, w, b, theta, alpha, eta, eps, chunk_size, initial_state)
    args = dict(q=q, k=k, v=v, w=w, b=b, theta=theta, alpha=alpha, eta=eta, initial_state=initial_state,
                eps=float(eps), chunk_size=chunk_size, output_final_state=bool(output_final_state))
    B, T, H, D = q.shape
    if T == 0:
        # no kernel runs, but the backend is chosen as for any input (a requested one that refuses raises)
        check_backend_name(CHUNK, backend)
        select_backend(CHUNK, _describe(args, torch.is_grad_enabled()), backend if backend != AUTO else None)
        ht = None
        if output_final_state:
            ht_dtype = reference_dtype(q.dtype)
            ht = (initial_state.to(ht_dtype, copy=True) if initial_state is not None
                  else q.new_zeros(B, H, D, D, dtype=ht_dtype))
        # the outputs still reach the autograd graph of the inputs (zero gradients)
        o, ht = join_graph([q.new_empty(q.shape), ht], (q, k, v, w, b, theta, alpha, eta, initial_state))
        return o, ht
    o, ht = CHUNK.run(backend, **args)
    return o, (ht if output_final_state else None)
