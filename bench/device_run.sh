#!/usr/bin/env bash
# One GPU session's checks on a lent H200/H100 (see docs/PERFORMANCE.md): the GPU tests, then
# the kernel benchmarks beside torch. Run from the repository root with the numpy wheel in .whl/
# (the image's numpy 2.5 breaks numba-cuda's import).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import numpy, numba, numba_cuda, torch; print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__)"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_train.py -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
if [ "${BENCH:-1}" = 1 ]; then
  python3 bench/gpu_bench.py --out "$OUT/bench.json" 2>&1 | tail -40
fi
