"""`flame-train sample`: the config's [sample] prompts rendered with a saved LoRA, no training."""
from __future__ import annotations

import os

from flame.train import sample
from flame.train.config import check_paths
from flame.train.export import apply_lora, load_lora
from flame.train.trainer import Encoders, Log, TrainError, add_lora, choose_backend, load_models, make_sampler, sample_size


def render_lora(cfg: dict, lora_path: str, source: str = "config", quiet: bool = False) -> list[str]:
    """`flame-train sample`: the [sample] prompts with a saved LoRA, without training; the
    LoRA's ranks (and whether it has conv or text-encoder layers) are read from the file."""
    log = Log(None, quiet)
    check_paths(cfg, source, data=False)
    if not cfg["sample"]["prompts"]:
        raise TrainError(f"{source}: sample.prompts is empty: nothing to render "
                         "(e.g. --set 'sample.prompts=[\"a photo of mything\"]')")
    backend, why = choose_backend(cfg["train"]["backend"])
    log(f"backend: {backend} ({why})")
    tensors, _ = load_lora(lora_path)
    downs = {k.partition(".")[0]: v for k, v in tensors.items() if k.endswith("lora_down.weight")}
    lin = [v.shape[0] for v in downs.values() if v.ndim == 2 or v.shape[2:] == (1, 1)]
    conv = [v.shape[0] for v in downs.values() if v.ndim == 4 and v.shape[2:] != (1, 1)]
    te = [v.shape[0] for k, v in downs.items() if k.startswith("lora_te")]
    net = {**cfg["network"], "rank": max(set(lin), key=lin.count) if lin else 1,
           "conv_rank": max(set(conv), key=conv.count) if conv else 0, "train_text_encoder": bool(te),
           "text_encoder_rank": max(set(te), key=te.count) if te else None, "text_encoder_alpha": None}
    models = load_models(cfg, log)
    add_lora(models, {**cfg, "network": net}, log)
    n = apply_lora(models.unet, models.text_encoder if te else None, lora_path)
    log(f"applied {len(n)} LoRA layers from {lora_path}")
    sampler = make_sampler(models, Encoders(models, backend, log), cfg, backend)
    folder = os.path.join(cfg["save"]["output_dir"], "samples")
    tag = os.path.splitext(os.path.basename(lora_path))[0]
    paths = sample.render(sampler, cfg["sample"], folder, tag, sample_size(cfg))
    for p in paths:
        log(f"wrote {p}")
    return paths
