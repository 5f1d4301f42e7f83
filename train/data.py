"""The training images: folders, captions, aspect-ratio buckets, batches.

Scanning (`scan`) opens every image once: a file Pillow cannot decode is skipped and listed
with the reason, never a crash mid-run; so is an image too small for the smallest bucket.
Any mode becomes RGB: EXIF orientation applied, transparency composited onto white, 16-bit
greyscale scaled to 8 bits (Pillow's own convert would clip it), CMYK and palettes converted.

Buckets follow kohya's sd-scripts: sides are multiples of `step`, at most `resolution^2`
pixels. With upscale off (the default) an image larger than the target area is shrunk to it
and an image smaller keeps its size; either way its bucket is its size rounded down to the
step, so nothing is enlarged. With upscale on, each image goes to the predefined bucket of
nearest aspect ratio and is resized to cover it. The resized image is cropped to the bucket
(center, or random per use).

Randomness is a function of (seed, epoch) alone, so any epoch's order can be recomputed
(resume): the order of items inside each bucket, the flips, the grouping into batches of one
bucket, and the order of the batches.
"""
from __future__ import annotations

import collections
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from flame.ir.errors import FlameError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(FlameError, ValueError):
    pass


# ---------------------------------------------------------------- images


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB (see the module docstring)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(path: str) -> Image.Image:
    """The decoded RGB image, or DataError naming the file and what is wrong with it."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- buckets


def make_buckets(b: dict) -> list[tuple[int, int]]:
    """All (width, height) with sides multiples of step in [min_size, max_size] and at most
    resolution^2 pixels, the largest height for each width (kohya's make_buckets)."""
    area, step = b["resolution"] ** 2, b["step"]
    out = set()
    w = b["min_size"]
    while w <= b["max_size"]:
        h = min(b["max_size"], (area // w) // step * step)
        if h >= b["min_size"]:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def assign_bucket(size, b: dict, buckets=None):
    """(bucket (w, h), resized size (w, h)) for an image of `size`, or (None, reason)."""
    w, h = size
    step, area = b["step"], b["resolution"] ** 2
    if b["upscale"]:
        buckets = buckets or make_buckets(b)
        ar = math.log(w / h)
        bw, bh = min(buckets, key=lambda s: (abs(math.log(s[0] / s[1]) - ar), -s[0] * s[1]))
    else:
        scale = min(1.0, math.sqrt(area / (w * h)))
        sw, sh = w * scale, h * scale
        bw = min(b["max_size"], int(sw + 1e-6) // step * step)
        bh = min(b["max_size"], int(sh + 1e-6) // step * step)
        if bw < step or bh < step:
            return None, (f"{w}x{h} is smaller than one bucket step ({step} px) "
                          f"(buckets.upscale = true would enlarge it)")
    s = max(bw / w, bh / h)   # cover the bucket, then crop the overflow
    rw, rh = max(bw, int(math.ceil(w * s - 1e-6))), max(bh, int(math.ceil(h * s - 1e-6)))
    return (bw, bh), (rw, rh)


def center_crop(resized, bucket) -> tuple:
    (rw, rh), (bw, bh) = resized, bucket
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (left, top, left + bw, top + bh)


def random_crop(resized, bucket, rng: np.random.Generator) -> tuple:
    (rw, rh), (bw, bh) = resized, bucket
    left, top = int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1))
    return (left, top, left + bw, top + bh)


def pixels(path: str, resized, crop, flip: bool) -> np.ndarray:
    """float32 [3, h, w] in [-1, 1]: the image resized (Lanczos), cropped, maybe flipped."""
    im = open_image(path)
    if im.size != tuple(resized):
        im = im.resize(tuple(resized), Image.LANCZOS)
    im = im.crop(tuple(crop))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
    return a * np.float32(2.0 / 255.0) - np.float32(1.0)


# ---------------------------------------------------------------- scanning


@dataclass
class Record:
    path: str
    caption: str              # after the trigger is applied (tags not shuffled yet)
    size: tuple               # (w, h) after EXIF orientation
    bucket: tuple             # (w, h)
    resized: tuple            # (w, h) before cropping
    folder: int               # index into cfg["data"]


@dataclass
class Dataset:
    records: list
    skipped: list = field(default_factory=list)       # (path, reason)
    folders: list = field(default_factory=list)       # per [[data]]: {"path", "images", "repeats", "skipped", "captioned"}

    @property
    def buckets(self) -> collections.Counter:
        """bucket -> number of items per epoch (repeats counted)."""
        c = collections.Counter()
        for r in self.records:
            c[r.bucket] += self.folders[r.folder]["repeats"]
        return c

    @property
    def items_per_epoch(self) -> int:
        return sum(self.folders[r.folder]["repeats"] for r in self.records)

    def tag_frequency(self) -> dict:
        """{folder name: {tag: count}} over the captions (kohya's ss_tag_frequency)."""
        out = {}
        for r in self.records:
            name = os.path.basename(os.path.normpath(self.folders[r.folder]["path"]))
            tags = out.setdefault(name, {})
            for t in split_tags(r.caption):
                tags[t] = tags.get(t, 0) + 1
        return out


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    if trigger in split_tags(caption) or caption.split(" ", 1)[0] == trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def folder_repeats(path: str, repeats) -> int:
    if repeats is not None:
        return repeats
    m = re.match(r"(\d+)_.", os.path.basename(os.path.normpath(path)))
    return max(1, int(m.group(1))) if m else 1


def read_caption(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: the caption is not UTF-8 text") from None
    return " ".join(text.split())


def scan(cfg: dict, progress=None) -> Dataset:
    """Every usable image of every [[data]] folder, with its caption and bucket."""
    b = cfg["buckets"]
    buckets = make_buckets(b) if b["upscale"] else None
    ds = Dataset([])
    missing = []
    for i, d in enumerate(cfg["data"]):
        folder = d["path"]
        names = sorted(os.listdir(folder))
        images = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
        info = {"path": folder, "images": 0, "repeats": folder_repeats(folder, d["repeats"]),
                "skipped": 0, "captioned": 0, "found": len(names)}
        ds.folders.append(info)
        for n in images:
            path = os.path.join(folder, n)
            if progress:
                progress(path)
            try:
                with Image.open(path) as im:
                    im.load()
                    size = ImageOps.exif_transpose(im).size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                ds.skipped.append((path, f"cannot be read as an image ({type(e).__name__}: {e})"))
                info["skipped"] += 1
                continue
            bucket, resized = assign_bucket(size, b, buckets)
            if bucket is None:
                ds.skipped.append((path, resized))
                info["skipped"] += 1
                continue
            cap_path = os.path.splitext(path)[0] + d["caption_extension"]
            if os.path.exists(cap_path):
                caption = read_caption(cap_path)
                info["captioned"] += 1
            elif d["missing_caption"] == "error":
                missing.append(cap_path)
                continue
            elif d["missing_caption"] == "skip":
                ds.skipped.append((path, f"no caption file {os.path.basename(cap_path)} (data[{i}].missing_caption = \"skip\")"))
                info["skipped"] += 1
                continue
            else:   # "trigger": the trigger word alone
                caption = ""
            ds.records.append(Record(path, with_trigger(caption, d["trigger"]), size, bucket, resized, i))
            info["images"] += 1
    if missing:
        shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} image(s) have no caption file:\n  {shown}\n"
                        "Write the captions, or set missing_caption = \"skip\" or \"trigger\" in the [[data]] table.")
    if not ds.records:
        lines = [f"  {f['path']}: {f['found']} file(s), {f['images']} usable image(s)" for f in ds.folders]
        lines += [f"  skipped {p}: {why}" for p, why in ds.skipped[:10]]
        raise DataError("no usable image in the data folders (jpg, png, webp with captions):\n" + "\n".join(lines))
    return ds


# ---------------------------------------------------------------- one epoch


@dataclass(frozen=True)
class Item:
    record: int               # index into Dataset.records
    flip: bool
    crop: tuple               # (left, top, right, bottom) in the resized image
    caption: str              # as trained this time (shuffled, maybe dropped)


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(stream)])


