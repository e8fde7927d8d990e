"""`compile` marker: every TileLang kernel factory builds for sm_90a, without a GPU (nvcc is needed), once per load path.

The kernels come from the ops' own lists (`OpSpec.kernels(D, dtype)`, the lists `python -m fla_tl compile` builds), at
D = 128 (full 64-wide tiles: bulk copies) and D = 100 (head dims padded to the tile: masked loads), bf16; one case per
(factory, load path). Each case checks what can break for a real reason on the GPU:

- the build itself (TileLang's lowering and nvcc);
- the launch's dynamic shared memory fits a Hopper block (227 KB), and for the tunable stages of
  `fla_tl.autotune.configs` it is at most what the fit arithmetic counts plus the budget's headroom for barriers
  (the tuner and the heuristics trust that arithmetic);
- the generated code uses the instruction families the factory is written for (`INTENDED`): bulk tensor copies (TMA)
  on full tiles and none on padded ones, warpgroup MMA rather than the pre-Hopper `mma.sync`, async copies where the
  kernel pipelines element loads.

`FLA_TL_COMPILE_ALL=1` adds every kernel of every op at D in {64, 100, 128, 256} and bf16 / fp16 / fp32 (marker
`compile_all`, opt-in: a few hundred builds).
"""

import dataclasses
import math
import re

import pytest

SM90A = {"kind": "cuda", "arch": "sm_90a"}
# the dynamic shared memory a Hopper block may use (227 KB)
MAX_SMEM = 227 * 1024
# the instruction families found in TileLang's CUDA source for sm_90a
FAMILIES = {"tma": "tl::tma_load", "wgmma": "wgmma", "mma": "tl::mma_sync", "cp_async": "cp_async"}
# what each factory's code is meant to use for bf16 inputs: (full tiles, padded head dims); families not named must
# not appear. The chunk stages that pipeline whole tiles load them by TMA; padded head dims load element by element.
INTENDED = {
    "chunk_fwd_h_kernel": ("tma wgmma", "wgmma"),
    "chunk_bwd_dh_kernel": ("tma wgmma", "wgmma"),
    "chunk_fwd_o_kernel": ("wgmma", "wgmma"),
    "chunk_bwd_dv_kernel": ("wgmma", "wgmma"),
    "chunk_bwd_dqk_kernel": ("cp_async wgmma", "wgmma"),
    "fused_chunk_fwd_kernel": ("tma wgmma", "wgmma"),
    "fused_chunk_bwd_dkv_kernel": ("tma wgmma", "wgmma"),
    "fused_recurrent_fwd_kernel": ("", ""),
    "fused_recurrent_bwd_kernel": ("", ""),
    "chunk_gate_cumsum_kernel": ("", ""),
    "chunk_reverse_cumsum_kernel": ("", ""),
    "sequence_cumsum_kernel": ("", ""),
    "gate_dot_kernel": ("", ""),
    "chunk_state_dot_kernel": ("", ""),
    "chunk_scan_kernel": ("", ""),
    "normalize_fwd_kernel": ("wgmma", "wgmma"),
    "normalize_bwd_c_kernel": ("", ""),
    "normalize_bwd_dqk_kernel": ("", ""),
    "chunk_gla_fwd_o_kernel": ("wgmma", "wgmma"),
    "chunk_gla_bwd_dv_kernel": ("wgmma", "wgmma"),
    "chunk_gla_bwd_dqk_kernel": ("wgmma", "wgmma"),
    "fused_recurrent_hgrn_fwd_kernel": ("cp_async", "cp_async"),
    "fused_recurrent_hgrn_bwd_kernel": ("cp_async", "cp_async"),
    "based_fwd_fused_chunk_kernel": ("wgmma", "wgmma"),
    "based_bwd_dq_fused_chunk_kernel": ("wgmma", "wgmma"),
    "based_bwd_dkv_fused_chunk_kernel": ("wgmma", "wgmma"),
    "parallel_based_fwd_kernel": ("wgmma", "wgmma"),
    "parallel_based_bwd_dq_kernel": ("wgmma", "wgmma"),
    "parallel_based_bwd_dkv_kernel": ("wgmma", "wgmma"),
    "wy_fwd_kernel": ("wgmma", "wgmma"),
    "wy_bwd_kernel": ("wgmma", "wgmma"),
    "fused_chunk_delta_fwd_kernel": ("tma wgmma", "wgmma"),
    "chunk_delta_fwd_h_kernel": ("tma wgmma", "wgmma"),
    "chunk_delta_bwd_dhu_kernel": ("tma wgmma", "wgmma"),
    "chunk_delta_bwd_dqkw_kernel": ("cp_async wgmma", "wgmma"),
    "combine_states_kernel": ("", ""),
    "fused_recurrent_delta_rule_fwd_kernel": ("", ""),
    "fused_recurrent_delta_rule_bwd_dkv_kernel": ("", ""),
    "fused_recurrent_delta_rule_bwd_dqk_kernel": ("", ""),
    # the small [BT, D] x [D, D] products of a chunk of 16 run on mma.sync, the [D, D] updates on wgmma
    "titans_fwd_chunk_kernel": ("mma wgmma", "mma wgmma"),
    "titans_bwd_chunk_kernel": ("mma wgmma", "mma wgmma"),
    "rwkv6_fwd_bonus_kernel": ("", ""),
    "rwkv6_bwd_bonus_kernel": ("", ""),
    "slot_normaliser_fwd_kernel": ("cp_async", "cp_async"),
    "slot_normaliser_bwd_kernel": ("cp_async", "cp_async"),
}


