"""The loss curve as a PNG (Pillow only): each step's loss in light grey, its exponential
moving average (0.9) in blue, on axes labelled with the step and loss ranges."""
from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

SIZE = (800, 400)
MARGIN = (60, 20, 20, 40)          # left, top, right, bottom
RAW, SMOOTH, AXES = (190, 190, 190), (30, 90, 200), (0, 0, 0)


def read_metrics(path: str) -> tuple[list, list]:
    steps, losses = [], []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if r.get("loss") is not None:
                        steps.append(r["step"])
                        losses.append(r["loss"])
    return steps, losses


def smoothed(losses: list, beta: float = 0.9) -> list:
    out, s = [], None
    for x in losses:
        s = x if s is None else beta * s + (1 - beta) * x
        out.append(s)
    return out


def loss_curve(steps: list, losses: list, title: str = "") -> Image.Image:
    im = Image.new("RGB", SIZE, (255, 255, 255))
    d = ImageDraw.Draw(im)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    d.line([(left, top), (left, bottom), (right, bottom)], fill=AXES)
    if not losses:
        d.text((left + 10, top + 10), "no finite loss yet", fill=AXES)
        return im
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, loss):
        return (left + (step - s0) / (s1 - s0) * (right - left),
                bottom - (loss - lo) / (hi - lo) * (bottom - top))
    for series, colour in ((losses, RAW), (smoothed(losses), SMOOTH)):
        pts = [xy(s, v) for s, v in zip(steps, series)]
        if len(pts) == 1:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        else:
            d.line(pts, fill=colour, width=2)
    d.text((4, top), f"{hi:.4g}", fill=AXES)
    d.text((4, bottom - 10), f"{lo:.4g}", fill=AXES)
    d.text((left, bottom + 6), f"step {s0}", fill=AXES)
    d.text((right - 70, bottom + 6), f"step {steps[-1]}", fill=AXES)
    if title:
        d.text((left + 10, 4), title, fill=AXES)
    return im


def write_loss_curve(metrics_path: str, png_path: str, title: str = "") -> str:
    """Draw metrics.jsonl's losses into png_path (written whole, then renamed into place)."""
    steps, losses = read_metrics(metrics_path)
    tmp = f"{png_path}.tmp{os.getpid()}.png"
    loss_curve(steps, losses, title).save(tmp)
    os.replace(tmp, png_path)
    return png_path
