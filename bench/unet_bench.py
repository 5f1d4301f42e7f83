"""The SD 1.5 UNet (random weights) forward and forward+backward at 64x64 latents, batch 1,
float32: flame's CUDA backend beside diffusers' UNet in PyTorch on the same GPU.

    PYTHONPATH=. python bench/unet_bench.py --out unet.json         # on the GPU
    PYTHONPATH=. python bench/unet_bench.py --precompile 9.0        # anywhere: PTX into the cache

--precompile compiles every kernel of the same graphs for that compute capability into
FLAME_CACHE_DIR without a GPU, so the GPU run only loads them."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import flame
import flame.nn.functional as F
from flame.compile import Compiled
from flame.models.configs import SD15_UNET, TINY_UNET
from flame.models.unet import UNet2DConditionModel
from flame.nn import init

B, H, CTX = 1, 64, 77


def graphs(unet, cfg, h=H):
    x = flame.spec((B, cfg.in_channels, h, h))
    t = flame.spec((B,))
    c = flame.spec((B, CTX, cfg.cross_attention_dim))
    fwd = flame.passes.optimize(flame.trace(lambda x, t, c: unet(x, t, c), x, t, c, name="unet_fwd"))
    vg = flame.value_and_grad(lambda x, t, c, y: F.mse_loss(unet(x, t, c), y), params=unet)
    train = flame.passes.optimize(flame.trace(vg, x, t, c, flame.spec((B, cfg.out_channels, h, h)), name="unet_train"))
    return fwd, train


def precompile(cc):
    from flame.runtime.cuda import CudaRunner
    for cfg, h in ((SD15_UNET, H), (TINY_UNET, 16)):
        with init.shape_only():
            unet = UNet2DConditionModel(cfg)
        for g in graphs(unet, cfg, h):
            t0 = time.time()
            r = CudaRunner(g, compile_only=cc)
            print(f"{g.name} h={h}: {len(g.nodes)} nodes, {len(r.kernels)} kernels, {r.launches} launches, "
                  f"arena {r.plan.peak / 2**30:.2f} GiB, PTX in {time.time() - t0:.0f}s", flush=True)


def median_ms(fn, sync, reps=10):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(ts))


def run(out_path):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    flame.manual_seed(0)
    t0 = time.time()
    unet = UNet2DConditionModel(SD15_UNET)
    rows["flame_init_s"] = round(time.time() - t0, 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 4, H, H)).astype(np.float32)
    t = np.array([500.0] * B, np.float32)
    c = rng.standard_normal((B, CTX, 768)).astype(np.float32)
    y = rng.standard_normal((B, 4, H, H)).astype(np.float32)
    fwd_g, train_g = graphs(unet, SD15_UNET)
    for name, g, args in (("fwd", fwd_g, (x, t, c)), ("fwd+bwd", train_g, (x, t, c, y))):
        t0 = time.time()
        comp = Compiled(g, "cuda")
        build = time.time() - t0
        r = comp.runner
        r.upload(comp.feeds(args))
        t0 = time.time()
        r.replay()
        r.sync()
        rows[f"flame_{name}_build_s"] = round(build, 1)
        rows[f"flame_{name}_first_step_s"] = round(time.time() - t0, 1)
        rows[f"flame_{name}_ms"] = round(median_ms(r.replay, r.sync), 2)
        rows[f"flame_{name}_device_GiB"] = round(r.buf.size / 2**30, 2)
        rows[f"flame_{name}_launches"] = r.launches
        print(json.dumps(rows), flush=True)
        del comp, r
    # diffusers in torch, same config, same kind of random weights (imported here: flame's
    # figures are printed even where diffusers or its dependencies are missing)
    from diffusers import UNet2DConditionModel as TorchUNet
    tu = TorchUNet(sample_size=64, cross_attention_dim=768, attention_head_dim=8).cuda().float()
    tx, tt, tc, ty = (torch.from_numpy(a).cuda() for a in (x, t, c, y))
    sync = torch.cuda.synchronize

    def step():
        tu.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(tu(tx, tt, tc).sample, ty).backward()
    rows["torch_attention"] = type(tu.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor).__name__
    for bench_mode in (False, True):   # cuDNN's default algorithm choice, then its autotuner
        torch.backends.cudnn.benchmark = bench_mode
        tag = "_cudnn_benchmark" if bench_mode else ""
        with torch.no_grad():
            torch.cuda.reset_peak_memory_stats()
            rows[f"torch_fwd{tag}_ms"] = round(median_ms(lambda: tu(tx, tt, tc).sample, sync), 2)
            rows[f"torch_fwd{tag}_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
        rows[f"torch_fwd+bwd{tag}_ms"] = round(median_ms(step, sync), 2)
        rows[f"torch_fwd+bwd{tag}_peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(rows), flush=True)
    if out_path:
        json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--precompile", metavar="MAJOR.MINOR")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.precompile:
        precompile(tuple(int(v) for v in a.precompile.split(".")))
    else:
        run(a.out)
