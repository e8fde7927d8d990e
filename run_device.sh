#!/bin/bash
# device batch: $1 = which batch
set -o pipefail
source .devbundle/prelude.sh || exit 1
(cd .devbundle && tar -xJf tlcache.tar.xz) || exit 1
[ -f .devbundle/benchcache.tar.xz ] && (cd .devbundle && tar -xJf benchcache.tar.xz)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpus
NG=$(nvidia-smi -L | wc -l)
B="python3 benchmarks/bench.py --shapes 8x4096x16x128 --modes fwd,fwdbwd --providers fla_tl,fla --no-plot"
suite() {
  CUDA_VISIBLE_DEVICES=$1 FLA_TL_TEST_LOG=$OUT/fail.log timeout 560 python -m pytest ${2:-tests} -m gpu -n 15 --dist load -q \
    -p no:cacheprovider -p no:benchmark --timeout 300 > $OUT/suite.log 2>&1; echo "suite rc $?" >> $OUT/suite.log
}
bench() { # gpu name ops...
  local g=$1 n=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 560 $B --ops $1 --out $OUT/$n.csv > $OUT/$n.log 2>&1; echo "rc $?" >> $OUT/$n.log
}
case "$1" in
  b1)
    suite 0 "" &
    bench 1 rwkv6 chunk_rwkv6,fused_recurrent_rwkv6 &
    bench 2 gsa chunk_gsa &
    bench 3 abc chunk_abc,fused_recurrent_gsa &
    wait ;;
  b2)
    suite 0 "tests/test_gsa.py tests/test_rwkv6.py tests/test_gla.py" &
    bench 1 rwkv6 chunk_rwkv6 &
    bench 2 abc chunk_abc &
    ( bench 3 la chunk_linear_attn,fused_chunk_linear_attn
      CUDA_VISIBLE_DEVICES=3 timeout 200 python3 tools/profile_ops.py 8 4096 16 128 "rwkv6,abc,simple_gla g,simple_gla gamma" > $OUT/profile.log 2>&1 ) &
    wait ;;
  b3)
    suite 0 "tests/test_based.py tests/test_rwkv6.py tests/test_gla.py" &
    bench 1 rwkv6 chunk_rwkv6 &
    bench 2 rwkv6fr fused_recurrent_rwkv6 &
    ( CUDA_VISIBLE_DEVICES=3 timeout 200 python3 tools/profile_ops.py 8 4096 16 128 "rwkv6" > $OUT/profile.log 2>&1
      CUDA_VISIBLE_DEVICES=3 timeout 300 ${B/8x4096x16x128/4x2048x16x64} --ops parallel_based,parallel_rebased --out $OUT/based.csv > $OUT/based.log 2>&1 ) &
    wait ;;
  b4)
    suite 0 "" &
    ( bench 1 rwkv6 chunk_rwkv6; bench 1 sgla chunk_simple_gla_g ) &
    ( bench 2 gdn chunk_gated_delta_rule; bench 2 dn chunk_delta_rule ) &
    ( bench 3 gla chunk_gla; CUDA_VISIBLE_DEVICES=3 timeout 120 python3 tools/profile_ops.py 8 4096 16 128 "rwkv6,simple_gla g,gated_delta_rule" > $OUT/profile.log 2>&1 ) &
    wait ;;
  *) eval "$2" ;;
esac
tail -3 $OUT/suite.log 2>/dev/null
for f in $OUT/*.log; do echo "== $f"; tail -25 $f; done
