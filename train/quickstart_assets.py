"""The files `flame-train --quickstart` trains on, made here so nothing is downloaded:

  <dir>/data/10_flamequick/NNN.png + NNN.txt   synthetic shapes with captions
                                               ("a red circle on a blue background")
  <dir>/model/flame-quickstart-random-sd1.safetensors
                                               an SD 1.x-structured checkpoint of flame's TINY
                                               configs, RANDOMLY initialised, in the original
                                               single-file layout (model.diffusion_model.*,
                                               first_stage_model.*, cond_stage_model.transformer.*)
  <dir>/tokenizer/vocab.json + merges.txt      a CLIP-format BPE vocabulary covering the captions

The vocabulary has CLIP's shape: the 256 byte characters, their `</w>` (end-of-word) forms,
merges learnt on the caption words (every word ends as one token), unused filler tokens, then
<|startoftext|> = 49406 and <|endoftext|> = 49407 as in the real CLIP vocabulary, so every
id fits TINY_TEXT's 49408-row embedding. Everything is a function of `seed`.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os

import numpy as np
from PIL import Image, ImageDraw

import flame
from flame.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, keymaps
from flame.models.checkpoint import save_safetensors
from flame.models.configs import TINY_UNET, TINY_VAE
from flame.models.configs_clip import TINY_TEXT
from flame.nn import init

TRIGGER = "flamequick"
REPEATS = 10
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHECKPOINT_NAME = "flame-quickstart-random-sd1.safetensors"

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (240, 210, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "stripes")
SIZES = ((128, 128), (192, 128), (128, 192))       # (width, height): square, landscape, portrait
WORDS = ["a", "an", "on", "background", "and", TRIGGER] + list(COLORS) + list(SHAPES)


def caption(shape: str, fg: str, bg: str) -> str:
    if shape == "stripes":
        return f"{fg} and {bg} stripes"
    return f"{'an' if fg[0] in 'aeiou' else 'a'} {fg} {shape} on a {bg} background"


def _draw(shape, fg, bg, size, rng) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, COLORS[bg])
    d = ImageDraw.Draw(im)
    if shape == "stripes":
        band = int(rng.integers(8, 20))
        vertical = bool(rng.integers(2))
        for o in range(0, w if vertical else h, 2 * band):
            d.rectangle((o, 0, o + band - 1, h) if vertical else (0, o, w, o + band - 1), fill=COLORS[fg])
        return im
    r = int(rng.integers(min(w, h) // 5, min(w, h) // 3))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[fg])
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLORS[fg])
    return im


def write_images(folder: str, seed: int = 0, count: int = 12) -> list[tuple[str, str]]:
    """`count` PNG images with same-stem .txt captions; [(image path, caption)]."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = list(COLORS)
    out = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = (names[j] for j in rng.choice(len(names), 2, replace=False))
        size = SIZES[i % len(SIZES)]
        path = os.path.join(folder, f"{i:03d}.png")
        _draw(shape, fg, bg, size, rng).save(path)
        text = caption(shape, fg, bg)
        with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        out.append((path, text))
    return out


# ------------------------------------------------------------------ tokenizer


def bytes_to_unicode() -> dict:
    """CLIP's byte -> printable character table (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words) -> list[tuple[str, str]]:
    """Plain BPE on `words` (each counted once) until every word is one symbol; ties broken
    by the pair itself, so the result is fixed."""
    b2u = bytes_to_unicode()
    seqs = [[b2u[b] for b in w.encode()] for w in dict.fromkeys(words)]
    for s in seqs:
        s[-1] += "</w>"
    merges = []
    while True:
        pairs = collections.Counter(p for s in seqs for p in itertools.pairwise(s))
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1


def write_tokenizer(folder: str, words=WORDS, vocab_size: int = 49408) -> int:
    """vocab.json + merges.txt in `folder`; returns the number of real (non-filler) tokens."""
    b2u = bytes_to_unicode()
    merges = learn_merges(words)
    tokens = list(b2u.values())
    tokens += [t + "</w>" for t in tokens]
    tokens = list(dict.fromkeys(tokens + [a + b for a, b in merges]))
    real = len(tokens) + 2
    # fillers no merge can produce, so that BOS/EOS sit at CLIP's ids 49406/49407
    tokens += [f"<|flame_unused_{i}|>" for i in range(vocab_size - 2 - len(tokens))]
    tokens += [BOS, EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return real


# ------------------------------------------------------------------ checkpoint


def random_sd1_checkpoint(seed: int = 0) -> dict:
    """name -> float32 array: flame's TINY UNet, VAE and CLIP text encoder, randomly initialised
    by flame's initialisers, under the original single-file SD 1.x names."""
    saved = init.rng()     # the caller's random stream is left where it was
    flame.manual_seed(seed)
    try:
        unet, vae, text = UNet2DConditionModel(TINY_UNET), AutoencoderKL(TINY_VAE), CLIPTextModel(TINY_TEXT)
    finally:
        init._rng = saved
    sd = {keymaps.UNET_PREFIX + k: v for k, v in
          keymaps.diffusers_to_ldm(unet.state_dict(), keymaps.unet_table(TINY_UNET)).items()}
    sd.update({keymaps.VAE_PREFIX + k: v for k, v in
               keymaps.diffusers_to_ldm(vae.state_dict(), keymaps.vae_table(TINY_VAE)).items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in text.state_dict().items()})
    # real SD 1.x files carry this constant; loaders drop it
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        np.arange(TINY_TEXT.max_position_embeddings, dtype=np.int64)[None]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def write_checkpoint(path: str, seed: int = 0):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_safetensors(random_sd1_checkpoint(seed), path, {
        "flame.quickstart": "random",
        "description": f"RANDOM weights (flame quickstart, seed {seed}): the SD 1.x structure at a "
                       "tiny size, not a trained model; images it makes are noise",
        "flame.seed": seed,
        "flame.unet_config": json.dumps(dataclasses.asdict(TINY_UNET)),
        "flame.vae_config": json.dumps(dataclasses.asdict(TINY_VAE)),
        "flame.text_config": json.dumps(dataclasses.asdict(TINY_TEXT)),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": "flame quickstart (random, tiny)"})


def write_quickstart(folder, seed: int = 0) -> dict:
    """Write the quickstart's images, checkpoint and tokenizer under `folder` (overwriting
    earlier copies, which are identical for the same seed). Returns the paths and data
    settings the trainer's config needs."""
    folder = os.path.abspath(os.fspath(folder))
    data = os.path.join(folder, "data")
    images = os.path.join(data, f"{REPEATS}_{TRIGGER}")
    pairs = write_images(images, seed)
    checkpoint = os.path.join(folder, "model", CHECKPOINT_NAME)
    write_checkpoint(checkpoint, seed)
    tokenizer = os.path.join(folder, "tokenizer")
    write_tokenizer(tokenizer)
    return {"root": folder, "data": data, "image_dir": images, "checkpoint": checkpoint,
            "tokenizer": tokenizer, "trigger": TRIGGER, "repeats": REPEATS,
            "images": [p for p, _ in pairs], "captions": [c for _, c in pairs],
            "model_configs": {"unet": "TINY_UNET", "vae": "TINY_VAE", "text": "TINY_TEXT"}}
