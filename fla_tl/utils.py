"""Input validation shared by the public ops, and logging once per key (the tolerance table and comparisons of the
checks live in `fla_tl.testing`)."""

import logging

import torch

logger = logging.getLogger("fla_tl")

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

_logged: set = set()


def log_once(key, message: str, level: int = logging.INFO) -> None:
    """log `message` through the `fla_tl` logger the first time `key` is seen in this process (not while
    torch.compile traces: a log call would break the graph; the eager path logs it)."""
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    logger.log(level, message)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_tensor(name: str, x, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")


def _check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"`{name}` must be on the device of `q` ({device}), got {x.device}")


def validate_linear_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    state_v_first: bool = False,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    g_per_key: bool = False,
) -> int:
    """check the inputs of a linear-attention op and return `N`, the number of sequences.

    Raises `TypeError` for a wrong type or dtype and `ValueError` for a wrong shape, device or value, each naming
    the argument, what was expected and what was given. The checks of `cu_seqlens` values need a host sync and are
    skipped while `torch.compile` traces.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"`{name}` must have dtype in {list(SUPPORTED_DTYPES)}, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"`{name}` must have the dtype of `q` ({q.dtype}), got {x.dtype}")
        _check_device(name, x, q.device)
    for name, x, layout in (("q", q, "[B, T, H, K]"), ("k", k, "[B, T, H, K]"), ("v", v, "[B, T, H, V]")):
        if x.dim() != 4:
            raise ValueError(f"`{name}` must have shape {layout}, got {tuple(x.shape)} ({x.dim()} dims)")
    if k.shape != q.shape:
        raise ValueError(f"`k` must have the shape of `q` {tuple(q.shape)} ([B, T, H, K]), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"`v` must have shape [B, T, H, V] = [{', '.join(map(str, q.shape[:3]))}, V], got {tuple(v.shape)}"
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"`scale` must be a float or None, got {type(scale).__name__}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B
    if cu_seqlens is not None:
        _check_tensor("cu_seqlens", cu_seqlens, floating=False)
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"`cu_seqlens` must have an integer dtype (torch.int64), got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"`cu_seqlens` must be 1-D of shape [N + 1] with N >= 1, got {tuple(cu_seqlens.shape)}")
        _check_device("cu_seqlens", cu_seqlens, q.device)
        if B != 1:
            raise ValueError(
                f"`q` must have batch size B = 1 when `cu_seqlens` is given (flatten the sequences), got B = {B}"
            )
        N = cu_seqlens.shape[0] - 1
        if not _is_compiling():
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0:
                raise ValueError(f"`cu_seqlens` must start at 0, got {bounds[0]}")
            if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
                raise ValueError(f"`cu_seqlens` must be non-decreasing, got {bounds}")
            if bounds[-1] != T:
                raise ValueError(f"`cu_seqlens` must end at T = {T} (the length of `q`), got {bounds[-1]}")
    if g is not None:
        _check_tensor("g", g)
        _check_device("g", g, q.device)
        want, layout = ((B, T, H, K), "[B, T, H, K]") if g_per_key else ((B, T, H), "[B, T, H]")
        if tuple(g.shape) != want:
            raise ValueError(f"`g` must have shape {layout} = {list(want)}, got {tuple(g.shape)}")
    if g_gamma is not None:
        _check_tensor("g_gamma", g_gamma)
        _check_device("g_gamma", g_gamma, q.device)
        if tuple(g_gamma.shape) != (H,):
            raise ValueError(f"`g_gamma` must have shape [H] = [{H}], got {tuple(g_gamma.shape)}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state)
        _check_device("initial_state", initial_state, q.device)
        expected = (N, H, V, K) if state_v_first else (N, H, K, V)
        layout = "[N, H, V, K]" if state_v_first else "[N, H, K, V]"
        if tuple(initial_state.shape) != expected:
            what = "len(cu_seqlens) - 1" if cu_seqlens is not None else "B"
            raise ValueError(
                f"`initial_state` must have shape {layout} = {list(expected)} (N = {what} = {N}), "
                f"got {tuple(initial_state.shape)}"
            )
    return N
