#!/bin/bash
# One device call that spreads independent GPU work over the GPUs of a multi-GPU machine (nvidia-*-x4):
# the gpu test suite on one GPU, benchmarks on the others, each with its own timeout and log under $OUT.
#
#   bash tools/device_batch.sh 'suite 0 "" & bench 1 rwkv6 chunk_rwkv6 & bench 2 abc chunk_abc & wait'
#
# suite GPU [test paths]   pytest -m gpu (-n 15) into $OUT/suite.log (failures in $OUT/fail.log)
# bench GPU NAME OPS       benchmarks/bench.py at 8x4096x16x128, fwd and fwdbwd, fla_tl vs fla, into $OUT/NAME.csv/.log
# Keep the files under $OUT few: the device returns a limited number of them.
set -o pipefail
source .devbundle/prelude.sh || exit 1
(cd .devbundle && tar -xJf tlcache.tar.xz) || exit 1
[ -f .devbundle/benchcache.tar.xz ] && (cd .devbundle && tar -xJf benchcache.tar.xz)
B="python3 benchmarks/bench.py --shapes 8x4096x16x128 --modes fwd,fwdbwd --providers fla_tl,fla --no-plot"
suite() {
  CUDA_VISIBLE_DEVICES=$1 FLA_TL_TEST_LOG=$OUT/fail.log timeout 560 python -m pytest ${2:-tests} -m gpu -n 15 --dist load \
    -q -p no:cacheprovider -p no:benchmark --timeout 300 > $OUT/suite.log 2>&1; echo "suite rc $?" >> $OUT/suite.log
}
bench() {
  CUDA_VISIBLE_DEVICES=$1 timeout 560 $B --ops $3 --out $OUT/$2.csv > $OUT/$2.log 2>&1; echo "rc $?" >> $OUT/$2.log
}
eval "$1"
for f in $OUT/*.log; do echo "== $f"; tail -8 "$f"; done
