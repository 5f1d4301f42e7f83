"""The SD 1.5 UNet training step (batch 1, 64x64 latents, random weights) with the row-kernel
changes of 2026-12-06 switched off in-process, each variant twice, flame only:

    PYTHONPATH=. python bench/unet_variants.py precompile   # anywhere: cubins into FLAME_CACHE_DIR
    PYTHONPATH=. python bench/unet_variants.py run          # on the GPU"""
import json
import os
import sys

import numpy as np

import flame
import flame.codegen.kernel as kd
import flame.codegen.split as sp
import flame.nn.functional as F
from flame.models.configs import SD15_UNET
from flame.models.unet import UNet2DConditionModel
from flame.nn import init

sys.path.insert(0, os.path.dirname(__file__))
import unet_bench as ub  # noqa: E402

DEFAULTS = dict(LONG_GROUP=F.LONG_GROUP, MIN_ROWS=sp.LONG_ROW_MIN_ROWS, SLOTS=kd.LONG_ROW_SLOTS, PREFETCH=kd.ROW_PREFETCH)
VARIANTS = {"both on": {}, "no_long_rows": dict(LONG_GROUP=1 << 15, MIN_ROWS=1 << 30, SLOTS=0),
            "no_prefetch": dict(PREFETCH=False), "neither": dict(LONG_GROUP=1 << 15, MIN_ROWS=1 << 30, SLOTS=0, PREFETCH=False)}


def apply(v):
    c = dict(DEFAULTS, **v)
    F.LONG_GROUP, sp.LONG_ROW_MIN_ROWS, kd.LONG_ROW_SLOTS, kd.ROW_PREFETCH = c["LONG_GROUP"], c["MIN_ROWS"], c["SLOTS"], c["PREFETCH"]


def main():
    from flame.runtime.cuda import CudaRunner
    from flame.compile import Compiled
    pre = sys.argv[1] == "precompile"
    if pre:
        with init.shape_only():
            unet = UNet2DConditionModel(SD15_UNET)
    else:
        flame.manual_seed(0)
        unet = UNet2DConditionModel(SD15_UNET)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)
    t = np.array([500.0], np.float32)
    c = rng.standard_normal((1, 77, 768)).astype(np.float32)
    y = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)
    res = {}
    for rep in range(1 if pre else 2):
        for name, v in VARIANTS.items():
            apply(v)
            _, g = ub.graphs(unet, SD15_UNET)
            if pre:
                r = CudaRunner(g, compile_only=(9, 0))
                print(name, r.launches, flush=True)
                continue
            comp = Compiled(g, "cuda")
            r = comp.runner
            r.upload(comp.feeds((x, t, c, y)))
            ms = ub.median_ms(r.replay, r.sync)
            res.setdefault(name, []).append(ms)
            print(json.dumps({"variant": name, "ms": round(ms, 2), "launches": r.launches}), flush=True)
            del comp, r
    if not pre:
        print("| variant | ms (2 runs) |")
        for k, v in res.items():
            print(f"| {k} | {' / '.join(f'{m:.2f}' for m in v)} |")


if __name__ == "__main__":
    main()
