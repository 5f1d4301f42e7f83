"""Experiment: the elementwise renderer's tunables on the benchmark's chain (tanh, sigmoid)
and on x * 2 + 1, 16M float32, against torch's clone of the same bytes, in one process:
threads a block, outputs a thread (a tile), tiles a block (the next one loaded while this
one computes).
    PYTHONPATH=.:bench python bench/experiments/elementwise_sweep.py [--precompile]"""
import sys

from flame.codegen import cuda as cr
import gpu_bench as gb

# (threads a block, outputs a thread, tiles a block); the default first
CONFIGS = [(256, 4, 1), (256, 4, 2), (256, 4, 4), (256, 4, 8), (128, 4, 1), (128, 4, 4), (256, 8, 1), (512, 4, 1)]
CHAINS = [("chain", gb.CHAIN), ("x*2+1", lambda x: x * 2.0 + 1.0)]


def main(precompile=False):
    n = 1 << 24
    x = gb.rnd(n)
    if not precompile:
        import torch
        gb.bench_copy()
        tx = torch.from_numpy(x).cuda()
        clone = gb.median_ms_torch(lambda: tx.clone())
        print(f"| torch clone 16M | {clone:.4f} | |")
    keep = cr.ELEMENTWISE_BLOCK, cr.ELEMENTWISE_PER_THREAD, cr.ELEMENTWISE_TILES
    for block, per, tiles in CONFIGS:
        cr.ELEMENTWISE_BLOCK, cr.ELEMENTWISE_PER_THREAD, cr.ELEMENTWISE_TILES = block, per, tiles
        for name, fn in CHAINS:
            fr = gb.flame_runner(fn, x)
            if not precompile:
                ms = gb.median_ms_flame(fr)
                print(f"| {name} block {block}, {per} a thread, {tiles} tiles a block | {ms:.4f} | "
                      f"{100 * clone / ms:.0f}% of the clone |", flush=True)
    cr.ELEMENTWISE_BLOCK, cr.ELEMENTWISE_PER_THREAD, cr.ELEMENTWISE_TILES = keep


if __name__ == "__main__":
    main("--precompile" in sys.argv)
