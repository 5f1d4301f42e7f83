"""Training images: every mode becomes the RGB a viewer shows (checked against arithmetic on
the stored pixels), unreadable and too-small files are skipped and listed, the missing-caption
policies, buckets and batches of one bucket."""
import collections
import os

import numpy as np
import pytest
from PIL import Image

from flame.train import config as C
from flame.train import data as D


def make_cfg(folders, **sections):
    raw = {"model": {"checkpoint": "m.safetensors"},
           "data": [{"path": str(f), **kw} for f, kw in folders],
           "buckets": {"resolution": 64, "step": 16, "min_size": 16, "max_size": 128}}
    for s, kv in sections.items():
        raw.setdefault(s, {}).update(kv)
    return C.from_dict(raw)


def rgb_of(path):
    return np.asarray(D.open_image(str(path)), dtype=np.int32)


@pytest.fixture
def rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)


# ---------------------------------------------------------------- modes


def test_grayscale_png(tmp_path, rng):
    a = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    out = rgb_of(tmp_path / "g.png")
    assert out.shape == (24, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], a)


def test_16_bit_png_is_scaled_not_clipped(tmp_path, rng):
    a = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")        # Pillow keeps 16 bits
    out = rgb_of(tmp_path / "g16.png")
    want = np.rint(a.astype(np.float64) * 255 / 65535)
    assert np.abs(out[..., 0] - want).max() <= 1
    assert out.max() > 200 and out.min() < 50   # the whole range survives


def test_rgba_png_composited_onto_white(tmp_path, rng):
    a = rng.integers(0, 256, (16, 24, 4), dtype=np.uint8)
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    out = rgb_of(tmp_path / "t.png")
    alpha = a[..., 3:].astype(np.float64) / 255
    want = a[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(out - want).max() <= 1


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((3, 4), 1)
    im.info["transparency"] = 0          # palette entry 0 is transparent
    im.save(tmp_path / "p.png", transparency=0)
    out = rgb_of(tmp_path / "p.png")
    assert tuple(out[4, 3]) == (200, 100, 50)
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path, rng):
    # flat blocks so JPEG's loss stays small; Pillow's CMYK->RGB is (255-C)(255-K)/255
    blocks = rng.integers(0, 256, (2, 3, 4), dtype=np.uint8)
    a = np.kron(blocks, np.ones((16, 16, 1), np.uint8)).astype(np.uint8)
    Image.fromarray(a, "CMYK").save(tmp_path / "c.jpg", quality=100)
    out = rgb_of(tmp_path / "c.jpg")
    k = a[..., 3:].astype(np.float64)
    want = (255 - a[..., :3].astype(np.float64)) * (255 - k) / 255
    err = np.abs(out - want)
    assert np.median(err) <= 3 and err.max() <= 24


def test_exif_rotated_jpeg(tmp_path, rng):
    blocks = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    stored = np.kron(blocks, np.ones((16, 16, 1), np.uint8)).astype(np.uint8)   # 48 x 80
    exif = Image.Exif()
    exif[0x0112] = 6        # orientation 6: the viewer turns it 90 degrees clockwise
    Image.fromarray(stored, "RGB").save(tmp_path / "r.jpg", quality=100, exif=exif)
    out = rgb_of(tmp_path / "r.jpg")
    want = np.rot90(stored, k=-1)       # clockwise
    assert out.shape == want.shape == (80, 48, 3)
    assert np.median(np.abs(out - want)) <= 2
    # the scan sees the displayed size too
    (tmp_path / "r.txt").write_text("rotated")
    ds = D.scan(make_cfg([(tmp_path, {})]))
    assert ds.records[0].size == (48, 80)


# ---------------------------------------------------------------- folders


def write_png(path, size, rng, caption=None):
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_corrupt_and_tiny_files_are_skipped_and_listed(tmp_path, rng):
    write_png(tmp_path / "good.png", (64, 48), rng, "a good one")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    (tmp_path / "garbage.txt").write_text("x")
    write_png(tmp_path / "whole.png", (64, 64), rng, "cut short")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "truncated.txt").write_text("x")
    (tmp_path / "whole.png").unlink()
    (tmp_path / "whole.txt").unlink()
    write_png(tmp_path / "tiny.png", (10, 12), rng, "too small")
    (tmp_path / "notes.md").write_text("ignored: not an image extension")
    ds = D.scan(make_cfg([(tmp_path, {})]))
    assert [os.path.basename(r.path) for r in ds.records] == ["good.png"]
    skipped = {os.path.basename(p): why for p, why in ds.skipped}
    assert set(skipped) == {"garbage.png", "truncated.png", "tiny.png"}
    assert "cannot be read as an image" in skipped["garbage.png"]
    assert "cannot be read as an image" in skipped["truncated.png"]
    assert "10x12 is smaller than one bucket step (16 px)" in skipped["tiny.png"]
    rep = D.report(ds)
    assert "garbage.png" in rep and "tiny.png" in rep and "1 image(s)" in rep
    # the pixel loader names the file as well
    with pytest.raises(D.DataError, match="garbage.png: cannot be read as an image"):
        D.open_image(str(tmp_path / "garbage.png"))


