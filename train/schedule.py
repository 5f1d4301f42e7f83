"""Learning-rate schedules, computed on the host and fed to the compiled step as an input.

The curves are diffusers' `get_scheduler` ones (kohya's trainer uses the same): the LR for
optimizer step k (k = 0 for the first update) is lr * lambda(k), where lambda is the
LambdaLR factor after k scheduler steps. Warm-up is linear from 0, so the first update of a
warm-up schedule has LR 0, as in diffusers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


@dataclass(frozen=True)
class ScheduleConfig:
    """name: one of SCHEDULES. total_steps: optimizer steps of the run (cosine and linear
    reach their end there). num_cycles: cosine's number of half-waves times 2 (0.5: one
    decay from lr to 0, diffusers' default)."""
    lr: float
    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    num_cycles: float = 0.5

    def __post_init__(self):
        where = "train/schedule.py ScheduleConfig"
        if self.name not in SCHEDULES:
            raise ValueError(f"{where}: unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"{where}: lr={self.lr!r} must be a finite number >= 0")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"{where}: warmup_steps={self.warmup_steps} must be >= 0 and "
                             f"total_steps={self.total_steps} >= 1")
        if self.name == "constant" and self.warmup_steps:
            raise ValueError(f"{where}: the 'constant' schedule has no warm-up "
                             f"(warmup_steps={self.warmup_steps}); use 'constant_with_warmup'")


def factor(step: int, cfg: ScheduleConfig) -> float:
    """The multiplier of cfg.lr at 0-based optimizer step `step`."""
    w = cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if step < w:
        return float(step) / float(max(1, w))
    if cfg.name == "constant_with_warmup":
        return 1.0
    if cfg.name == "linear":
        return max(0.0, float(cfg.total_steps - step) / float(max(1, cfg.total_steps - w)))
    progress = float(step - w) / float(max(1, cfg.total_steps - w))   # cosine
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cfg.num_cycles) * 2.0 * progress)))


def lr_at(step: int, cfg) -> float:
    """The learning rate of 0-based optimizer step `step`. cfg: a ScheduleConfig or a dict
    of its fields."""
    if isinstance(cfg, dict):
        cfg = ScheduleConfig(**cfg)
    if step < 0:
        raise ValueError(f"train/schedule.py: step {step} must be >= 0")
    return cfg.lr * factor(int(step), cfg)
