"""Lightning attention's public ops: simple GLA's kernels with the per-head decay fla derives from the layer's depth,
`g_gamma_h = -(8 / H) * (1 - layer_idx / num_layers) * h`."""

import torch

from ...reference.lightning_attn import lightning_g_gamma, recurrent_lightning_attn
from ...registry import register
from ..common.state_op import pop_chunk_size, run_state_op, simple_gla_spec, state_cases


def _cases(mode: str):
    return state_cases(recurrent_lightning_attn, recurrent=mode == "fused_recurrent",
                       extras=lambda B, T, H, device: [("layer 1/4", {}, {"layer_idx": 1, "num_layers": 4})])


def _spec(mode: str):
    # the decay is an argument of the kernel-level call (`g_gamma`), computed by the public function
    return simple_gla_spec(f"{mode}_lightning_attn", "lightning_attn", mode, recurrent_lightning_attn, gate=False,
                           cases=_cases(mode))


def _decay(q, layer_idx, num_layers) -> torch.Tensor | None:
    for name, x in (("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"`{name}` must be an int, got {type(x).__name__}")
    if num_layers < 1 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"need 0 <= layer_idx < num_layers, got layer_idx = {layer_idx}, num_layers = {num_layers}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return None  # the shared validation reports q
    return lightning_g_gamma(q.shape[2], layer_idx, num_layers, q.device)


CHUNK, FUSED_RECURRENT = _spec("chunk"), _spec("fused_recurrent")


@register(CHUNK)
def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Lightning attention in the chunked form: simple GLA with the per-head decay
    `g_gamma_h = -(8 / H) * (1 - layer_idx / num_layers) * h` (fla 0.6.0).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`. v (torch.Tensor): `[B, T, H, V]`.
        layer_idx (int): this layer's index, `0 <= layer_idx < num_layers`.
        num_layers (int): the number of layers.
        scale (Optional[float]): Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]): `[N, H, K, V]`. Default: `None`.
        output_final_state (bool): Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]): `[N + 1]` with `B = 1`. Default: `None`.
        backend (Optional[str]): `"tilelang"`, `"torch"` or `None`. Default: `None`.
        kwargs: `chunk_size` is accepted and ignored; `head_first` raises.

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in q's dtype. final_state: `[N, H, K, V]` float32 or `None`.

    Examples::
        >>> q, k, v = (torch.randn(2, 1000, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = chunk_lightning_attn(q, k, v, layer_idx=3, num_layers=24, output_final_state=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = chunk_lightning_attn(q, k, v, 3, 24, cu_seqlens=torch.tensor([0, 300, 2000], device="cuda"))
    """
    pop_chunk_size(kwargs)
    if kwargs:
        raise TypeError(f"chunk_lightning_attn() got unexpected keyword arguments {sorted(kwargs)}")
    return run_state_op(CHUNK, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=False, state_v_first=False,
                        cu_seqlens=cu_seqlens, backend=backend, g_gamma=_decay(q, layer_idx, num_layers))


@register(FUSED_RECURRENT)
def fused_recurrent_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    num_layers: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""
    Lightning attention by the token-by-token recurrence; same math and arguments as :func:`chunk_lightning_attn`,
    plus `reverse`.

    Examples::
        >>> q, k, v = (torch.randn(2, 64, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> o, ht = fused_recurrent_lightning_attn(q, k, v, 0, 12, output_final_state=True, reverse=True)
        >>> q, k, v = (x.flatten(0, 1)[None] for x in (q, k, v))
        >>> o, _ = fused_recurrent_lightning_attn(q, k, v, 0, 12, cu_seqlens=torch.tensor([0, 10, 128], device="cuda"))
    """
    return run_state_op(FUSED_RECURRENT, q, k, v, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, reverse=reverse, state_v_first=False,
                        cu_seqlens=cu_seqlens, backend=backend, g_gamma=_decay(q, layer_idx, num_layers))
