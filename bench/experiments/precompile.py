"""Compile, on a machine without a GPU, the sm_90 kernels that run_all.sh's benchmark
(`gpu_bench --only long_rows,rows`), GPU cluster tests and experiments will load, into
FLAME_CACHE_DIR (default .fc, which device_run.sh reads): a lent GPU's minutes then go to
timing, not NVVM.
Carry .fc with the call. A cubin's cache key is the kernel's source, architecture, dtypes and
numba-cuda's version, so the GPU machine (numba-cuda 0.30.4) finds what was compiled here.
    FLAME_CACHE_DIR=.fc PYTHONPATH=.:bench python bench/experiments/precompile.py [--all]
--all: also the kernels of gpu_bench's other benchmarks (elementwise, gemm, conv, block)."""
import os
import sys
import time

os.environ.setdefault("FLAME_CACHE_DIR", ".fc")
import numpy as np   # noqa: E402
import torch   # noqa: E402  (torch's figures are skipped: only flame's kernels are compiled)

import flame   # noqa: E402
import gpu_bench as gb   # noqa: E402

CC = (9, 0)


def runner(fn, *inputs, **opts):
    return flame.compile(fn, *inputs, backend="cuda", options={**opts, "compile_only": CC}).runner


def main():
    t0 = time.time()
    gb.flame_runner = runner
    gb.median_ms_flame = lambda fr, reps=None: float("nan")
    gb.median_ms_torch = lambda fn, reps=None: float("nan")
    torch.Tensor.cuda = lambda self, *a, **k: self   # the torch tensors stay on the CPU, untimed
    gb.COPY_GBPS["hbm"] = float("nan")
    gb.bench_long_rows()
    gb.bench_rows()
    if "--all" in sys.argv:   # the rest of gpu_bench (its default run)
        gb.bench_elementwise()
        gb.bench_gemm()
        gb.bench_conv()
        gb.bench_block(compile_only=CC)
    sys.path[:0] = ["tests", "bench/experiments"]
    from flame.codegen import kernel as kd
    import test_gpu
    test = test_gpu.test_rows_on_a_cluster_of_blocks_match_interpreter_launch_after_launch
    marks = {m.args[0]: m.args[1] for m in test.pytestmark if m.name == "parametrize"}
    keep = kd.LONG_ROW_PARTS
    for parts in marks["parts"]:
        for name, fn, shape in marks["name, fn, shape"]:
            kd.LONG_ROW_PARTS = parts
            runner(fn, np.zeros(shape, np.float32))
    kd.LONG_ROW_PARTS = keep
    import rows_pipeline   # the experiment's hand-written kernels (x in, y out, float32)
    from flame.codegen.ptx import kernel_cubin
    from flame.ir import dtypes as dt
    for v in rows_pipeline.VARIANTS:
        kernel_cubin("kernel", rows_pipeline.gen(**v)[0], [dt.f32, dt.f32], CC)
    import elementwise_sweep
    elementwise_sweep.main(precompile=True)
    import timing_probe
    x = gb.rnd(2, 320, 64, 64)
    for _, fn, inp, _ in timing_probe.flame_cases(x, x):
        runner(fn, inp)
    from flame.codegen.cache import cache_dir
    n = len(os.listdir(os.path.join(cache_dir(), "cubin")))
    print(f"compiled in {time.time() - t0:.0f}s; {n} cubins in {cache_dir()}")


if __name__ == "__main__":
    main()
