"""Resumable training state: one safetensors file per checkpoint, beside the LoRA it goes with.

    <output_dir>/state/<name>-step<NNNNNN>.state.safetensors
        param.<name>   the trainable LoRA weights in float32 (the LoRA file may be fp16)
        opt.<m|v|gsum>.<name>   AdamW's moments
        metadata: flame.position (optimizer step, epoch, batch position, micro-batch counter,
                  smoothed loss) and flame.config (the resolved config without [save])

Everything random in a run is a function of (seed, epoch) or (seed, micro-batch index), so
the position is the whole random state: resuming from it continues the same run bit for bit.
Files are written atomically (write, fsync, rename), so a crash mid-save leaves the previous
checkpoint as it was.
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from flame.models.checkpoint import load_safetensors, read_header, save_safetensors
from flame.train.config import ConfigError

FOLDER = "state"
SUFFIX = ".state.safetensors"


def state_path(output_dir: str, name: str, step: int) -> str:
    return os.path.join(output_dir, FOLDER, f"{name}-step{step:06d}{SUFFIX}")


def comparable_config(cfg: dict) -> dict:
    """What must not change between a run and its resumption: everything but [save]."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k != "save"}))


def save_state(path: str, params: dict, opt_state: dict, position: dict, cfg: dict):
    tensors = {f"param.{k}": np.asarray(v, np.float32) for k, v in params.items()}
    tensors.update({f"opt.{k}": np.asarray(v, np.float32) for k, v in opt_state.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_safetensors(tensors, path, {"flame.position": json.dumps(position),
                                     "flame.config": json.dumps(comparable_config(cfg))})


def load_state(path: str) -> tuple[dict, dict, dict, dict]:
    """(params, optimizer state, position, config) of a state file."""
    header, _ = read_header(path)
    meta = header.get("__metadata__", {})
    if "flame.position" not in meta or "flame.config" not in meta:
        raise ConfigError(f"{path}: not a flame-train state file (no flame.position / flame.config metadata)")
    raw = load_safetensors(path)
    params = {k[len("param."):]: np.array(v) for k, v in raw.items() if k.startswith("param.")}
    opt = {k[len("opt."):]: np.array(v) for k, v in raw.items() if k.startswith("opt.")}
    return params, opt, json.loads(meta["flame.position"]), json.loads(meta["flame.config"])


def _step_of(path: str) -> int:
    m = re.search(r"-step(\d+)" + re.escape(SUFFIX) + "$", path)
    return int(m.group(1)) if m else -1


def list_states(output_dir: str, name: str) -> list[str]:
    """State files of this run's name, oldest step first."""
    paths = glob.glob(os.path.join(glob.escape(os.path.join(output_dir, FOLDER)), f"{glob.escape(name)}-step*{SUFFIX}"))
    return sorted((p for p in paths if _step_of(p) >= 0), key=_step_of)


def latest_state(output_dir: str, name: str) -> str | None:
    states = list_states(output_dir, name)
    return states[-1] if states else None


def config_difference(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Lines 'train.lr: 0.001 (saved) -> 0.002 (now)' for every key that differs."""
    out = []
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in list(saved) + [k for k in now if k not in saved]:
            out += config_difference(saved.get(k), now.get(k), f"{prefix}.{k}" if prefix else k)
    elif isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now) \
            and all(isinstance(x, dict) for x in saved + now):
        for i, (a, b) in enumerate(zip(saved, now)):
            out += config_difference(a, b, f"{prefix}[{i}]")
    elif saved != now:
        out.append(f"{prefix}: {saved!r} (saved) -> {now!r} (now)")
    return out


def prune(output_dir: str, name: str, keep: int, lora_of_step) -> list[str]:
    """Delete all but the newest `keep` checkpoints (state file and its periodic LoRA)."""
    removed = []
    for p in list_states(output_dir, name)[:-keep]:
        for f in (p, lora_of_step(_step_of(p))):
            if f and os.path.exists(f):
                os.remove(f)
                removed.append(f)
    return removed
