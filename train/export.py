"""The LoRA file: kohya sd-scripts' format, which ComfyUI, A1111 and diffusers read.

Tensors, per adapted layer `<name>` (lora_unet_<module path with _>, lora_te_<...>):
    <name>.lora_down.weight   [r, in] or, for convs, [r, in, kh, kw]     (save dtype)
    <name>.lora_up.weight     [out, r] or [out, r, 1, 1]                 (save dtype)
    <name>.alpha              0-d, always written, float32 whatever the save dtype: readers
                              take .item(), and alpha/rank is then exactly the trained scale
                              (bf16 would turn alpha=0.3 into 0.30078)

Metadata (all strings). Written from the modules, never taken from the caller when they differ:
    ss_network_module "networks.lora", ss_network_dim, ss_network_alpha (the Linear/1x1 rank and
    alpha), ss_network_args (JSON {"conv_dim", "conv_alpha"}, only with conv LoRA, as kohya),
    ss_base_model_version "sd_v1", ss_v2 "False", modelspec.sai_model_spec,
    modelspec.architecture "stable-diffusion-v1/lora", sshs_model_hash (sha256 of the tensor
    data, A1111's additional-networks hash).
Defaults the caller may override: modelspec.implementation "diffusers" (kohya's value for SD 1.x
LoRAs), modelspec.title (the file name), modelspec.date (now, ISO 8601), modelspec.resolution
"512x512", modelspec.prediction_type "epsilon".
Everything else comes from the caller under kohya's names, e.g. ss_learning_rate,
ss_text_encoder_lr, ss_unet_lr, ss_max_train_steps, ss_lr_scheduler, ss_lr_warmup_steps,
ss_optimizer, ss_seed, ss_noise_offset, ss_min_snr_gamma, ss_clip_skip, ss_resolution,
ss_num_train_images, ss_batch_size_per_device, ss_gradient_accumulation_steps,
ss_max_grad_norm, ss_mixed_precision, ss_caption_dropout_rate, ss_keep_tokens,
ss_training_started_at, ss_training_finished_at, ss_output_name, ss_steps, ss_epoch,
ss_tag_frequency ({dataset: {tag: count}}), ss_dataset_dirs, modelspec.trigger_phrase,
modelspec.encoder_layer (clip skip), modelspec.timestep_range, modelspec.author, ...
dicts and lists are written as JSON, other values with str(); None values are left out.
"""
from __future__ import annotations

import collections
import datetime
import difflib
import hashlib
import json
import os

import numpy as np

from flame.models.checkpoint import load_safetensors, save_safetensors
from flame.models.checkpoint import metadata as read_metadata
from flame.train.lora import TE_PREFIX, UNET_PREFIX, LoRAConv2d, LoRAError, lora_modules

SAVE_DTYPES = {"fp16": np.float16, "float16": np.float16, "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp32": np.float32, "float32": np.float32}
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
MODELSPEC_VERSION = "1.0.0"
ARCHITECTURE = "stable-diffusion-v1/lora"


def _np_dtype(dtype):
    if dtype not in SAVE_DTYPES:
        raise LoRAError(f"LoRA save dtype {dtype!r}: use fp16, bf16 or fp32")
    d = SAVE_DTYPES[dtype]
    if d == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(d)


def _is_conv3(m) -> bool:
    return isinstance(m, LoRAConv2d) and m.kernel_size != (1, 1)


def _num(v) -> str:
    return str(float(v))   # kohya's argparse floats: "4.0", "1.0"


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0] if values else None


def lora_tensors(modules: dict, dtype="fp16") -> dict:
    """{key: numpy array} in the file's layout and order."""
    d = _np_dtype(dtype)
    out = {}
    for name, m in modules.items():
        if not name.startswith((UNET_PREFIX + "_", TE_PREFIX + "_")):
            raise LoRAError(f"LoRA module name {name!r} must start with {UNET_PREFIX}_ or {TE_PREFIX}_")
        out[f"{name}.lora_down.weight"] = np.asarray(m.lora_down.weight.data, np.float32).astype(d)
        out[f"{name}.lora_up.weight"] = np.asarray(m.lora_up.weight.data, np.float32).astype(d)
        out[f"{name}.alpha"] = np.array(m.alpha, np.float32)
    return out


def _text(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list, tuple)) else str(v)


def lora_metadata(modules: dict, tensors: dict, metadata: dict | None, title: str) -> dict:
    """The file's metadata: facts from the modules, defaults, then the caller's keys."""
    lin = [m for m in modules.values() if not _is_conv3(m)]
    conv = [m for m in modules.values() if _is_conv3(m)]
    facts = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False",
             "modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": ARCHITECTURE}
    if lin:
        facts["ss_network_dim"] = str(_most_common([m.rank for m in lin]))
        facts["ss_network_alpha"] = _num(_most_common([m.alpha for m in lin]))
    if conv:
        facts["ss_network_args"] = json.dumps({"conv_dim": str(_most_common([m.rank for m in conv])),
                                               "conv_alpha": _num(_most_common([m.alpha for m in conv]))})
    h = hashlib.sha256()   # the data section as written: what A1111 hashes when it reads the file
    for a in tensors.values():
        h.update(np.ascontiguousarray(a).tobytes())
    facts["sshs_model_hash"] = h.hexdigest()
    out = {"modelspec.implementation": "diffusers", "modelspec.title": title,
           "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
           "modelspec.resolution": "512x512", "modelspec.prediction_type": "epsilon"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str):
            raise LoRAError(f"LoRA metadata key {k!r} is not a string")
        if v is None:
            continue
        v = _text(v)
        if k in facts and v != facts[k]:
            raise LoRAError(f"LoRA metadata {k}={v!r} contradicts the modules being saved ({facts[k]!r})")
        out[k] = v
    out.update(facts)
    return out


