#!/usr/bin/env bash
# The experiment, then the regular benchmark and GPU tests (bench/device_run.sh), in one call.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${EXP:-1}" = 1 ]; then
  PYTHONPATH=/tmp/site:.:bench FLAME_CACHE_DIR=$PWD/.fc timeout 150 python3 bench/experiments/rows_pipeline.py > "$OUT/exp.log" 2>&1
  echo "exp exit $?"; grep "^|\|FAILED" "$OUT/exp.log"
fi
BENCH=${BENCH:---only rows,long_rows} TESTS=${TESTS-tests/test_gpu.py} bash bench/device_run.sh
