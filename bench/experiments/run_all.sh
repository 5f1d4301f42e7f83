#!/usr/bin/env bash
# The benchmark and GPU tests (bench/device_run.sh), then the experiments, in one device call.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BENCH=${BENCH:---only long_rows,rows} TESTS=${TESTS-tests/test_gpu.py} bash bench/device_run.sh
export PYTHONPATH=/tmp/site:.:bench FLAME_CACHE_DIR=$PWD/.fc
if [ "${PROBE:-1}" = 1 ]; then
  timeout "${EXP_TIMEOUT:-150}" python3 bench/experiments/timing_probe.py > "$OUT/probe.log" 2>&1
  echo "probe exit $?"; grep "^|\|Error" "$OUT/probe.log"
fi
if [ "${SWEEP:-1}" = 1 ]; then
  timeout "${EXP_TIMEOUT:-150}" python3 bench/experiments/elementwise_sweep.py > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?"; grep "^|\|Error" "$OUT/sweep.log"
fi
if [ "${EXP:-1}" = 1 ]; then
  timeout "${EXP_TIMEOUT:-150}" python3 bench/experiments/rows_pipeline.py > "$OUT/exp.log" 2>&1
  echo "exp exit $?"; grep "^|\|FAILED\|fit at once" "$OUT/exp.log"
fi