def save_lora(path, modules: dict, metadata: dict | None = None, dtype="fp16") -> dict:
    """Write the LoRA file atomically; returns the metadata written. `modules` is
    {kohya name: LoRA module}, e.g. inject_lora(...) | inject_lora_text_encoder(...)."""
    path = os.fspath(path)
    if not modules:
        raise LoRAError(f"{path}: no LoRA modules to save")
    tensors = lora_tensors(modules, dtype)
    title = os.path.splitext(os.path.basename(path))[0]
    meta = lora_metadata(modules, tensors, metadata, title)
    save_safetensors(tensors, path, meta)
    return meta


def load_lora(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a kohya-format LoRA file, checked: every key is
    <lora_unet_|lora_te_...>.<lora_down.weight|lora_up.weight|alpha>, each name has both weights,
    their shapes agree, alpha is one number. Tensors are copied out of the mapped file."""
    path = os.fspath(path)
    raw = load_safetensors(path)
    groups = collections.defaultdict(dict)
    for k, v in raw.items():
        name, _, suffix = k.partition(".")
        if suffix not in SUFFIXES or not name.startswith((UNET_PREFIX + "_", TE_PREFIX + "_")):
            raise LoRAError(f"{path}: unknown key {k!r}: flame reads kohya-format LoRAs "
                            f"(<lora_unet_...|lora_te_...>.<{'|'.join(SUFFIXES)}>)")
        groups[name][suffix] = np.array(v)
    tensors = {}
    for name, g in groups.items():
        for s in SUFFIXES[:2]:
            if s not in g:
                raise LoRAError(f"{path}: {name}.{s} is missing")
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] \
                or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise LoRAError(f"{path}: {name}: lora_down {list(down.shape)} and lora_up {list(up.shape)} "
                            "do not form a LoRA (down [r, in(, kh, kw)], up [out, r(, 1, 1)])")
        if "alpha" in g and g["alpha"].size != 1:
            raise LoRAError(f"{path}: {name}.alpha has shape {list(g['alpha'].shape)}, not one number")
        tensors.update({f"{name}.{s}": g[s] for s in SUFFIXES if s in g})
    return tensors, read_metadata(path)


def apply_lora(unet, te, path, strict: bool = True) -> dict:
    """Load a saved LoRA into modules injected earlier (inject_lora / inject_lora_text_encoder
    with the same targets): weights cast to float32, alpha taken from the file (rank when the
    file has none, as kohya). Apply before compiling: alpha is baked into traced graphs.
    Every name in the file must have a module; with strict, every module a name in the file.
    Returns {kohya name: module} of the loaded modules."""
    path = os.fspath(path)
    tensors, _ = load_lora(path)
    targets = {}
    for model, prefix in ((unet, UNET_PREFIX), (te, TE_PREFIX)):
        if model is not None:
            targets.update(lora_modules(model, prefix))
    names = list(dict.fromkeys(k.partition(".")[0] for k in tensors))
    unknown = [n for n in names if n not in targets]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(targets), n=1)
        which = "the text encoder" if unknown[0].startswith(TE_PREFIX + "_") else "the UNet"
        raise LoRAError(f"{path}: {len(unknown)} LoRA name(s) have no injected module in {which}, e.g. "
                        f"{unknown[0]!r}" + (f" (closest: {hint[0]!r})" if hint else "")
                        + ": inject LoRA with the same targets (conv_rank, text encoder) first")
    if strict:
        missing = [n for n in targets if n not in names]
        if missing:
            raise LoRAError(f"{path}: {len(missing)} injected LoRA module(s) are not in the file, e.g. "
                            f"{missing[0]!r} (strict=False leaves them as they are)")
    for n in names:   # check everything before changing anything
        for s, p in targets[n].lora_parameters().items():
            a = tensors[f"{n}.{s}"]
            if tuple(a.shape) != tuple(p.shape):
                raise LoRAError(f"{path}: {n}.{s} has shape {list(a.shape)}, the module has {list(p.shape)}")
        alpha = tensors.get(f"{n}.alpha")
        if alpha is not None and not float(alpha.reshape(())) > 0:
            raise LoRAError(f"{path}: {n}.alpha is {float(alpha.reshape(()))}, not a positive number")
    out = {}
    for n in names:
        m = targets[n]
        for s in SUFFIXES[:2]:
            m.lora_parameters()[s].data = np.array(tensors[f"{n}.{s}"], np.float32)
        alpha = tensors.get(f"{n}.alpha")
        m.alpha = float(alpha.reshape(())) if alpha is not None else float(m.rank)
        out[n] = m
    return out


__all__ = ["save_lora", "load_lora", "apply_lora", "lora_tensors", "lora_metadata"]
