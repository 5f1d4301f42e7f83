"""load_unet / load_vae: build the flame model and fill it from real checkpoint files.

Accepted `path`s:
  - a diffusers model folder (`unet/` or `vae/`: config.json + diffusion_pytorch_model[.fp16].safetensors);
  - a diffusers pipeline root holding `unet/` and `vae/`;
  - a single safetensors file, either in diffusers' layout or in the original CompVis/LDM
    layout (a full SD checkpoint with `model.diffusion_model.*` / `first_stage_model.*`,
    or a bare UNet/VAE file without those prefixes, e.g. vae-ft-mse-840000).

The config comes from `config` if given, else from the folder's (or the file's sibling)
config.json, else SD 1.5's. Tensors are memory-mapped and cast to the model's float32 once,
by load_state_dict(strict=True): missing, unexpected and mis-shaped keys are all reported,
naming the file.
"""
from __future__ import annotations

import json
import os

from flame.models.checkpoint import CheckpointError, load_safetensors
from flame.models.configs import SD15_UNET, SD15_VAE, UNetConfig, VAEConfig
from flame.models import keymaps
from flame.nn import StateDictError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PICKLE_FILES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def _model_dir(path: str, sub: str) -> str:
    """The diffusers model folder: `path` itself, or `path/sub` for a pipeline root."""
    if not any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES + PICKLE_FILES) \
            and os.path.isdir(os.path.join(path, sub)):
        return os.path.join(path, sub)
    return path


def _weights_in(folder: str) -> str:
    for f in WEIGHT_FILES + PICKLE_FILES:   # a .bin is refused by load_safetensors, with advice
        if os.path.exists(os.path.join(folder, f)):
            return os.path.join(folder, f)
    raise CheckpointError(f"{folder}: no {WEIGHT_FILES[0]} here (nor a {os.path.basename(folder)}/ "
                          "subfolder of a diffusers pipeline)")


def _read_config(folder: str) -> dict | None:
    p = os.path.join(folder, "config.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def _kind_of(keys) -> str:
    """'unet' | 'vae' | 'text' | '?' and the layout, from the key names alone."""
    ks = list(keys)
    def has(prefix):
        return any(k.startswith(prefix) for k in ks)
    if has(keymaps.UNET_PREFIX) or has("input_blocks.") or has("middle_block."):
        return "unet-ldm"
    if has("down_blocks.") and has("time_embedding."):
        return "unet-diffusers"
    if has(keymaps.VAE_PREFIX) or has("encoder.down.") or has("decoder.up."):
        return "vae-ldm"
    if has("encoder.down_blocks.") or has("decoder.up_blocks."):
        return "vae-diffusers"
    if has("cond_stage_model.") or has("text_model.") or has("transformer.text_model."):
        return "text-encoder"
    return "unknown"


_WHAT = {"unet": "a UNet", "vae": "a VAE", "text": "a text encoder", "unknown": "an unrecognised model"}


def _select(path: str, sd: dict, want: str) -> tuple[dict, str]:
    """The tensors of model `want` ('unet'|'vae') in `sd` and their layout ('ldm'|'diffusers')."""
    kind = _kind_of(sd)
    prefix = keymaps.UNET_PREFIX if want == "unet" else keymaps.VAE_PREFIX
    ignore = ("loss.", "model_ema.")                      # training leftovers in VAE files
    if any(k.startswith(prefix) for k in sd):            # a full SD checkpoint: take our part
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return {k: v for k, v in sd.items() if not k.startswith(ignore)}, "ldm"
    if kind.startswith(want):
        return {k: v for k, v in sd.items() if not k.startswith(ignore)}, kind.split("-")[1]
    got = _WHAT[kind.split("-")[0]]
    sample = ", ".join(list(sd)[:3])
    raise CheckpointError(f"{path}: this file holds {got} (keys like {sample}), not {_WHAT[want]}: "
                          f"pass it to the matching loader")


def _load(path, config, want, cfg_cls, default_cfg, build, table_fn):
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = _model_dir(path, want)
        file = _weights_in(folder)
    elif os.path.exists(path) or path.lower().endswith(".ckpt"):
        folder, file = os.path.dirname(path), path
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    sd = load_safetensors(file)
    sd, layout = _select(file, sd, want)
    if config is None:
        d = _read_config(folder) if layout == "diffusers" else None
        config = cfg_cls.from_dict(d) if d else default_cfg
    elif isinstance(config, dict):
        config = cfg_cls.from_dict(config)
    if layout == "ldm":
        sd, unknown = keymaps.ldm_to_diffusers(sd, table_fn(config))
        sd.update({f"{k} (original layout)": None for k in unknown})   # reported as unexpected
    elif want == "vae":
        sd = keymaps.rename_deprecated_vae_attention(sd)
    model = build(config)
    try:
        model.load_state_dict(sd, strict=True, source=file)
    except StateDictError as e:
        hint = ("" if config is not default_cfg else
                f"\n  (the config was {'SD 1.5' if want == 'unet' else 'the SD VAE'}'s default: "
                "if the file is another architecture, pass config=)")
        raise StateDictError(str(e) + hint) from None
    return model


def _build_shape_only(cls):
    """Construct without drawing random initial weights: load_state_dict fills every one."""
    from flame.nn.init import shape_only

    def build(cfg):
        with shape_only():
            return cls(cfg)
    return build


def load_unet(path, config: UNetConfig | dict | None = None):
    """A flame UNet2DConditionModel with the weights at `path` (see the module docstring)."""
    from flame.models.unet import UNet2DConditionModel
    return _load(path, config, "unet", UNetConfig, SD15_UNET,
                 _build_shape_only(UNet2DConditionModel), keymaps.unet_table)


def load_vae(path, config: VAEConfig | dict | None = None):
    """A flame AutoencoderKL with the weights at `path` (see the module docstring)."""
    from flame.models.vae import AutoencoderKL
    return _load(path, config, "vae", VAEConfig, SD15_VAE,
                 _build_shape_only(AutoencoderKL), keymaps.vae_table)
