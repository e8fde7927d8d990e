"""`compile` marker: every TileLang kernel the simple-GLA-family ops launch lowers and builds for sm_90a, no GPU needed.

Covers both load paths (full tiles with async copies at D = 64, masked loads for a padded head dim at D = 100), every
fused_recurrent flag combination, fp32 inputs, the per-token gate ("g") variants with their cumulative-sum and
gradient kernels, GLA's per-key gate ("gk") in the fused_recurrent kernels and chunk_gla's kernels, linear attention's
normalisation stages, the delta rule's WY stages and forward state pass, Based / ReBased's attention-form kernels
and the HGRN scans (the delta rule's fused_recurrent kernels: `test_delta_rule_fused_recurrent.py`). Skips with a
reason where nvcc or tilelang is missing.
"""

import pytest

SM90A = {"kind": "cuda", "arch": "sm_90a"}


def _specs():
    try:
        from fla_tl.kernels.build import kernel_specs
    except Exception:  # noqa: BLE001 - without tilelang the module does not import; the marker skips these
        return [pytest.param(None, id="tilelang-missing")]
    cases = [
        (64, 64, "bfloat16", "gamma", None),
        (100, 100, "bfloat16", "gamma", ("chunk", "fused_chunk")),
        (64, 128, "float32", "gamma", ("chunk", "fused_chunk")),
        (128, 128, "bfloat16", "g", ("chunk", "fused_chunk")),
        (100, 100, "float32", "g", ("chunk", "fused_chunk")),
        (128, 128, "bfloat16", "gk", ("fused_recurrent",)),
        (100, 100, "float32", "gk", ("fused_recurrent",)),
    ]
    params = []
    for K, V, dtype, gate, modes in cases:
        specs = kernel_specs(K, V, dtype, gate=gate, modes=modes) if modes else kernel_specs(K, V, dtype, gate=gate)
        if gate == "g":
            specs += [s for s in kernel_specs(K, V, dtype, gate=gate, modes=("fused_recurrent",))
                      if s[0].startswith("fused_recurrent") and not s[2]["reverse"] and not s[2]["state_v_first"]]
        if gate == "gk":  # one flag combination (the flags compile as for the other gates)
            specs = [s for s in specs if not s[2].get("reverse") and not s[2].get("state_v_first")][:2]
        for name, factory, kwargs in specs:
            flags = "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in kwargs.items()
                             if k in ("reverse", "state_v_first", "BV", "g_dtype", "out_dtype"))
            dims = f"K{kwargs['K']}-V{kwargs['V']}" if "V" in kwargs else f"K{kwargs.get('K', '-')}"
            params.append(pytest.param((factory, kwargs), id=f"{name}-{dims}-{dtype}-{gate}-{flags}"))
    from fla_tl.kernels.hgrn.fused_recurrent import fused_recurrent_hgrn_bwd_kernel, fused_recurrent_hgrn_fwd_kernel
    from fla_tl.kernels.linear_attn import normalize as Nm

    # linear attention's normalisation stages (K = 128 on full tiles, V = 60 padded)
    for factory, kwargs in (
        (Nm.chunk_scan_kernel, dict(K=128, dtype="bfloat16", weighted=True, reverse=True, with_init=True)),
        (Nm.chunk_scan_kernel, dict(K=60, dtype="bfloat16", weighted=False, reverse=False, with_init=False)),
        (Nm.normalize_fwd_kernel, dict(K=128, V=60, dtype="bfloat16")),
        (Nm.normalize_bwd_c_kernel, dict(V=60, dtype="bfloat16")),
        (Nm.normalize_bwd_dqk_kernel, dict(K=128, dtype="bfloat16")),
    ):
        params.append(pytest.param((factory, kwargs), id=f"{factory.__name__}-bfloat16"))
    from fla_tl.kernels.common import wy

    # the delta rule's WY stages: the plain rule in bf16 at K = 128, the gated one in fp32 at a padded K = 100
    for gate, dtype, d in (("none", "bfloat16", 128), ("g", "float32", 100)):
        params.append(pytest.param((wy.wy_fwd_kernel, dict(K=d, V=d, dtype=dtype, beta_dtype=dtype, gate=gate)),
                                   id=f"wy_fwd_kernel-K{d}-{dtype}-{gate}"))
    from fla_tl.kernels.common import chunk_delta_h as dh
    from fla_tl.kernels.common import fused_chunk_delta

    # the delta rule's state passes and fused forward gated in bf16 at K = V = 128 (bulk copies), the state passes
    # plain in fp16 at a padded 100 (masked element loads only: a cp.async pipeline)
    for factory in (dh.chunk_delta_fwd_h_kernel, dh.chunk_delta_bwd_dhu_kernel,
                    fused_chunk_delta.fused_chunk_delta_fwd_kernel):
        params.append(pytest.param((factory, dict(K=128, V=128, gate="g", dtype="bfloat16", BT=64)),
                                   id=f"{factory.__name__}-K128-bfloat16-g"))
    for factory in (dh.chunk_delta_fwd_h_kernel, dh.chunk_delta_bwd_dhu_kernel):
        params.append(pytest.param((factory, dict(K=100, V=100, gate="none", dtype="float16", BT=64)),
                                   id=f"{factory.__name__}-K100-float16-none"))
    params.append(pytest.param((wy.wy_bwd_kernel, dict(K=128, V=128, dtype="bfloat16", beta_dtype="float32", gate="g",
                                                        dk_dtype="bfloat16")),
                               id="wy_bwd_kernel-K128-bfloat16-g"))
    # the delta rule's dq / dk / dw pass: gated in bf16 at K = V = 128, plain in fp32 at a padded 100
    for gate, dtype, d in (("g", "bfloat16", 128), ("none", "float32", 100)):
        params.append(pytest.param((dh.chunk_delta_bwd_dqkw_kernel, dict(K=d, V=d, gate=gate, dtype=dtype, BT=64)),
                                   id=f"chunk_delta_bwd_dqkw_kernel-K{d}-{dtype}-{gate}"))

    from fla_tl.kernels.common.chunk_h import chunk_bwd_dh_kernel, chunk_fwd_h_kernel
    from fla_tl.kernels.common.cumsum import chunk_state_dot_kernel
    from fla_tl.kernels.gla import chunk as gla

    # chunk_gla: its own kernels in bf16 at K = V = 128 (the fp32 path at a padded 100 for the two with both intra-chunk
    # forms), the state passes with gate "gk" as the launcher configures them, and the per-key state product of dg
    for d, dtype, factories in ((128, "bfloat16", (gla.chunk_gla_fwd_o_kernel, gla.chunk_gla_bwd_dv_kernel,
                                                   gla.chunk_gla_bwd_dqk_kernel)),
                                (100, "float32", (gla.chunk_gla_fwd_o_kernel, gla.chunk_gla_bwd_dqk_kernel))):
        for factory in factories:
            params.append(pytest.param((factory, dict(K=d, V=d, dtype=dtype, h_dtype=dtype, BT=64)),
                                       id=f"{factory.__name__}-K{d}-{dtype}"))
    for factory in (chunk_fwd_h_kernel, chunk_bwd_dh_kernel):
        params.append(pytest.param((factory, dict(K=128, V=128, gate="gk", dtype="bfloat16", h_dtype="bfloat16",
                                                  BT=64, **gla.STATE_CONFIG)), id=f"{factory.__name__}-K128-gk"))
    params.append(pytest.param((chunk_state_dot_kernel, dict(K=128, V=128, h_dtype="bfloat16", per_key=True, BT=64)),
                               id="chunk_state_dot_kernel-K128-per_key"))
    from fla_tl.kernels.based import parallel as based

    # Based / ReBased in the attention form, with the launchers' tiles: Based in bf16 at K = 64 (wgmma), ReBased in fp32
    # at K = 128, V = 256 (TF32 mma, two value blocks in the forward, the narrower key loop, 256 threads for dk, dv)
    for is_based, K, V, dtype in ((True, 64, 128, "bfloat16"), (False, 128, 256, "float32")):
        for stage, factory in (("fwd", based.parallel_based_fwd_kernel), ("dq", based.parallel_based_bwd_dq_kernel),
                               ("dkv", based.parallel_based_bwd_dkv_kernel)):
            kwargs = dict(K=K, V=V, based=is_based, dtype=dtype, **based.kernel_config(stage, K, V, dtype))
            params.append(pytest.param((factory, kwargs), id=f"{factory.__name__}-K{K}-V{V}-{dtype}-"
                                                             f"{'based' if is_based else 'rebased'}"))
    from fla_tl.kernels.based import fused_chunk as based_chunk

    # fused_chunk_based with the launchers' tiles: bf16 at K = 16, V = 128 (fla's shape; V tiles of 128, and 64 for
    # dk, dv), and fp16 dk, dv at K = 12, V = 48 (padded features and keys, a partial V tile)
    for K, V, dtype, stages in ((16, 128, "bfloat16", ("fwd", "dq", "dkv")), (12, 48, "float16", ("dkv",))):
        for stage in stages:
            factory = {"fwd": based_chunk.based_fwd_fused_chunk_kernel,
                       "dq": based_chunk.based_bwd_dq_fused_chunk_kernel,
                       "dkv": based_chunk.based_bwd_dkv_fused_chunk_kernel}[stage]
            kwargs = dict(K=K, V=V, dtype=dtype, **based_chunk.kernel_config(stage, K, V, dtype))
            params.append(pytest.param((factory, kwargs), id=f"{factory.__name__}-K{K}-V{V}-{dtype}"))
    for factory in (fused_recurrent_hgrn_fwd_kernel, fused_recurrent_hgrn_bwd_kernel):
        for dtype, g_dtype in (("bfloat16", "float32"), ("float32", "float32")):
            params.append(pytest.param((factory, dict(dtype=dtype, g_dtype=g_dtype)),
                                       id=f"{factory.__name__}-{dtype}-g{g_dtype}"))
    return params


@pytest.mark.compile
@pytest.mark.parametrize("spec", _specs())
def test_kernel_builds_for_sm90a(spec):
    from fla_tl.kernels.common.utils import get_kernel

    factory, kwargs = spec
    kernel = get_kernel(factory, SM90A, **kwargs)
    source = kernel.get_kernel_source()
    assert "__global__" in source
