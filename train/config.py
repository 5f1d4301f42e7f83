"""The trainer's TOML config: one table of every key (type, default, rule, meaning), loading,
`--set` overrides, and validation of every value before anything heavy starts.

    [model]    checkpoint, tokenizer, vae, architecture, clip_skip
    [[data]]   one table per image folder: path, repeats, trigger, captions, augmentation
    [buckets]  aspect-ratio buckets: resolution, step, min/max side, upscale, crop
    [network]  LoRA rank/alpha, conv LoRA, text-encoder LoRA
    [train]    steps, batch, learning rate and schedule, AdamW, objective, backend, seed
    [sample]   prompts rendered during training: sampler, steps, guidance, seed, size
    [save]     output folder, file name, dtype, periodic saves

docs/TRAINING.md is the user's reference; `KEYS` below is the source of truth (the doc's
key table is checked against it by a test). An unknown key is an error naming it, its file
and the closest known key.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from flame.ir.errors import FlameError


class ConfigError(FlameError, ValueError):
    pass


REQUIRED = object()


@dataclass(frozen=True)
class Key:
    type: Any                 # int, float, str, bool, list, or a tuple of choices (str)
    default: Any
    doc: str
    min: float | None = None  # inclusive bounds for numbers
    max: float | None = None
    gt: float | None = None   # exclusive lower bound
    optional: bool = False    # None (absent) allowed

    def kind(self) -> str:
        if isinstance(self.type, tuple):
            return " | ".join(f'"{c}"' for c in self.type)
        return {int: "integer", float: "number", str: "string", bool: "true/false", list: "list"}[self.type]


# ---------------------------------------------------------------- every key, with its rule

KEYS: dict[str, dict[str, Key]] = {
    "model": {
        "checkpoint": Key(str, REQUIRED, "the base model: an SD 1.x single-file .safetensors "
                          "(original layout) or a diffusers pipeline folder"),
        "tokenizer": Key(str, None, "CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json); "
                         "default: the pipeline folder's tokenizer/ (a single file has none: set this)",
                         optional=True),
        "vae": Key(str, None, "a separate VAE (file or folder) instead of the checkpoint's", optional=True),
        "architecture": Key(("sd15", "tiny"), "sd15", "the sizes a single file is read with (diffusers "
                            "folders use their config.json); tiny: the quickstart's test size"),
        "clip_skip": Key(int, 1, "use the text encoder's n-th layer from the end (1: the last)", min=1),
    },
    "data": {
        "path": Key(str, REQUIRED, "a folder of images (jpg, png, webp) with same-stem caption files"),
        "repeats": Key(int, None, "times each image is seen per epoch; default: N of a folder named "
                       "N_something (kohya's convention), else 1", min=1, optional=True),
        "trigger": Key(str, "", "a word put first in every caption that lacks it"),
        "caption_extension": Key(str, ".txt", "the caption file's extension"),
        "missing_caption": Key(("error", "skip", "trigger"), "error", "an image without a caption file: "
                               "stop with a list (error), leave the image out (skip), or caption it "
                               "with the trigger word alone (trigger)"),
        "shuffle_captions": Key(bool, False, "shuffle the comma-separated tags of a caption every time it is used"),
        "keep_tokens": Key(int, 0, "tags at the front that shuffling leaves in place (the trigger counts)", min=0),
        "caption_dropout": Key(float, 0.0, "probability of training an image with an empty caption", min=0, max=1),
        "flip": Key(bool, False, "flip images horizontally at random (both sides are cached)"),
    },
    "buckets": {
        "resolution": Key(int, 512, "target side: buckets hold at most resolution^2 pixels", min=64),
        "step": Key(int, 64, "bucket sides are multiples of this (64 for SD 1.x: latents / 8 ... / 8)", min=8),
        "min_size": Key(int, 256, "smallest bucket side", min=8),
        "max_size": Key(int, 1024, "largest bucket side", min=8),
        "upscale": Key(bool, False, "enlarge images smaller than the target area (off: a small image "
                       "gets a bucket of its own size)"),
        "crop": Key(("center", "random"), "center", "where the bucket is cut from the resized image "
                    "(random needs train.cache_latents = false: a cached latent has one crop)"),
    },
    "network": {
        "rank": Key(int, 16, "LoRA rank of attention, feed-forward and proj_in/proj_out layers", min=1),
        "alpha": Key(float, 8.0, "LoRA alpha: the update is scaled by alpha / rank", gt=0),
        "conv_rank": Key(int, 0, "LoCon: rank of ResBlock and sampler 3x3 convs (0: off)", min=0),
        "conv_alpha": Key(float, 1.0, "LoCon alpha", gt=0),
        "train_text_encoder": Key(bool, False, "also train a LoRA on the CLIP text encoder"),
        "text_encoder_rank": Key(int, None, "text-encoder LoRA rank (default: rank)", min=1, optional=True),
        "text_encoder_alpha": Key(float, None, "text-encoder LoRA alpha (default: alpha)", gt=0, optional=True),
    },
    "train": {
        "steps": Key(int, 1000, "optimizer steps", min=1),
        "batch_size": Key(int, 1, "images per micro-batch (all from one bucket)", min=1),
        "grad_accum": Key(int, 1, "micro-batches per optimizer step", min=1),
        "lr": Key(float, 1e-4, "learning rate of the UNet LoRA", min=0),
        "text_encoder_lr": Key(float, None, "learning rate of the text-encoder LoRA (default: lr)",
                               min=0, optional=True),
        "lr_scheduler": Key(("constant", "constant_with_warmup", "cosine", "linear"), "constant",
                            "learning-rate curve over the run"),
        "warmup_steps": Key(int, 0, "linear warm-up from 0 (constant_with_warmup, cosine, linear)", min=0),
        "betas": Key(list, [0.9, 0.999], "AdamW betas"),
        "eps": Key(float, 1e-8, "AdamW epsilon", gt=0),
        "weight_decay": Key(float, 1e-2, "AdamW decoupled weight decay", min=0),
        "max_grad_norm": Key(float, 1.0, "clip gradients to this global norm (0: off)", min=0),
        "nonfinite": Key(("stop", "skip"), "stop", "a step whose loss or gradients are NaN or infinite "
                         "never changes the weights; then stop the run (stop) or go on (skip; it still "
                         "stops after 10 such steps in a row)"),
        "prediction": Key(("epsilon", "v_prediction"), "epsilon", "what the UNet predicts"),
        "min_snr_gamma": Key(float, 0.0, "min-SNR-gamma loss weighting (0: off; 5 is usual)", min=0),
        "noise_offset": Key(float, 0.0, "weight of a per-channel noise offset (0: off)", min=0),
        "timestep_min": Key(int, 0, "timesteps are drawn uniformly from [timestep_min, timestep_max)", min=0),
        "timestep_max": Key(int, 1000, "see timestep_min", max=1000),
        "seed": Key(int, 0, "seed of everything random: LoRA init, data order, timesteps, noise", min=0),
        "backend": Key(("auto", "cuda", "cpu"), "auto", "where the compiled steps run (auto: cuda if an "
                       "NVIDIA GPU is usable, else cpu; printed at start)"),
        "base_dtype": Key(("auto", "bf16", "f32"), "auto", "storage of the frozen base weights "
                          "(auto: bf16 on cuda, f32 on cpu); arithmetic is float32"),
        "cache_latents": Key(bool, True, "encode each image once and keep its latents on disk"),
        "cache_dir": Key(str, None, "where latent and text caches live (default: "
                         "$FLAME_CACHE_DIR or ~/.cache/flame, then train/)", optional=True),
    },
    "sample": {
        "prompts": Key(list, [], "prompts to render during training and at the end (empty: no sampling)"),
        "negative_prompt": Key(str, "", "the negative prompt of classifier-free guidance"),
        "sampler": Key(("ddim", "euler"), "ddim", "DDIM (eta 0) or Euler, as diffusers' schedulers for SD 1.x"),
        "steps": Key(int, 20, "denoising steps per image", min=1, max=200),
        "guidance_scale": Key(float, 7.5, "classifier-free guidance scale (1: prompt only)", min=0),
        "seed": Key(int, 0, "seed of each image's start noise (the same for every prompt and step)", min=0),
        "width": Key(int, None, "image width (default: buckets.resolution)", min=8, optional=True),
        "height": Key(int, None, "image height (default: buckets.resolution)", min=8, optional=True),
        "every_steps": Key(int, 0, "also render every N steps (0: only at the end)", min=0),
    },
    "save": {
        "output_dir": Key(str, "output", "where the LoRA, the log and the resolved config go "
                          "(relative to the config file; --output overrides)"),
        "name": Key(str, "lora", "the LoRA file's name, without .safetensors"),
        "dtype": Key(("fp16", "bf16", "fp32"), "fp16", "dtype of the saved LoRA weights"),
        "every_steps": Key(int, 0, "every N steps also save <name>-step<N>.safetensors and the training "
                           "state that --resume continues from (0: only at the end)", min=0),
        "keep_last": Key(int, 3, "how many of those periodic checkpoints to keep (the oldest are deleted)", min=1),
    },
}
LIST_SECTIONS = {"data"}      # [[data]]: an array of tables


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(where: str, key: Key, v):
    if v is None:
        if key.optional:
            return None
        raise ConfigError(f"{where}: a value is required ({key.kind()})")
    t = key.type
    if isinstance(t, tuple):
        if not isinstance(v, str) or v not in t:
            raise ConfigError(f"{where} = {v!r}: choose one of {key.kind()}{_suggest(str(v), t)}")
        return v
    if t is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where} = {v!r}: must be true or false")
        return v
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ConfigError(f"{where} = {v!r}: must be an integer")
    elif t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where} = {v!r}: must be a number")
        v = float(v)
        if not math.isfinite(v):
            raise ConfigError(f"{where} = {v!r}: must be finite")
    elif t is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where} = {v!r}: must be a string (in quotes)")
        return v
    elif t is list:
        if not isinstance(v, list):
            raise ConfigError(f"{where} = {v!r}: must be a list, e.g. {key.default!r}")
        return v
    if key.min is not None and v < key.min:
        raise ConfigError(f"{where} = {v!r}: must be >= {key.min:g}")
    if key.max is not None and v > key.max:
        raise ConfigError(f"{where} = {v!r}: must be <= {key.max:g}")
    if key.gt is not None and not v > key.gt:
        raise ConfigError(f"{where} = {v!r}: must be > {key.gt:g}")
    return v


def _section(name: str, table, source: str, index: int | None = None) -> dict:
    label = f"{name}[{index}]" if index is not None else name
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{label}] must be a table of keys")
    keys = KEYS[name]
    for k in table:
        if k not in keys:
            raise ConfigError(f"{source}: unknown key {label}.{k}{_suggest(k, keys)}; "
                              f"[{name}] has: {', '.join(keys)}")
    out = {}
    for k, key in keys.items():
        where = f"{source}: {label}.{k}"
        if k in table:
            out[k] = _check_value(where, key, table[k])
        elif key.default is REQUIRED:
            raise ConfigError(f"{where} is missing: {key.doc}")
        else:
            out[k] = copy.deepcopy(key.default)
    return out


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' -> (['train', 'lr'], 2e-4). The value is read as TOML (numbers, true,
    lists, quoted strings); anything else is taken as a bare string (paths)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write section.key=value, e.g. train.lr=2e-4")
    path, _, raw = text.partition("=")
    parts = [p.strip() for p in path.strip().split(".")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key (or data.N.key for the N-th [[data]])")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_override(raw: dict, text: str):
    parts, value = parse_override(text)
    section = parts[0]
    if section not in KEYS:
        raise ConfigError(f"--set {text!r}: unknown section {section!r}{_suggest(section, KEYS)}")
    if section in LIST_SECTIONS:
        tables = raw.setdefault(section, [])
        if len(parts) == 2:   # data.key applies to every folder
            if not tables:
                raise ConfigError(f"--set {text!r}: the config has no [[{section}]] table")
            for t in tables:
                t[parts[1]] = value
            return
        try:
            i = int(parts[1])
            tables[i][parts[2]] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {text!r}: there are {len(tables)} [[{section}]] tables "
                              f"(data.0.key is the first)") from None
        return
    if len(parts) != 2:
        raise ConfigError(f"--set {text!r}: the key must be {section}.key")
    raw.setdefault(section, {})[parts[1]] = value


# ---------------------------------------------------------------- the whole config


def _abs(base: str, p: str | None) -> str | None:
    if p is None:
        return None
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def from_dict(raw: dict, source: str = "config", base_dir: str = ".") -> dict:
    """The validated config: every section present with defaults filled in, paths made
    absolute (relative ones are relative to the config file's folder), cross-key rules checked."""
    for s in raw:
        if s not in KEYS:
            raise ConfigError(f"{source}: unknown section [{s}]{_suggest(s, KEYS)}; "
                              f"sections: {', '.join(KEYS)}")
    cfg = {}
    for s in KEYS:
        if s in LIST_SECTIONS:
            tables = raw.get(s, [])
            if isinstance(tables, dict):
                tables = [tables]
            if not isinstance(tables, list) or not tables:
                raise ConfigError(f"{source}: no [[{s}]] table: add at least one image folder, e.g.\n"
                                  f"  [[data]]\n  path = \"images/10_mything\"")
            cfg[s] = [_section(s, t, source, i) for i, t in enumerate(tables)]
        else:
            cfg[s] = _section(s, raw.get(s, {}), source)
    m, t, sv = cfg["model"], cfg["train"], cfg["save"]
    for k in ("checkpoint", "tokenizer", "vae"):
        m[k] = _abs(base_dir, m[k])
    for d in cfg["data"]:
        d["path"] = _abs(base_dir, d["path"])
    t["cache_dir"] = _abs(base_dir, t["cache_dir"])
    sv["output_dir"] = _abs(base_dir, sv["output_dir"])
    _cross_checks(cfg, source)
    return cfg


def _cross_checks(cfg: dict, source: str):
    b, n, t, sv = cfg["buckets"], cfg["network"], cfg["train"], cfg["save"]
    betas = t["betas"]
    if len(betas) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1
                                  for x in betas):
        raise ConfigError(f"{source}: train.betas = {betas!r}: two numbers in [0, 1), e.g. [0.9, 0.999]")
    t["betas"] = [float(x) for x in betas]
    if not t["timestep_min"] < t["timestep_max"]:
        raise ConfigError(f"{source}: train.timestep_min = {t['timestep_min']} must be below "
                          f"train.timestep_max = {t['timestep_max']}")
    if t["lr_scheduler"] == "constant" and t["warmup_steps"]:
        raise ConfigError(f"{source}: train.warmup_steps = {t['warmup_steps']} with lr_scheduler = "
                          "\"constant\": use \"constant_with_warmup\" (or warmup_steps = 0)")
    if t["warmup_steps"] >= t["steps"] and t["warmup_steps"]:
        raise ConfigError(f"{source}: train.warmup_steps = {t['warmup_steps']} is not below "
                          f"train.steps = {t['steps']}")
    for k in ("step", "min_size", "max_size", "resolution"):
        if b[k] % 8:
            raise ConfigError(f"{source}: buckets.{k} = {b[k]} must be a multiple of 8 (the VAE's factor)")
    if b["min_size"] % b["step"] or b["max_size"] % b["step"]:
        raise ConfigError(f"{source}: buckets.min_size = {b['min_size']} and max_size = {b['max_size']} "
                          f"must be multiples of buckets.step = {b['step']}")
    if not b["step"] <= b["min_size"] <= b["resolution"] <= b["max_size"]:
        raise ConfigError(f"{source}: buckets need step <= min_size <= resolution <= max_size, got "
                          f"{b['step']}, {b['min_size']}, {b['resolution']}, {b['max_size']}")
    if b["crop"] == "random" and t["cache_latents"]:
        raise ConfigError(f"{source}: buckets.crop = \"random\" needs train.cache_latents = false "
                          "(a cached latent holds one crop)")
    if not n["train_text_encoder"]:
        for k in ("text_encoder_rank", "text_encoder_alpha"):
            if n[k] is not None:
                raise ConfigError(f"{source}: network.{k} is set but network.train_text_encoder is false")
        if t["text_encoder_lr"] is not None:
            raise ConfigError(f"{source}: train.text_encoder_lr is set but network.train_text_encoder is false")
    for i, d in enumerate(cfg["data"]):
        if d["missing_caption"] == "trigger" and not d["trigger"]:
            raise ConfigError(f"{source}: data[{i}].missing_caption = \"trigger\" needs data[{i}].trigger")
        if not d["caption_extension"].startswith("."):
            d["caption_extension"] = "." + d["caption_extension"]
    sm = cfg["sample"]
    if not all(isinstance(p, str) for p in sm["prompts"]):
        raise ConfigError(f"{source}: sample.prompts = {sm['prompts']!r}: a list of strings, e.g. [\"a photo of mything\"]")
    for k in ("width", "height"):
        if sm[k] is not None and sm[k] % 8:
            raise ConfigError(f"{source}: sample.{k} = {sm[k]} must be a multiple of 8 (the VAE's factor)")
    if not sv["name"] or os.sep in sv["name"] or sv["name"] in (".", ".."):
        raise ConfigError(f"{source}: save.name = {sv['name']!r} must be a plain file name")