def _load_path(kwargs: dict) -> str:
    dims = [v for k, v in kwargs.items() if k in ("K", "V", "D") and isinstance(v, int)]
    return "padded" if any(d % 64 for d in dims) else "full"


def _cases(full: bool) -> list:
    try:
        import fla_tl.ops  # noqa: F401 - registers the ops
        from fla_tl.registry import registered_ops
    except Exception as e:  # noqa: BLE001 - the marker's skip reason covers a missing tilelang
        return [pytest.param(None, id=f"unavailable-{type(e).__name__}")]
    grid = [(D, dtype) for D in (64, 100, 128, 256) for dtype in ("bfloat16", "float16", "float32")] if full else [
        (128, "bfloat16"), (100, "bfloat16")]
    found = {}
    for spec in registered_ops():
        if spec.kernels is None:
            continue
        for D, dtype in grid:
            for kernel in spec.kernels(D, dtype):
                path = _load_path(kernel.kwargs)
                key = (kernel.factory, tuple(sorted(kernel.kwargs.items()))) if full else (kernel.name, path)
                found.setdefault(key, (spec.name, kernel, path))
    return [pytest.param(case, id=f"{kernel.name}-{path}" + (f"-{_label(kernel.kwargs)}" if full else ""))
            for case in found.values() for _, kernel, path in [case]]


def _label(kwargs: dict) -> str:
    return "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in kwargs.items())


def _dynamic_smem(kernel) -> int:
    """the dynamic shared memory of the kernel's launch, from the host code TileLang generated (the last launch
    argument, when the kernel declares dynamic shared memory)."""
    if "extern __shared__" not in kernel.get_kernel_source():
        return 0
    values = re.findall(r"\.v_int64\) = \(\(int64_t\)(\d+)\);\s*\(\(\(TVMFFIAny\*\)stack_ffi_any\)\[\d+\]\.type_index\) = 0;",
                        kernel.get_host_source())
    assert values, "no launch found in the host code"
    return int(values[-1])


# global-memory offsets: every tensor of a dynamic shape is indexed in 64 bits (it may pass 2^31 elements)
_KERNEL = re.compile(r"__global__ void (?:__launch_bounds__\([^)]*\) )?\w+\(([^)]*)\)\s*\{")


def _closing(text: str, i: int) -> int:
    """the position of the bracket closing the one at `text[i]`."""
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] == text[i]) - (text[j] == {"[": "]", "(": ")"}[text[i]])
        if depth == 0:
            return j
    raise ValueError(f"unbalanced {text[i]!r} at {i}")


def global_indices(source: str) -> dict[str, list[str]]:
    """the index expressions of the global-memory accesses (`p[i]`, `(p + (i))`, `(p + i)`) in TileLang's CUDA source,
    by pointer argument of the kernel."""
    found = {}
    for kernel in _KERNEL.finditer(source):
        body = source[kernel.end() :]
        for name in re.findall(r"\*\s*__restrict__\s+(\w+)", kernel.group(1)):
            for access in re.finditer(rf"(?<![\w.]){name}\s*(\[|\+\s*\(|\+\s*\w+)", body):
                start = access.start(1)
                if body[start] == "[":
                    index = body[start + 1 : _closing(body, start)]
                elif access.group(1).endswith("("):
                    open_ = access.end(1) - 1
                    index = body[open_ + 1 : _closing(body, open_)]
                else:
                    index = access.group(1).lstrip("+ ")
                found.setdefault(name, []).append(index)
    return found


def narrow_indices(source: str, exempt=()) -> list[str]:
    """the global-memory accesses whose index is computed in 32 bits: no int64 cast or int64 local in a non-constant
    index (`exempt`: pointer arguments not checked)."""
    wide = set(re.findall(r"\bint64_t\s+(\w+)\s*=", source))
    narrow = []
    for name, indices in global_indices(source).items():
        if name in exempt:
            continue
        for index in indices:
            names = set(re.findall(r"[A-Za-z_]\w*", index))
            if names and "int64_t" not in names and not names & wide:
                narrow.append(f"{name}[{index[:120]}]")
    return narrow