def test_missing_caption_policies(tmp_path, rng):
    write_png(tmp_path / "a.png", (64, 64), rng, "red circle")
    write_png(tmp_path / "b.png", (64, 64), rng)           # no caption
    with pytest.raises(D.DataError) as e:
        D.scan(make_cfg([(tmp_path, {})]))
    assert "1 image(s) have no caption file" in str(e.value) and str(tmp_path / "b.txt") in str(e.value)
    ds = D.scan(make_cfg([(tmp_path, {"missing_caption": "skip"})]))
    assert [os.path.basename(r.path) for r in ds.records] == ["a.png"]
    assert "no caption file b.txt" in ds.skipped[0][1]
    ds = D.scan(make_cfg([(tmp_path, {"missing_caption": "trigger", "trigger": "zq"})]))
    caps = {os.path.basename(r.path): r.caption for r in ds.records}
    assert caps == {"a.png": "zq, red circle", "b.png": "zq"}     # never silently empty


def test_empty_folder_says_what_was_found(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(D.DataError) as e:
        D.scan(make_cfg([(tmp_path, {})]))
    assert "no usable image" in str(e.value) and f"{tmp_path}: 1 file(s), 0 usable image(s)" in str(e.value)


def test_repeats_from_folder_name_and_trigger(tmp_path, rng):
    f1, f2 = tmp_path / "5_cat", tmp_path / "dogs"
    f1.mkdir(), f2.mkdir()
    write_png(f1 / "x.png", (64, 64), rng, "cat, sitting")
    write_png(f2 / "y.png", (64, 48), rng, "zq dog")
    ds = D.scan(make_cfg([(f1, {"trigger": "zq"}), (f2, {"trigger": "zq", "repeats": 2})]))
    assert [f["repeats"] for f in ds.folders] == [5, 2]
    assert [r.caption for r in ds.records] == ["zq, cat, sitting", "zq dog"]
    assert ds.items_per_epoch == 7
    assert ds.tag_frequency() == {"5_cat": {"zq": 1, "cat": 1, "sitting": 1}, "dogs": {"zq dog": 1}}


# ---------------------------------------------------------------- buckets


def reference_buckets(res, step, lo, hi):
    best = {}
    for w in range(lo, hi + 1, step):
        hs = [h for h in range(lo, hi + 1, step) if w * h <= res * res]
        if hs:
            best[w] = max(hs)
    return sorted(set(best.items()) | {(h, w) for w, h in best.items()})


@pytest.mark.parametrize("res, step, lo, hi", [(512, 64, 256, 1024), (64, 16, 16, 128), (768, 64, 320, 1536)])
def test_bucket_list(res, step, lo, hi):
    b = {"resolution": res, "step": step, "min_size": lo, "max_size": hi}
    assert D.make_buckets(b) == reference_buckets(res, step, lo, hi)


def test_assign_bucket_never_upscales_by_default(rng):
    b = {"resolution": 512, "step": 64, "min_size": 256, "max_size": 1024, "upscale": False}
    for _ in range(200):
        w, h = (int(x) for x in rng.integers(64, 2000, 2))
        bucket, resized = D.assign_bucket((w, h), b)
        bw, bh = bucket
        rw, rh = resized
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 512 * 512
        assert rw >= bw and rh >= bh                       # covers the bucket
        assert rw <= max(w, bw) and rh <= max(h, bh)       # no enlargement beyond rounding
        assert abs(rw / rh - w / h) / (w / h) < 0.05 + 2 / min(rw, rh)   # aspect kept
        left, top, right, bottom = D.center_crop(resized, bucket)
        assert (right - left, bottom - top) == bucket and left >= 0 and top >= 0
    assert D.assign_bucket((1024, 768), b) == ((576, 384), (576, 432))


def test_upscale_picks_nearest_aspect(rng):
    b = {"resolution": 64, "step": 16, "min_size": 16, "max_size": 128, "upscale": True}
    buckets = D.make_buckets(b)
    for _ in range(50):
        w, h = (int(x) for x in rng.integers(8, 300, 2))
        bucket, resized = D.assign_bucket((w, h), b, buckets)
        err = abs(np.log(bucket[0] / bucket[1]) - np.log(w / h))
        assert all(err <= abs(np.log(x / y) - np.log(w / h)) + 1e-12 for x, y in buckets)
        assert resized[0] >= bucket[0] and resized[1] >= bucket[1]


def test_batches_come_from_one_bucket_and_cover_the_epoch(tmp_path, rng):
    sizes = [(64, 64), (64, 48), (48, 64), (64, 64), (64, 48), (64, 64), (32, 96)]
    for i, s in enumerate(sizes):
        write_png(tmp_path / f"{i}.png", s, rng, f"tag{i}, b, c, d")
    cfg = make_cfg([(tmp_path, {"repeats": 3, "flip": True, "shuffle_captions": True, "keep_tokens": 1})],
                   train={"batch_size": 2, "seed": 11})
    ds = D.scan(cfg)
    ep0 = D.epoch_batches(ds, cfg, 0)
    seen = collections.Counter()
    for batch in ep0:
        assert 1 <= len(batch) <= 2
        assert len({ds.records[it.record].bucket for it in batch}) == 1
        for it in batch:
            seen[it.record] += 1
            tags = it.caption.split(", ")
            r = ds.records[it.record]
            assert tags[0] == r.caption.split(", ")[0] and sorted(tags) == sorted(r.caption.split(", "))
            assert D.center_crop(r.resized, r.bucket) == it.crop
    assert seen == {i: 3 for i in range(len(sizes))}
    assert D.epoch_batches(ds, cfg, 0) == ep0                       # a function of (seed, epoch)
    assert D.epoch_batches(ds, cfg, 1) != ep0
    flips = [it.flip for b in ep0 + D.epoch_batches(ds, cfg, 1) for it in b]
    assert any(flips) and not all(flips)


def test_pixels_resize_crop_flip(tmp_path, rng):
    write_png(tmp_path / "p.png", (40, 30), rng)
    ref = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"), dtype=np.float64)
    x = D.pixels(str(tmp_path / "p.png"), (40, 30), (4, 2, 36, 30), flip=False)
    assert x.dtype == np.float32 and x.shape == (3, 28, 32)
    np.testing.assert_allclose(x, ref[2:30, 4:36].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    xf = D.pixels(str(tmp_path / "p.png"), (40, 30), (4, 2, 36, 30), flip=True)
    np.testing.assert_array_equal(xf, x[:, :, ::-1])


def test_loss_curve_png(tmp_path):
    from flame.train import plot
    rng = np.random.default_rng()
    steps = list(range(1, 41))
    losses = list(np.linspace(1.0, 0.2, 40) + 0.01 * rng.standard_normal(40))
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": v} for s, v in zip(steps, losses)]
    lines[5] = {"step": 6, "loss": None, "skipped": True}         # a skipped step is left out
    metrics.write_text("".join(__import__("json").dumps(r) + "\n" for r in lines))
    png = plot.write_loss_curve(str(metrics), str(tmp_path / "loss.png"), "test")
    im = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert im.shape == (plot.SIZE[1], plot.SIZE[0], 3) and sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.jsonl"]
    blue = np.all(np.abs(im - plot.SMOOTH) < 40, axis=2)
    cols = np.nonzero(blue.any(axis=0))[0]
    assert cols.min() <= plot.MARGIN[0] + 2 and cols.max() >= plot.SIZE[0] - plot.MARGIN[2] - 2
    rows_at = lambda c: np.nonzero(blue[:, c])[0].mean()
    # a falling loss: the curve starts in the top quarter of the plot and ends in the bottom half
    # (the noise may put the highest point at step 2 or 3, a few pixels above step 1)
    top, bottom = plot.MARGIN[1], plot.SIZE[1] - plot.MARGIN[3]
    assert rows_at(cols.min() + 1) < top + (bottom - top) / 4 and rows_at(cols.max() - 1) > plot.SIZE[1] / 2


def test_caption_dropout_and_random_crop(tmp_path, rng):
    for i in range(4):
        write_png(tmp_path / f"{i}.png", (192, 128), rng, f"tag{i}, x")
    cfg = make_cfg([(tmp_path, {"repeats": 50, "caption_dropout": 0.3})],
                   buckets={"crop": "random", "resolution": 64, "step": 16, "min_size": 16},
                   train={"cache_latents": False, "seed": int(rng.integers(1 << 30))})
    ds = D.scan(cfg)
    r = ds.records[0]
    assert r.bucket == (64, 48) and r.resized == (72, 48)    # 78x52 at 64^2 pixels, floored; cover -> 72x48
    items = [it for b in D.epoch_batches(ds, cfg, 0) for it in b]
    dropped = sum(it.caption == "" for it in items) / len(items)
    assert 0.2 < dropped < 0.4                                 # 200 draws of p = 0.3
    crops = {it.crop for it in items}
    assert len(crops) > 3
    for left, top, right, bottom in crops:
        assert (right - left, bottom - top) == r.bucket
        assert 0 <= left and right <= r.resized[0] and 0 <= top and bottom <= r.resized[1]
