"""One LoRA training step — UNet forward, eps-prediction loss, backward, gradient clipping,
AdamW — in flame and in torch (diffusers' UNet with the same LoRA through PEFT), on the same
machine in the same run.

    python bench/train_bench.py [--backend cpu|cuda] [--config tiny|sd15] [--size 64] [--batch 2]
                                [--steps 20] [--out results.json]

tiny: the quickstart's model (64x64 images -> 32x32 latents); sd15: SD 1.5's UNet (random
weights, shape only matters) at --size pixels. Times are medians over --steps steps after three
warm-up steps (flame's first call compiles; its compile time is reported apart). torch runs
eager in float32 with its default thread count; flame on cpu runs its Numba kernels."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--config", default="tiny", choices=("tiny", "sd15"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import diffusers
    import peft
    import torch

    import flame
    from flame.models.configs import SD15_UNET, TINY_UNET, TINY_VAE, SD15_VAE
    from flame.models.configs_clip import SD15_TEXT, TINY_TEXT
    from flame.models.unet import UNet2DConditionModel
    from flame.train.lora import LORA_TYPES, inject_lora, lora_parameters
    from flame.train.objective import ALPHAS_CUMPROD, ObjectiveConfig
    from flame.train.optim import AdamWConfig
    from flame.train.step import TrainStep

    ucfg, vcfg, tcfg = (TINY_UNET, TINY_VAE, TINY_TEXT) if args.config == "tiny" else (SD15_UNET, SD15_VAE, SD15_TEXT)
    f = vcfg.downsampling
    b, h = args.batch, args.size // f
    rng = np.random.default_rng(0)
    flame.manual_seed(0)
    unet = UNet2DConditionModel(ucfg)
    mods = inject_lora(unet, args.rank, float(args.rank))
    targets = [p for p, m in unet.named_modules() if isinstance(m, LORA_TYPES)]
    acfg = AdamWConfig(max_grad_norm=1.0, skip_nonfinite=True)
    step = TrainStep(unet, lora_parameters(mods), ObjectiveConfig(), acfg, args.backend)

    tu = diffusers.UNet2DConditionModel(**ucfg.to_diffusers())
    missing, unexpected = tu.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in unet.state_dict().items()
                                              if "lora_" not in k}, strict=False)
    assert not missing and not unexpected, (missing[:3], unexpected[:3])   # the same base weights
    tu.add_adapter(peft.LoraConfig(r=args.rank, lora_alpha=float(args.rank), target_modules=targets))
    dev = "cuda" if args.backend == "cuda" else "cpu"
    tu = tu.to(dev).train()
    params = [p for p in tu.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    sqrt_a = torch.tensor(np.sqrt(ALPHAS_CUMPROD), dtype=torch.float32, device=dev)
    sqrt_1ma = torch.tensor(np.sqrt(1 - ALPHAS_CUMPROD), dtype=torch.float32, device=dev)

    lat = rng.standard_normal((b, 4, h, h)).astype(np.float32)
    ctx = rng.standard_normal((b, tcfg.max_position_embeddings, tcfg.hidden_size)).astype(np.float32)
    ts = rng.integers(0, 1000, b)

    def torch_step():
        x0 = torch.from_numpy(lat).to(dev)
        c = torch.from_numpy(ctx).to(dev)
        t = torch.from_numpy(ts).to(dev)
        noise = torch.randn_like(x0)
        xt = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        loss = torch.nn.functional.mse_loss(tu(xt, t, c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    def timed(fn, n):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    t0 = time.perf_counter()
    step(lat, ctx, ts, 1, 1e-4, 1)
    compile_s = time.perf_counter() - t0
    k = [1]

    def flame_step():
        k[0] += 1
        step(lat, ctx, ts, k[0], 1e-4, k[0])
    timed(flame_step, 3)
    flame_s = timed(flame_step, args.steps)
    timed(torch_step, 3)
    torch_s = timed(torch_step, args.steps)
    peak = step.compiled[next(iter(step.compiled))].runner.plan.peak
    row = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "backend": args.backend, "config": args.config,
           "pixels": args.size, "latents": [b, 4, h, h], "rank": args.rank, "lora_layers": len(targets),
           "flame_step_ms": round(flame_s * 1e3, 2), "torch_step_ms": round(torch_s * 1e3, 2),
           "flame_compile_s": round(compile_s, 1), "flame_arena_mib": round(peak / 2 ** 20, 1),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(json.dumps(row, indent=1))
    print(f"\n| step | flame {args.backend} | torch {dev} (eager + PEFT) | flame / torch |\n|---|---|---|---|\n"
          f"| {args.config} UNet, latents {b}x4x{h}x{h}, LoRA rank {args.rank} | {flame_s * 1e3:.1f} ms | "
          f"{torch_s * 1e3:.1f} ms | {flame_s / torch_s:.2f}x |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(row, fh, indent=1)


if __name__ == "__main__":
    main()
