"""The SD 1.x training objective: DDPM noise schedule, noising, targets, min-SNR-γ, loss.

The schedule tables are numpy constants computed in float64 like the original LDM code
(`linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`), then stored as float32 tables of the
quantities the graph needs, so the graph gathers and never takes `1 - alphas_cumprod` in
float32 (which loses digits near t = 0). diffusers' DDPMScheduler computes the same schedule
in float32; the two agree to ~1e-5 relative.

Randomness (the one split the trainer must know):
- timesteps are drawn on the host (`sample_timesteps`, a seeded numpy Generator) and fed as
  an int64[B] input: B integers per step, reproducible, and the loop can log them;
- noise (and the noise offset) is drawn in the graph from flame's counter-based RNG with a
  0-d int64 `seed` input (`sample_noise`), so a step's host->device traffic is one integer
  instead of a latent-sized array, and the interpreter, CPU and CUDA backends draw the same
  numbers for the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import flame
from flame.ir.ops import gather
from flame.ir.tensor import Tensor

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
PREDICTIONS = ("epsilon", "v_prediction")

BETAS = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)                       # float64
SQRT_ALPHAS_CUMPROD = np.sqrt(ALPHAS_CUMPROD).astype(np.float32)
SQRT_ONE_MINUS_ALPHAS_CUMPROD = np.sqrt(1.0 - ALPHAS_CUMPROD).astype(np.float32)
SNR = (ALPHAS_CUMPROD / (1.0 - ALPHAS_CUMPROD)).astype(np.float32)   # alpha^2 / sigma^2


@dataclass(frozen=True)
class ObjectiveConfig:
    """prediction: what the UNet predicts (SD 1.x: epsilon; SD 2.x-v models: v_prediction).
    min_snr_gamma: None or > 0 (Hang et al. 2023; 5 is the usual value). noise_offset: the
    weight of a per-channel constant added to the noise (0 = off). Timesteps are uniform
    integers in [t_min, t_max)."""
    prediction: str = "epsilon"
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    t_min: int = 0
    t_max: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self):
        where = "train/objective.py ObjectiveConfig"
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"{where}: prediction={self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"{where}: min_snr_gamma={self.min_snr_gamma!r} must be > 0 (or None for off)")
        if not self.noise_offset >= 0:
            raise ValueError(f"{where}: noise_offset={self.noise_offset!r} must be >= 0")
        if not 0 <= self.t_min < self.t_max <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"{where}: timestep range [{self.t_min}, {self.t_max}) must satisfy "
                             f"0 <= t_min < t_max <= {NUM_TRAIN_TIMESTEPS}")


def as_objective_config(cfg) -> ObjectiveConfig:
    if cfg is None:
        return ObjectiveConfig()
    if isinstance(cfg, ObjectiveConfig):
        return cfg
    if isinstance(cfg, dict):
        return ObjectiveConfig(**cfg)
    raise TypeError(f"train/objective.py: expected an ObjectiveConfig or dict, got {type(cfg).__name__}")


# ---------------------------------------------------------------- host side

def sample_timesteps(rng: np.random.Generator, batch: int, cfg: ObjectiveConfig) -> np.ndarray:
    """Uniform integer timesteps in [t_min, t_max), int64[batch]."""
    return rng.integers(cfg.t_min, cfg.t_max, size=int(batch), dtype=np.int64)


# ---------------------------------------------------------------- in the graph

def _per_sample(table: np.ndarray, t: Tensor, ndim: int) -> Tensor:
    """table[t] shaped [B, 1, ..., 1] to broadcast against a rank-`ndim` batch."""
    v = gather(Tensor.const(table), t)
    return v.reshape((t.shape[0],) + (1,) * (ndim - 1))


def add_noise(latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = sqrt(ac_t) x_0 + sqrt(1 - ac_t) eps (DDPMScheduler.add_noise)."""
    a = _per_sample(SQRT_ALPHAS_CUMPROD, t, latents.ndim)
    s = _per_sample(SQRT_ONE_MINUS_ALPHAS_CUMPROD, t, latents.ndim)
    return a * latents + s * noise


def velocity(latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """v = sqrt(ac_t) eps - sqrt(1 - ac_t) x_0 (DDPMScheduler.get_velocity)."""
    a = _per_sample(SQRT_ALPHAS_CUMPROD, t, latents.ndim)
    s = _per_sample(SQRT_ONE_MINUS_ALPHAS_CUMPROD, t, latents.ndim)
    return a * noise - s * latents


def target(latents: Tensor, noise: Tensor, t: Tensor, prediction: str) -> Tensor:
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return velocity(latents, noise, t)
    raise ValueError(f"train/objective.py: unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def min_snr_weights(t: Tensor, gamma: float, prediction: str) -> Tensor:
    """f32[B]: min(snr, γ) / snr for epsilon, min(snr, γ) / (snr + 1) for v-prediction
    (kohya's apply_snr_weight; diffusers' train_text_to_image --snr_gamma)."""
    snr = gather(Tensor.const(SNR), t)
    clipped = snr.minimum(float(gamma))
    return clipped / (snr + 1.0) if prediction == "v_prediction" else clipped / snr


def sample_noise(shape, seed: Tensor, noise_offset: float = 0.0) -> Tensor:
    """N(0, 1) of `shape` [B, C, H, W] from the counter-based RNG, plus
    noise_offset * N(0, 1)[B, C, 1, 1] when the offset is on. Draw order is fixed (noise,
    then offset), so each draw keeps its stream for a given seed."""
    noise = flame.rand_normal(shape, seed=seed)
    if noise_offset:
        noise = noise + float(noise_offset) * flame.rand_normal(tuple(shape[:2]) + (1, 1), seed=seed)
    return noise


def weighted_mse(pred: Tensor, tgt: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error over all but the batch axis, weighted, averaged."""
    d = pred.cast("f32") - tgt.cast("f32")
    per = (d * d).mean(dim=tuple(range(1, d.ndim)))
    if weights is not None:
        per = per * weights
    return per.mean()


def diffusion_loss(model, latents: Tensor, context: Tensor, t: Tensor, seed: Tensor,
                   cfg: ObjectiveConfig) -> Tensor:
    """The whole objective: draw noise, noise the latents, predict, weighted mse.
    model(noisy_latents, timesteps, context) -> prediction (the UNet's call)."""
    noise = sample_noise(latents.shape, seed, cfg.noise_offset)
    latents = latents.cast("f32")
    pred = model(add_noise(latents, noise, t), t, context)
    w = None if cfg.min_snr_gamma is None else min_snr_weights(t, cfg.min_snr_gamma, cfg.prediction)
    return weighted_mse(pred, target(latents, noise, t, cfg.prediction), w)
