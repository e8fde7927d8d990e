#!/bin/bash
# The gpu test suite spread over 4 GPUs (one pytest per group of files, each -n 15), for a cold kernel cache:
#   bash tools/device_suite.sh      (after `source .devbundle/prelude.sh`; logs under $OUT/suite<i>.log)
G=("tests/test_delta_rule.py tests/test_delta_rule_fused_recurrent.py"
   "tests/test_simple_gla.py tests/test_linear_attn.py tests/test_lightning_attn.py tests/test_retention.py"
   "tests/test_gla.py tests/test_rwkv6.py tests/test_hgrn.py tests/test_based.py"
   "tests/test_gsa.py tests/test_titans.py tests/test_kernels_compile.py tests/test_validation.py tests/test_registry.py tests/test_compile_torch.py tests/test_autotune_resolve.py tests/test_autotune_table.py tests/test_cli_autotune.py")
for i in 0 1 2 3; do
  CUDA_VISIBLE_DEVICES=$i FLA_TL_TEST_LOG=$OUT/fail$i.log timeout 540 python -m pytest ${G[$i]} -m gpu -n 15 --dist load \
    -q -p no:cacheprovider -p no:benchmark --timeout 400 > $OUT/suite$i.log 2>&1 &
done
wait
for i in 0 1 2 3; do echo "== group $i"; grep -h "^FAILED\|passed\|failed\|error" $OUT/suite$i.log | tail -8; done