def check_paths(cfg: dict, source: str = "config", data: bool = True):
    """The files and folders the run reads exist (checked before anything is loaded); with
    data=False the image folders are not needed (sampling)."""
    m = cfg["model"]
    if not os.path.exists(m["checkpoint"]):
        raise ConfigError(f"{source}: model.checkpoint = {m['checkpoint']}: no such file or folder")
    if m["checkpoint"].lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise ConfigError(f"{source}: model.checkpoint = {m['checkpoint']}: a pickle file; flame reads "
                          "safetensors only (convert it once with safetensors' convert tool or "
                          "diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py)")
    for k in ("tokenizer", "vae"):
        if m[k] is not None and not os.path.exists(m[k]):
            raise ConfigError(f"{source}: model.{k} = {m[k]}: no such file or folder")
    if m["tokenizer"] is None and not os.path.isdir(os.path.join(m["checkpoint"], "tokenizer")):
        raise ConfigError(f"{source}: model.tokenizer is not set and {m['checkpoint']} has no tokenizer/ "
                          "folder (single-file checkpoints carry none): point model.tokenizer at a "
                          "folder with vocab.json + merges.txt (SD 1.5's tokenizer/)")
    for i, d in enumerate(cfg["data"] if data else []):
        if not os.path.isdir(d["path"]):
            raise ConfigError(f"{source}: data[{i}].path = {d['path']}: no such folder")


def load(path, overrides=(), output: str | None = None) -> dict:
    """Read, override (`--set` strings) and validate a config file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for o in overrides:
        apply_override(raw, o)
    cfg = from_dict(raw, path, os.path.dirname(os.path.abspath(path)))
    if output is not None:
        cfg["save"]["output_dir"] = os.path.abspath(os.path.expanduser(output))
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def to_toml(cfg: dict) -> str:
    """The resolved config as TOML (what the run used; unset optional keys are left out)."""
    lines = []
    for s in KEYS:
        tables = cfg[s] if s in LIST_SECTIONS else [cfg[s]]
        for t in tables:
            lines.append(f"[[{s}]]" if s in LIST_SECTIONS else f"[{s}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in t.items() if v is not None]
            lines.append("")
    return "\n".join(lines)
