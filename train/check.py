"""`flame-train CONFIG --check`: what a run would do, before it does anything heavy.

It validates the config and the paths, scans the images (what is usable, what is skipped and
why, how many have captions), counts the steps and epochs, and plans each training graph the
run will compile — one per (bucket, batch size) — from the models' structure alone: the
models are built shape-only (no weights read or drawn), the step is traced and scheduled
exactly as the run will, and the arena's planned peak is read from the static memory plan.
No kernel is generated or compiled. A real run prints the same figures as it compiles.
"""
from __future__ import annotations

import os
import time

from flame.models.checkpoint import read_header
from flame.models.configs import UNetConfig, VAEConfig
from flame.models.configs_clip import CLIPTextConfig
from flame.models.loading import _model_dir, _read_config
from flame.nn.init import shape_only
from flame.train import data
from flame.train.config import check_paths


def model_configs(cfg: dict):
    """(UNet, VAE, text encoder) configs from a diffusers folder's config.json files or the
    architecture a single file is read with; a single file's header is read (no tensors)."""
    from flame.train.trainer import ARCHITECTURES
    m = cfg["model"]
    ckpt = m["checkpoint"]
    if not os.path.isdir(ckpt):
        read_header(ckpt)             # a safetensors file, not damaged
        u, v, t = ARCHITECTURES[m["architecture"]]
    else:
        u, v, t = ARCHITECTURES["sd15"]
        d = _read_config(_model_dir(ckpt, "unet"))
        u = UNetConfig.from_dict(d) if d else u
        d = _read_config(os.path.join(ckpt, "text_encoder"))
        t = CLIPTextConfig.from_dict(d) if d else t
    vae = m["vae"] or ckpt
    if os.path.isdir(vae):
        d = _read_config(_model_dir(vae, "vae"))
        v = VAEConfig.from_dict(d) if d else v
    elif vae != ckpt:
        read_header(vae)
    return u, v, t


def graph_shapes(ds, cfg, vae_cfg, text_cfg) -> list[tuple]:
    """Every (bucket, batch size, latents shape, text shape) the run can meet: full batches
    and each bucket's last, smaller one."""
    f = vae_cfg.downsampling
    seen = {}
    for batch in data.epoch_batches(ds, cfg, 0):
        bucket = ds.records[batch[0].record].bucket
        seen[(bucket, len(batch))] = None
    out = []
    for (w, h), b in sorted(seen):
        out.append(((w, h), b, (b, vae_cfg.latent_channels, h // f, w // f),
                    (b, text_cfg.max_position_embeddings, text_cfg.hidden_size)))
    return out


def build_step(cfg: dict, backend: str, unet_cfg, text_cfg):
    """The run's TrainStep over shape-only models (LoRA weights real, base weights placeholders)."""
    from flame.models.clip import CLIPTextModel
    from flame.models.unet import UNet2DConditionModel
    from flame.train.trainer import Models, add_lora, make_train_step
    with shape_only():
        unet = UNet2DConditionModel(unet_cfg)
        te = CLIPTextModel(text_cfg)
    models = Models(unet, None, te, None)
    add_lora(models, cfg, lambda msg: None)
    base = cfg["train"]["base_dtype"]
    base = base if base != "auto" else ("bf16" if backend == "cuda" else "f32")
    if base != "f32":
        unet.store_frozen_as(base)
        te.store_frozen_as(base)
    return make_train_step(models, cfg, backend), models


def param_bytes(graph) -> int:
    """Bytes of the graph's parameters (weights and optimizer state), from its input nodes:
    no parameter's data is touched (a GPU-resident one is not downloaded)."""
    return sum(graph.input_by_name(name).nbytes for name in graph.params)


def dry_run(cfg: dict, source: str, log) -> dict:
    """Report what the run would do; returns the figures (the tests compare them to a run)."""
    from flame.ir.printer import fmt_bytes
    from flame.train.trainer import choose_backend, check_bucket_shapes_of
    t0 = time.time()
    t = cfg["train"]
    check_paths(cfg, source)
    backend, why = choose_backend(t["backend"])
    log(f"check: {source} (nothing is trained, no weights are read)")
    log(f"backend: {backend} ({why})")
    unet_cfg, vae_cfg, text_cfg = model_configs(cfg)
    ds = data.scan(cfg)
    log(data.report(ds))
    for f in ds.folders:
        log(f"  captions: {f['captioned']} of {f['images']} usable image(s) in {f['path']} have a caption file")
    check_bucket_shapes_of(ds, unet_cfg, vae_cfg, cfg["model"]["checkpoint"])
    per_epoch = len(data.epoch_batches(ds, cfg, 0))
    micro = t["steps"] * t["grad_accum"]
    log(f"steps: {t['steps']} optimizer steps x {t['grad_accum']} micro-batch(es) = {micro} micro-batches; "
        f"{per_epoch} per epoch, so {micro / per_epoch:.2f} epoch(s)")
    step, models = build_step(cfg, backend, unet_cfg, text_cfg)
    train_te = bool(models.te_params)
    plans = []
    for bucket, b, lat, txt in graph_shapes(ds, cfg, vae_cfg, text_cfg):
        text_shape = (b, text_cfg.max_position_embeddings) if train_te else txt
        sched = step.plan_for(lat, text_shape, "f32", "i64" if train_te else "f32")
        runs = sum(1 for k in sched.kernels if sched.runs(k))
        plans.append({"bucket": f"{bucket[0]}x{bucket[1]}", "batch": b, "arena": int(sched.plan.peak),
                      "kernels": runs, "parameters": param_bytes(sched.graph)})
        log(f"  training step for bucket {bucket[0]}x{bucket[1]}, batch {b}: arena {fmt_bytes(sched.plan.peak)} "
            f"planned, {runs} kernels; weights and optimizer state {fmt_bytes(plans[-1]['parameters'])}")
    log(f"check done in {time.time() - t0:.1f} s: the config is valid and the run is planned")
    return {"backend": backend, "images": sum(f["images"] for f in ds.folders), "skipped": len(ds.skipped),
            "buckets": {f"{w}x{h}": n for (w, h), n in sorted(ds.buckets.items())},
            "micro_batches_per_epoch": per_epoch, "plans": plans}