def shuffle_caption(caption: str, keep: int, rng) -> str:
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def epoch_batches(ds: Dataset, cfg: dict, epoch: int) -> list[list[Item]]:
    """Micro-batches of one epoch: each from one bucket, the last of a bucket maybe smaller."""
    seed, bs = cfg["train"]["seed"], cfg["train"]["batch_size"]
    rng = _epoch_rng(seed, epoch, 0)
    per_bucket = collections.defaultdict(list)
    for i, r in enumerate(ds.records):
        per_bucket[r.bucket] += [i] * ds.folders[r.folder]["repeats"]
    batches = []
    for bucket in sorted(per_bucket):
        idx = per_bucket[bucket]
        order = [idx[j] for j in rng.permutation(len(idx))]
        for s in range(0, len(order), bs):
            batches.append(order[s:s + bs])
    batches = [batches[j] for j in rng.permutation(len(batches))]
    out = []
    for bi, batch in enumerate(batches):
        items = []
        for k, i in enumerate(batch):
            r, d = ds.records[i], cfg["data"][ds.records[i].folder]
            irng = _epoch_rng(seed, epoch, 1 + bi * 4096 + k)
            flip = bool(d["flip"]) and bool(irng.integers(2))
            crop = (random_crop(r.resized, r.bucket, irng) if cfg["buckets"]["crop"] == "random"
                    else center_crop(r.resized, r.bucket))
            cap = r.caption
            if d["shuffle_captions"]:
                cap = shuffle_caption(cap, d["keep_tokens"], irng)
            if d["caption_dropout"] and irng.random() < d["caption_dropout"]:
                cap = ""
            items.append(Item(i, flip, crop, cap))
        out.append(items)
    return out


def distinct_captions(ds: Dataset, cfg: dict) -> list[str] | None:
    """Every caption the run can train with, when that set is fixed (no tag shuffling): what
    the text cache must hold. None when captions are shuffled (encoded per step instead)."""
    caps = []
    for r in ds.records:
        d = cfg["data"][r.folder]
        if d["shuffle_captions"]:
            return None
        caps.append(r.caption)
        if d["caption_dropout"]:
            caps.append("")
    return list(dict.fromkeys(caps))


def report(ds: Dataset) -> str:
    """What was found, per folder and per bucket, and what was skipped and why."""
    lines = []
    for f in ds.folders:
        lines.append(f"  {f['path']}: {f['images']} image(s) x {f['repeats']} repeat(s), "
                     f"{f['captioned']} with a caption file, {f['skipped']} skipped")
    lines.append("  buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(ds.buckets.items())))
    for p, why in ds.skipped:
        lines.append(f"  skipped {p}: {why}")
    return "\n".join(lines)
