"""load_text_encoder: build the flame CLIP text encoder and fill it from checkpoint files.

Accepted `path`s:
  - a transformers/diffusers model folder (`text_encoder/`: config.json + model[.fp16].safetensors);
  - a diffusers pipeline root holding `text_encoder/`;
  - a single safetensors file: a full SD 1.x checkpoint in the original layout
    (`cond_stage_model.transformer.text_model.*`, or the older `cond_stage_model.transformer.*`
    without `text_model.`), or a bare text encoder file.

Key layouts mapped to flame's (= the Hub's `text_model.*`): transformers 5 saves without the
`text_model.` prefix, so bare `embeddings.*`/`encoder.*`/`final_layer_norm.*` get it added.
`*.embeddings.position_ids` is dropped wherever it appears: it is the constant 0..n-1, which
transformers >= 4.31 no longer saves and older checkpoints do (some merged ones as damaged
floats like 76.9999, which A1111 has to repair); flame always uses the exact arange.

The config comes from `config` if given, else the folder's (or a bare file's sibling)
config.json, else SD 1.5's. Tensors are memory-mapped and cast to float32 once, by
load_state_dict(strict=True): missing, unexpected and mis-shaped keys are reported, naming the file.
"""
from __future__ import annotations

import os

from flame.models.checkpoint import CheckpointError, load_safetensors
from flame.models.configs_clip import SD15_TEXT, CLIPTextConfig
from flame.models.loading import _read_config
from flame.nn import StateDictError

WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.fp16.bin")
LDM_PREFIX = "cond_stage_model.transformer."
PREFIX = "text_model."
BARE = ("embeddings.", "encoder.", "final_layer_norm.")


def _locate(path: str) -> tuple[str, str]:
    """(file, folder whose config.json applies) for a folder, pipeline root or file."""
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "text_encoder")):
            for f in WEIGHT_FILES + PICKLE_FILES:   # a .bin is refused by load_safetensors, with advice
                if os.path.exists(os.path.join(folder, f)):
                    return os.path.join(folder, f), folder
        raise CheckpointError(f"{path}: no {WEIGHT_FILES[0]} here (nor a text_encoder/ subfolder "
                              "of a diffusers pipeline)")
    if os.path.exists(path) or path.lower().endswith(".ckpt"):
        return path, os.path.dirname(path)
    raise CheckpointError(f"{path}: no such file or folder")


def to_flame_keys(sd: dict) -> tuple[dict, str]:
    """The text encoder's tensors in `sd`, renamed to flame's keys, and the layout found:
    'ldm' (cond_stage_model.transformer.*), 'hf' (text_model.*), 'hf5' (bare) or 'unknown'
    (returned unchanged, for load_state_dict to report)."""
    if any(k.startswith(LDM_PREFIX) for k in sd):
        layout = "ldm"
        sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
        sd = {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in sd.items()}
    elif any(k.startswith(PREFIX) for k in sd):
        layout = "hf"
    elif any(k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")) for k in sd):
        layout = "hf5"
        sd = {(PREFIX + k if k.startswith(BARE) else k): v for k, v in sd.items()}
    else:
        return sd, "unknown"
    return {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}, layout


def load_text_encoder(path, config: CLIPTextConfig | dict | None = None, clip_skip: int = 1):
    """A flame CLIPTextModel with the weights at `path` (see the module docstring)."""
    from flame.models.clip import CLIPTextModel
    from flame.nn.init import shape_only
    file, folder = _locate(os.fspath(path))
    raw = load_safetensors(file)
    if any(k.startswith("cond_stage_model.model.") for k in raw):
        raise CheckpointError(f"{file}: the text encoder here is OpenCLIP's (SD 2.x, "
                              "cond_stage_model.model.*), which flame does not build")
    sd, layout = to_flame_keys(raw)
    default = config is None
    if config is None:
        d = _read_config(folder) if layout in ("hf", "hf5") else None
        config = CLIPTextConfig.from_dict(d) if d else SD15_TEXT
        default = d is None
    elif isinstance(config, dict):
        config = CLIPTextConfig.from_dict(config)
    with shape_only():   # no random initial weights: load_state_dict fills every one
        model = CLIPTextModel(config, clip_skip=clip_skip)
    try:
        model.load_state_dict(sd, strict=True, source=file)
    except StateDictError as e:
        hint = ""
        if layout == "unknown":
            hint = (f"\n  (no text encoder keys in this file — keys like {', '.join(list(raw)[:3])}: "
                    "is it a UNet or VAE? Those go to load_unet / load_vae)")
        elif default:
            hint = "\n  (the config was SD 1.5's default: if the file is another size, pass config=)"
        raise StateDictError(str(e) + hint) from None
    return model
