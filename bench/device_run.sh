#!/usr/bin/env bash
# One GPU session's checks on a lent H100/H200 (see docs/PERFORMANCE.md), from the repository
# root with the numpy wheel in .whl/ (the image's numpy 2.5 breaks numba-cuda's import):
#   TESTS="tests/test_gpu.py"  the GPU tests to run ("" for none)
#   TEST_K="cluster"           only the tests pytest -k selects (default: all of them)
#   BENCH="--sweep"            arguments of bench/gpu_bench.py ("skip" for no benchmark)
#   .old/ (optional)           an earlier flame/ and bench/, benchmarked first on the same card
#                              (git archive <commit> flame bench | tar -x -C .old), with its
#                              kernels precompiled in .old/.fc if it has one
#   OLD_BENCH="--only rows"    its benchmark's arguments (default: elementwise, rows, block)
#   BENCH_TIMEOUT=300          seconds the benchmark may run
# The benchmark runs before the tests (a run cut by its time limit keeps the figures).
# Logs and JSON results go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLAME_CACHE_DIR=${FLAME_CACHE_DIR:-$PWD/.fc}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import numpy, numba, numba_cuda, torch; print('numpy', numpy.__version__, 'numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'torch', torch.__version__)"
if [ -d .old ] && [ "${BENCH:-}" != skip ]; then
  echo "== before: .old"
  (cd .old && PYTHONPATH=$PWD:/tmp/site FLAME_CACHE_DIR=$([ -d .fc ] && echo "$PWD/.fc" || echo /tmp/fc_old) timeout 240 python3 bench/gpu_bench.py \
     ${OLD_BENCH:---only elementwise,rows,block} --out "$OUT/before.json" > "$OUT/before.log" 2>&1; tail -4 "$OUT/before.log")
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
if [ "${BENCH:-}" != skip ]; then
  echo "== bench"
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/gpu_bench.py ${BENCH:-} --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; sed -n '/^| bench/,$p' "$OUT/bench.log"
fi
if [ -n "${TESTS-tests/test_gpu.py}" ]; then
  echo "== tests: ${TESTS-tests/test_gpu.py} ${TEST_K:-}"
  select=(); [ -n "${TEST_K:-}" ] && select=(-k "$TEST_K")
  timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -q -m gpu ${TESTS-tests/test_gpu.py} "${select[@]}" -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|Error" "$OUT/gpu_tests.log" | tail -8
fi
