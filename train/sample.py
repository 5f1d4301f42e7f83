"""Sample images: DDIM and Euler samplers with classifier-free guidance, on the compiled UNet
(with whatever LoRA it carries) and the compiled VAE decoder.

One denoising step is one compiled graph per image size: the UNet on [negative, prompt], the
guidance mix and the sampler's update x' = c_x * x + c_eps * eps, with the step's
coefficients fed in as a small float32 input (so all steps of all samplers share the graph).
The coefficient tables follow diffusers' schedulers for SD 1.x (tested against them):

- DDIM (eta 0), "leading" timesteps with steps_offset 1, the last step to alphas_cumprod[0]
  (DDIMScheduler with set_alpha_to_one = False, as SD 1.x's pipelines configure it);
- Euler (EulerDiscreteScheduler's defaults): "linspace" timesteps, sigmas interpolated, the
  model input scaled by 1 / sqrt(sigma^2 + 1), the start noise by sqrt(sigma_max^2 + 1).

A v-prediction model's output becomes eps = sqrt(a) v + sqrt(1 - a) x_t inside the graph.
The start noise comes from numpy's generator seeded with the sample seed: the same seed gives
the same image on every backend.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

import flame
from flame.train.objective import ALPHAS_CUMPROD, NUM_TRAIN_TIMESTEPS

SAMPLERS = ("ddim", "euler")


@dataclass
class Plan:
    timesteps: np.ndarray     # float32 [n]: the UNet's timestep input per step
    coefs: np.ndarray         # float32 [n, 5]: c_in, c_x, c_eps, sqrt(a), sqrt(1 - a)
    init_sigma: float         # the start noise's scale


def ddim_plan(steps: int, ac: np.ndarray = ALPHAS_CUMPROD) -> Plan:
    ratio = NUM_TRAIN_TIMESTEPS // steps
    ts = (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + 1
    rows = []
    for t in ts:
        prev = t - ratio
        a, ap = ac[t], (ac[prev] if prev >= 0 else ac[0])
        rows.append([1.0, np.sqrt(ap / a), np.sqrt(1 - ap) - np.sqrt(ap) * np.sqrt(1 - a) / np.sqrt(a),
                     np.sqrt(a), np.sqrt(1 - a)])
    return Plan(ts.astype(np.float32), np.array(rows, np.float32), 1.0)


def euler_plan(steps: int, ac: np.ndarray = ALPHAS_CUMPROD) -> Plan:
    ts = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps, dtype=np.float64)[::-1].copy()
    sigmas = np.interp(ts, np.arange(NUM_TRAIN_TIMESTEPS), np.sqrt((1 - ac) / ac))
    sigmas = np.concatenate([sigmas, [0.0]])
    rows = []
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        c_in = 1.0 / np.sqrt(s * s + 1)
        rows.append([c_in, 1.0, sn - s, c_in, s * c_in])       # a = 1 / (sigma^2 + 1)
    return Plan(ts.astype(np.float32), np.array(rows, np.float32), float(sigmas.max()))


PLANS = {"ddim": ddim_plan, "euler": euler_plan}


def denoise_step(unet, prediction: str):
    """step(x [1,4,h,w], context [2,77,d] (negative, prompt), t f32[1], coef f32[5],
    guidance f32[]) -> the next x."""
    def step(x, context, t, coef, guidance):
        xin = x * coef[0]
        pair = flame.concat([xin, xin], 0)
        out = unet(pair, t, context)
        if prediction == "v_prediction":
            out = out * coef[3] + pair * coef[4]
        uncond, cond = out[0:1], out[1:2]
        eps = uncond + (cond - uncond) * guidance
        return x * coef[1] + eps * coef[2]
    return step


class Sampler:
    """Images from prompts with the given (compiled) models; graphs are compiled per size on
    first use and reused, also while the LoRA's weights change during training."""

    def __init__(self, unet, vae, text_fn, prediction: str = "epsilon", backend: str = "cpu"):
        self.unet, self.vae, self.text_fn = unet, vae, text_fn
        self.prediction, self.backend = prediction, backend
        self.graphs = {}

    def _graph(self, key, build):
        if key not in self.graphs:
            self.graphs[key] = build()
        return self.graphs[key]

    def latents(self, prompt: str, negative: str, sampler: str, steps: int, guidance: float, seed: int,
                shape: tuple) -> np.ndarray:
        """The final latents [1, c, h, w] (before the VAE)."""
        plan = PLANS[sampler](steps)
        context = np.concatenate([self.text_fn(negative), self.text_fn(prompt)], 0).astype(np.float32)
        x = (np.random.default_rng(int(seed)).standard_normal(shape) * plan.init_sigma).astype(np.float32)
        step = self._graph(("step", shape, context.shape), lambda: flame.compile(
            denoise_step(self.unet, self.prediction), flame.spec(shape, "f32"), flame.spec(context.shape, "f32"),
            flame.spec((1,), "f32"), flame.spec((5,), "f32"), flame.spec((), "f32"), backend=self.backend))
        g = np.float32(guidance)
        for t, coef in zip(plan.timesteps, plan.coefs):
            x = np.asarray(step(x, context, np.array([t], np.float32), coef, g), np.float32)
        return x

    def image(self, prompt: str, negative: str = "", sampler: str = "ddim", steps: int = 20,
              guidance: float = 7.5, seed: int = 0, width: int = 512, height: int = 512) -> Image.Image:
        f = self.vae.config.downsampling
        if width % f or height % f:
            raise ValueError(f"sample size {width}x{height}: sides must be multiples of {f} (the VAE's factor)")
        shape = (1, self.vae.config.latent_channels, height // f, width // f)
        z = self.latents(prompt, negative, sampler, steps, guidance, seed, shape)
        sf = float(self.vae.scaling_factor)
        decode = self._graph(("decode", shape), lambda: flame.compile(
            lambda z: self.vae.decode(z * (1.0 / sf)), flame.spec(shape, "f32"), backend=self.backend))
        px = np.asarray(decode(z), np.float32)[0].transpose(1, 2, 0)
        return Image.fromarray(np.clip(np.rint((px + 1.0) * 127.5), 0, 255).astype(np.uint8), "RGB")


def grid(images: list, labels: list, title: str = "", label_height: int = 36) -> Image.Image:
    """The images side by side, each under its (wrapped) prompt, a title line on top."""
    w, h = images[0].size
    top = 18 if title else 0
    out = Image.new("RGB", (w * len(images), h + label_height + top), (255, 255, 255))
    d = ImageDraw.Draw(out)
    if title:
        d.text((4, 3), title, fill=(0, 0, 0))
    chars = max(8, w // 7)
    for i, (im, label) in enumerate(zip(images, labels)):
        d.multiline_text((i * w + 3, top + 2), "\n".join(textwrap.wrap(label, chars)[:2]) or "(empty)",
                         fill=(0, 0, 0))
        out.paste(im, (i * w, top + label_height))
    return out


def render(sampler: Sampler, sc: dict, folder: str, tag: str, size: tuple) -> list[str]:
    """Every prompt of the [sample] config `sc` as <folder>/<tag>-<i>.png plus <tag>-grid.png."""
    os.makedirs(folder, exist_ok=True)
    images, paths = [], []
    for i, prompt in enumerate(sc["prompts"]):
        im = sampler.image(prompt, sc["negative_prompt"], sc["sampler"], sc["steps"], sc["guidance_scale"],
                           sc["seed"], *size)
        p = os.path.join(folder, f"{tag}-{i}.png")
        im.save(p)
        images.append(im)
        paths.append(p)
    title = f"{tag}: {sc['sampler']}, {sc['steps']} steps, guidance {sc['guidance_scale']:g}, seed {sc['seed']}"
    g = os.path.join(folder, f"{tag}-grid.png")
    grid(images, sc["prompts"], title).save(g)
    return paths + [g]