def _small_static_buffers(func) -> set[str]:
    """the buffer arguments of a prim_func with a fixed shape of fewer than 2^31 elements."""
    small = set()
    for buffer in func.buffer_map.values():
        dims = [getattr(d, "value", None) for d in buffer.shape]
        if all(isinstance(d, int) for d in dims) and math.prod(dims) < 2**31:
            small.add(buffer.name)
    return small


def _check(case):
    from fla_tl.autotune.configs import KERNELS, SMEM_BUDGET, key_dims
    from fla_tl.kernels.common.utils import get_kernel

    op, spec, path = case
    kernel = get_kernel(spec.factory, SM90A, **spec.kwargs)
    source = kernel.get_kernel_source()
    assert "__global__" in source
    func = kernel.prim_func if kernel.prim_func is not None else spec.factory(**spec.kwargs)
    narrow = narrow_indices(source, exempt=_small_static_buffers(func))
    assert not narrow, f"{spec.name} ({path} tiles): 32-bit global offsets: {narrow[:3]}"
    smem = _dynamic_smem(kernel)
    assert smem <= MAX_SMEM, f"{spec.name}: {smem} bytes of dynamic shared memory, a block has {MAX_SMEM}"
    tunable = KERNELS.get(spec.name.removesuffix("_kernel"))
    if tunable is not None:
        config = tunable.config_cls(**{f: spec.kwargs[f] for f in tunable.config_cls.__dataclass_fields__})
        K, V = key_dims(tunable.name, spec.kwargs)
        # the input dtype (a fixed-dtype kernel's own: the fp32 gate scans)
        dtype = tunable.dtype or spec.kwargs.get("dtype", spec.kwargs.get("h_dtype"))
        planned = tunable.smem(K, V, dtype, config)
        assert smem <= planned + MAX_SMEM - SMEM_BUDGET, (
            f"{spec.name}: the launch takes {smem} bytes, the fit arithmetic counts {planned}")
    return kernel, source


@pytest.mark.compile
@pytest.mark.parametrize("case", _cases(full=False))
def test_kernel_builds_for_sm90a(case):
    kernel, source = _check(case)
    op, spec, path = case
    assert spec.factory.__name__ in INTENDED, f"{spec.factory.__name__}: add its intended instructions to INTENDED"
    full, padded = INTENDED[spec.factory.__name__]
    intended = set((full if path == "full" else padded).split())
    found = {name for name, pattern in FAMILIES.items() if pattern in source}
    assert found == intended, f"{spec.name} ({path} tiles, from {op}): uses {sorted(found)}, meant {sorted(intended)}"


@pytest.mark.compile
@pytest.mark.compile_all
@pytest.mark.parametrize("case", _cases(full=True))
def test_every_kernel_builds_for_sm90a(case):
    _check(case)


def _space_cases(full: bool) -> list:
    """the tunable kernels' search-space configs at K = V = 128 bf16 (Based: K = 16), gate "g" unless the kernel runs
    one gate option: every fitting config with `full`, else the one the fit arithmetic counts the most shared memory
    for (where an arithmetic that undercounts would let a config through that cannot launch)."""
    try:
        from fla_tl.autotune.configs import KERNELS
        from fla_tl.kernels.common.state_op import stage_spec
    except Exception as e:  # noqa: BLE001 - the marker's skip reason covers a missing tilelang
        return [pytest.param(None, id=f"unavailable-{type(e).__name__}")]
    cases = []
    for name, kernel in sorted(KERNELS.items()):
        K = 128 if kernel.launches is None or kernel.launches(128, 128, "bfloat16") else 16
        gate = kernel.gate or "g"
        candidates = kernel.candidates(K, 128, "bfloat16", gate)
        if not full:
            candidates = [max(candidates, key=lambda c: kernel.smem(K, 128, "bfloat16", c))]
        for config in candidates:
            spec = stage_spec(name, K, 128, "bfloat16", gate, dataclasses.asdict(config))
            cases.append(pytest.param(("space", spec, "full"), id=f"{name}-{_label(dataclasses.asdict(config))}"))
    return cases


@pytest.mark.compile
@pytest.mark.parametrize("case", _space_cases(full=False))
def test_search_space_edge_builds_for_sm90a(case):
    """each tunable kernel's search-space config with the most planned shared memory builds, and launches within
    what the arithmetic counts (the tuner trusts it to filter the space)."""
    if case is None:
        pytest.skip("tilelang is not installed")
    _check(case)


@pytest.mark.compile
@pytest.mark.compile_all
@pytest.mark.parametrize("case", _space_cases(full=True))
def test_every_search_space_config_builds_for_sm90a(case):
    if case is None:
        pytest.skip("tilelang is not installed")
    _check(case)


def test_every_factory_has_intended_instructions():
    """each kernel factory under fla_tl/kernels is named in INTENDED (a new factory gets its compile case)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "fla_tl" / "kernels"
    factories = {m for path in root.rglob("*.py") for m in re.findall(r"^def (\w+_kernel)\(", path.read_text(), re.M)}
    assert factories - {"get_kernel"} == set(INTENDED)
