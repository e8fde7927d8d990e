"""Input validation shared by the public ops, logging and warning once per key, and the autograd link of outputs
made without their inputs (the tolerance table and comparisons of the checks live in `fla_tl.testing`)."""

import logging
import math
import os
import sys
import warnings
import weakref

import torch

logger = logging.getLogger("fla_tl")

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# set to 0 to skip the checks of the values of `cu_seqlens` (each costs a device-to-host copy)
ENV_CHECK_CU_SEQLENS = "FLA_TL_CHECK_CU_SEQLENS"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))

_logged: set = set()
_warned: set = set()


def log_once(key, message: str, level: int = logging.INFO) -> None:
    """log `message` through the `fla_tl` logger the first time `key` is seen in this process (not while
    torch.compile traces: a log call would break the graph; the eager path logs it)."""
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    logger.log(level, message)


def warn_once(key, message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` the first time `key` is seen in this process (not while torch.compile
    traces), attributed to the first caller outside fla_tl."""
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def join_graph(outputs: list, inputs) -> list:
    """`outputs` (tensors or None) made without reading `inputs`, such as those of an empty sequence (T = 0), each
    joined to the autograd graph of every input tensor that requires a gradient by adding a zero that depends on
    it: a backward through them gives those inputs zero gradients of their own shapes (added to any they get
    otherwise, e.g. a final state that is a copy of the initial state passes its gradient on)."""
    if not torch.is_grad_enabled():
        return list(outputs)
    link = None
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            # an empty slice: its sum is zero whatever the values (inf, NaN) of x
            zero = x.reshape(-1)[:0].sum()
            link = zero if link is None else link + zero.to(link.dtype)
    if link is None:
        return list(outputs)
    return [x + link.to(x.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in outputs]


def check_tensor(name: str, x, floating: bool = True) -> None:
    """`x` is a torch.Tensor, floating-point when `floating`; else `TypeError` naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")


def check_device(name: str, x: torch.Tensor, device: torch.device, ref: str = "q") -> None:
    """`x` is on `device` (that of the argument `ref`); else `ValueError` naming both."""
    if x.device != device:
        raise ValueError(f"`{name}` must be on the device of `{ref}` ({device}), got {x.device}")


def check_scale(scale) -> None:
    """`scale` is None or a finite real number; else `TypeError` / `ValueError`."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`scale` must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"`scale` must be a finite number, got {scale}")


def check_cu_seqlens(cu_seqlens, x: torch.Tensor, name: str = "q") -> int:
    """check `cu_seqlens` against the packed sequences `x` `[B, T, ...]` (the argument `name`) and return `N`, the
    number of sequences: an integer tensor `[N + 1]` on x's device with `B = 1`, and (see
    :func:`check_cu_seqlens_values`) values from 0 to T, non-decreasing. `TypeError` / `ValueError` otherwise.

    Under `torch.compile` the value checks are not traced (they need a host sync): the op's custom op makes them when
    it runs (`fla_tl.registry`), with the same errors."""
    check_tensor("cu_seqlens", cu_seqlens, floating=False)
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"`cu_seqlens` must have an integer dtype (torch.int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"`cu_seqlens` must be 1-D of shape [N + 1] with N >= 1, got {tuple(cu_seqlens.shape)}")
    check_device("cu_seqlens", cu_seqlens, x.device, name)
    if x.shape[0] != 1:
        raise ValueError(f"`{name}` must have batch size B = 1 when `cu_seqlens` is given (flatten the sequences), "
                         f"got B = {x.shape[0]}")
    if not torch.compiler.is_compiling():
        check_cu_seqlens_values(cu_seqlens, x.shape[1], name)
    return cu_seqlens.shape[0] - 1


# cu_seqlens tensors read back to the host: id -> (weak reference, version, values)
_host_bounds: dict = {}


def host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """the values of `cu_seqlens` on the host, read back (a sync) once per tensor and in-place change: the ops of
    every layer of one packed batch share it, so only the first op of a batch waits for the GPU."""
    hit = _host_bounds.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    return _remember_bounds(cu_seqlens, cu_seqlens.tolist())


def _remember_bounds(cu_seqlens: torch.Tensor, bounds: list[int]) -> list[int]:
    if len(_host_bounds) >= 64:
        _host_bounds.clear()
    _host_bounds[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, bounds)
    return bounds


def use_host_copy(cu_seqlens, cu_seqlens_cpu) -> None:
    """take fla's `cu_seqlens_cpu` (a host copy of `cu_seqlens`) as the host bounds of `cu_seqlens`, so the op reads
    nothing back from the GPU (no sync): its values are trusted as fla trusts them. A copy that is not an integer CPU
    tensor of `cu_seqlens`' shape raises `TypeError` / `ValueError` naming `cu_seqlens_cpu`."""
    if cu_seqlens_cpu is None:
        return
    if not isinstance(cu_seqlens_cpu, torch.Tensor):
        raise TypeError(f"`cu_seqlens_cpu` must be an integer torch.Tensor (a host copy of `cu_seqlens`), got "
                        f"{type(cu_seqlens_cpu).__name__}")
    if cu_seqlens_cpu.dtype.is_floating_point or cu_seqlens_cpu.dtype.is_complex or cu_seqlens_cpu.dtype == torch.bool:
        raise TypeError(f"`cu_seqlens_cpu` must have an integer dtype (torch.int64), got {cu_seqlens_cpu.dtype}")
    if cu_seqlens is None:
        raise ValueError("`cu_seqlens_cpu` is given without `cu_seqlens`: pass both (or neither)")
    if cu_seqlens_cpu.device.type != "cpu":
        raise ValueError(f"`cu_seqlens_cpu` must be on the CPU, got {cu_seqlens_cpu.device}")
    if not isinstance(cu_seqlens, torch.Tensor) or tuple(cu_seqlens_cpu.shape) != tuple(cu_seqlens.shape):
        raise ValueError(f"`cu_seqlens_cpu` must have the shape of `cu_seqlens` "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}, got {tuple(cu_seqlens_cpu.shape)}")
    if not torch.compiler.is_compiling():
        _remember_bounds(cu_seqlens, cu_seqlens_cpu.tolist())


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, T: int, name: str = "q") -> None:
    """`cu_seqlens` starts at 0, is non-decreasing and ends at `T`, the length of the argument `name`; else
    `ValueError`. The values are copied to the host (a sync); skipped while a CUDA graph is captured (a sync is
    not allowed there) and when the environment variable `FLA_TL_CHECK_CU_SEQLENS=0` turns the checks off."""
    if os.environ.get(ENV_CHECK_CU_SEQLENS, "").strip() == "0":
        return
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bounds = host_bounds(cu_seqlens)
    if bounds[0] != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got {bounds[0]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"`cu_seqlens` must be non-decreasing, got {bounds}")
    if bounds[-1] != T:
        raise ValueError(f"`cu_seqlens` must end at T = {T} (the length of `{name}`), got {bounds[-1]}")


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
    g_name: str = "g",
) -> int:
    """check the inputs of a linear-attention op and return `N`, the number of sequences (`g_name`: the gate's
    argument name in errors).

    Raises `TypeError` for a wrong type or dtype and `ValueError` for a wrong shape, device or value (a non-finite
    `scale` too), each naming the argument, what was expected and what was given.

    The values of `cu_seqlens` (start at 0, non-decreasing, end at T) are checked by copying them to the host, in
    eager mode here and under `torch.compile` (where tracing cannot read them) when the op's custom op runs, with the
    same errors; its dtype, shape, device and `B = 1` are checked while tracing. The value checks are skipped while a
    CUDA graph is captured (`torch.cuda.is_current_stream_capturing()`: no host sync is allowed there) and when the
    environment variable `FLA_TL_CHECK_CU_SEQLENS=0` turns them off (no host sync at all; invalid boundaries then give
    wrong results or errors from inside the kernels). They are on by default.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"`{name}` must have dtype in {list(SUPPORTED_DTYPES)}, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"`{name}` must have the dtype of `q` ({q.dtype}), got {x.dtype}")
        check_device(name, x, q.device)
    for name, x, layout in (("q", q, "[B, T, H, K]"), ("k", k, "[B, T, H, K]"), ("v", v, "[B, T, H, V]")):
        if x.dim() != 4:
            raise ValueError(f"`{name}` must have shape {layout}, got {tuple(x.shape)} ({x.dim()} dims)")
    if k.shape != q.shape:
        raise ValueError(f"`k` must have the shape of `q` {tuple(q.shape)} ([B, T, H, K]), got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"`v` must have shape [B, T, H, V] = [{', '.join(map(str, q.shape[:3]))}, V], got {tuple(v.shape)}"
        )
    check_scale(scale)
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, q)
    if g is not None:
        check_tensor(g_name, g)
        check_device(g_name, g, q.device)
        want, layout = ((B, T, H, K), "[B, T, H, K]") if g_per_key else ((B, T, H), "[B, T, H]")
        if tuple(g.shape) != want:
            raise ValueError(f"`{g_name}` must have shape {layout} = {list(want)}, got {tuple(g.shape)}")
    if g_gamma is not None:
        check_tensor("g_gamma", g_gamma)
        check_device("g_gamma", g_gamma, q.device)
        if tuple(g_gamma.shape) != (H,):
            raise ValueError(f"`g_gamma` must have shape [H] = [{H}], got {tuple(g_gamma.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_device("initial_state", initial_state, q.device)
        expected = (N, H, V, K) if state_v_first else (N, H, K, V)
        layout = "[N, H, V, K]" if state_v_first else "[N, H, K, V]"
        if tuple(initial_state.shape) != expected:
            what = "len(cu_seqlens) - 1" if cu_seqlens is not None else "B"
            raise ValueError(
                f"`initial_state` must have shape {layout} = {list(expected)} (N = {what} = {N}), "
                f"got {tuple(initial_state.shape)}"
            )
    return N
