#!/usr/bin/env bash
# One device call: the row benchmarks (torch beside), the GPU tests of rows and norms, then the
# long-row settings (bench/gpu_bench.py --only long_rows). Logs and JSON go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLAME_CACHE_DIR=$PWD/.fc
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 python3 bench/gpu_bench.py --only rows --out "$OUT/rows.json" > "$OUT/rows.log" 2>&1
echo "rows exit $?"; sed -n '/^| bench/,$p' "$OUT/rows.log"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k "norm or cluster or softmax or block" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|Error" "$OUT/gpu_tests.log" | tail -5
timeout 200 python3 bench/gpu_bench.py --only long_rows --out "$OUT/long_rows.json" > "$OUT/long_rows.log" 2>&1
echo "long_rows exit $?"; sed -n '/^| bench/,$p' "$OUT/long_rows.log"
