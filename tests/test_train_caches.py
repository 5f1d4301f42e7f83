"""The latent and text-embedding caches with injected compute functions (no models): hits
without calling compute, misses on a change of image content, settings or model, exact
round trips of the stored arrays, corrupt files reported and rebuilt."""
import logging
import os

import ml_dtypes
import numpy as np
import pytest

from flame.models.checkpoint import read_header, save_safetensors
from flame.train.caches import (CacheError, LatentCache, LatentItem, TextCache, content_hash,
                                file_fingerprint, settings_json, tensors_fingerprint)

SETTINGS = {"resize": "lanczos", "scaling_factor": 0.18215, "latent": "mean"}


class Encoder:
    """A stand-in VAE: fresh random latents per call, remembered per item, calls counted."""

    def __init__(self, seed=0, dtype=np.float32, fail_at_call=None):
        self.rng, self.dtype, self.fail_at_call = np.random.default_rng(seed), dtype, fail_at_call
        self.calls, self.made = [], {}

    def __call__(self, items):
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            raise RuntimeError("out of memory (simulated)")
        self.calls.append(list(items))
        out = []
        for it in items:
            w, h = it.bucket if isinstance(it, LatentItem) else (8, 4)
            self.made[it] = self.rng.standard_normal((4, h // 8, w // 8)).astype(self.dtype)
            out.append(self.made[it])
        return np.stack(out)


def never(items):
    raise AssertionError(f"compute called for {items}")


def images(tmp_path, n=5, seed=0):
    """n small files with random bytes (content is all the cache looks at)."""
    rng, paths = np.random.default_rng(seed), []
    os.makedirs(tmp_path / "img", exist_ok=True)
    for i in range(n):
        p = tmp_path / "img" / f"{i}.png"
        p.write_bytes(rng.integers(0, 256, 300 + i, dtype=np.uint8).tobytes())
        paths.append(str(p))
    return paths


def items_for(paths, flip_too=False):
    buckets = [((64, 48), (0, 0, 64, 48)), ((80, 64), (8, 0, 72, 64)), ((64, 48), (0, 0, 64, 48))]
    out = []
    for i, p in enumerate(paths):
        size, crop = buckets[i % len(buckets)]
        out.append(LatentItem(p, content_hash(p), size, crop))
        if flip_too:
            out.append(LatentItem(p, content_hash(p), size, crop, flip=True))
    return out


def shard_files(cache):
    return sorted(os.listdir(cache.dir))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_miss_then_hit_round_trips_exactly(tmp_path, dtype):
    paths = images(tmp_path)
    items = items_for(paths, flip_too=True)
    items.append(items[0])                                # a duplicate is computed once
    enc, progress = Encoder(dtype=dtype), []
    cache = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS)
    got = cache.get_or_compute(items, enc, batch_size=3, progress=lambda d, t: progress.append((d, t)))
    assert len(enc.made) == 10 and sum(map(len, enc.calls)) == 10
    for batch in enc.calls:                               # one bucket shape per batch
        assert len({it.bucket for it in batch}) == 1 and len(batch) <= 3
    assert progress[-1] == (10, 10) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    for it, v in zip(items, got):
        assert v.dtype == np.dtype(dtype) and np.array_equal(v.view(np.uint8), enc.made[it].view(np.uint8))
    assert cache.stats == {"hits": 0, "computed": 10, "rebuilt_files": 0} and cache.events == []
    assert shard_files(cache) == ["64x48.safetensors", "64x64.safetensors"]

    again = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS)   # a later run
    got2 = again.get_or_compute(items, never)
    for it, v in zip(items, got2):
        assert v.dtype == np.dtype(dtype) and np.array_equal(v.view(np.uint8), enc.made[it].view(np.uint8))
    assert again.stats["hits"] == len(items) and again.events == []


def test_changed_image_content_misses_only_that_image(tmp_path):
    paths = images(tmp_path)
    cache = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS)
    cache.get_or_compute(items_for(paths), Encoder())
    with open(paths[3], "r+b") as f:                      # same name and size, one byte changed
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    enc = Encoder(seed=1)
    items = items_for(paths)
    got = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS).get_or_compute(items, enc)
    assert [it.path for batch in enc.calls for it in batch] == [paths[3]]
    assert np.array_equal(got[3], enc.made[items[3]])


def test_other_crop_or_flip_misses(tmp_path):
    paths = images(tmp_path, 1)
    cache = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS)
    it = items_for(paths)[0]
    cache.get_or_compute([it], Encoder())
    moved = LatentItem(it.path, it.content, it.size, (0, 0, 64, 48), flip=True)
    shifted = LatentItem(it.path, it.content, (72, 48), (8, 0, 72, 48))
    enc = Encoder(seed=2)
    cache.get_or_compute([it, moved, shifted], enc)
    assert [x for b in enc.calls for x in b] == [moved, shifted]


@pytest.mark.parametrize("change", ["settings", "model"])
def test_settings_or_model_change_misses_everything(tmp_path, change):
    paths = images(tmp_path)
    items = items_for(paths)
    first = Encoder()
    LatentCache(tmp_path / "cache", "vae-fp", SETTINGS).get_or_compute(items, first)
    fp, settings = ("vae-fp", dict(SETTINGS, resize="bicubic")) if change == "settings" else ("vae-fp2", SETTINGS)
    enc = Encoder(seed=3)
    got = LatentCache(tmp_path / "cache", fp, settings).get_or_compute(items, enc)
    assert sum(map(len, enc.calls)) == len(items)
    assert all(np.array_equal(g, enc.made[it]) for g, it in zip(got, items))
    # going back finds the first cache untouched
    back = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS).get_or_compute(items, never)
    assert all(np.array_equal(g, first.made[it]) for g, it in zip(back, items))


def _corrupt(path, how):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "data byte":
        _, start = read_header(path)
        data[start + 5] ^= 0xFF
    elif how == "truncated":
        data = data[:len(data) - 7]
    elif how == "header":
        data[8:20] = b"not json at!"
    elif how == "empty":
        data = b""
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("how", ["data byte", "truncated", "header", "empty"])
def test_corrupt_file_is_reported_and_rebuilt(tmp_path, how, caplog):
    paths = images(tmp_path)
    items = items_for(paths)
    LatentCache(tmp_path / "cache", "vae-fp", SETTINGS).get_or_compute(items, Encoder())
    cache = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS)
    bad = os.path.join(cache.dir, "64x64.safetensors")        # holds items 1 and 4
    _corrupt(bad, how)
    enc = Encoder(seed=4)
    with caplog.at_level(logging.WARNING, logger="flame.train.caches"):
        got = cache.get_or_compute(items, enc)
    assert [x for b in enc.calls for x in b] == [items[1], items[4]]
    assert np.array_equal(got[1], enc.made[items[1]]) and np.array_equal(got[4], enc.made[items[4]])
    assert len(cache.events) == 1 and bad in cache.events[0] and "corrupt" in cache.events[0]
    assert cache.stats["rebuilt_files"] == 1
    assert any(bad in r.getMessage() for r in caplog.records)
    clean = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS)    # rewritten: clean from now on
    got = clean.get_or_compute(items, never)
    assert clean.events == [] and np.array_equal(got[4], enc.made[items[4]])


def test_file_of_another_model_in_the_folder_is_rejected(tmp_path):
    """A shard whose recorded fingerprint disagrees (copied in by hand) is not trusted."""
    paths = images(tmp_path, 1)
    items = items_for(paths)
    a = LatentCache(tmp_path / "a", "model-a", SETTINGS)
    a.get_or_compute(items, Encoder())
    b = LatentCache(tmp_path / "b", "model-b", SETTINGS)
    os.makedirs(b.dir)
    os.replace(os.path.join(a.dir, "64x48.safetensors"), os.path.join(b.dir, "64x48.safetensors"))
    enc = Encoder(seed=5)
    b.get_or_compute(items, enc)
    assert len(enc.calls) == 1 and "model-a" in b.events[0]


def test_work_done_before_a_failure_is_kept(tmp_path):
    paths = images(tmp_path, 6)
    items = [LatentItem(p, content_hash(p), (64, 64), (0, 0, 64, 64)) for p in paths]
    cache = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS, flush_every=100)
    with pytest.raises(RuntimeError, match="simulated"):
        cache.get_or_compute(items, Encoder(fail_at_call=2), batch_size=2)
    enc = Encoder(seed=6)
    LatentCache(tmp_path / "cache", "vae-fp", SETTINGS).get_or_compute(items, enc, batch_size=2)
    assert [x for b in enc.calls for x in b] == items[4:]


def test_flushes_during_a_long_build(tmp_path):
    paths = images(tmp_path, 5)
    items = [LatentItem(p, content_hash(p), (64, 64), (0, 0, 64, 64)) for p in paths]
    cache = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS, flush_every=2)
    seen, inner = [], Encoder()

    def enc(batch):
        f = os.path.join(cache.dir, "64x64.safetensors")
        seen.append(len([k for k in read_header(f)[0] if k != "__metadata__"]) if os.path.exists(f) else 0)
        return inner(batch)
    cache.get_or_compute(items, enc, batch_size=1)
    assert seen == [0, 0, 2, 2, 4]


def test_bad_compute_results_are_errors(tmp_path):
    paths = images(tmp_path, 2)
    items = [LatentItem(p, content_hash(p), (64, 64), (0, 0, 64, 64)) for p in paths]
    cache = LatentCache(tmp_path / "cache", "vae-fp", SETTINGS)
    with pytest.raises(CacheError, match=r"shape \(1, 4, 8, 8\) for a batch of 2"):
        cache.get_or_compute(items, lambda b: np.ones((1, 4, 8, 8), np.float32))

    def nan_second(b):
        out = np.random.default_rng(0).standard_normal((len(b), 4, 8, 8)).astype(np.float32)
        out[1, 2, 3, 4] = np.nan
        return out
    with pytest.raises(CacheError, match=f"{paths[1]}.*not finite"):
        cache.get_or_compute(items, nan_second)
    assert not os.path.exists(cache.dir) or shard_files(cache) == []
    with pytest.raises(CacheError, match="'resize'"):
        settings_json({"resize": object()})


def test_text_cache(tmp_path):
    caps = ["flamequick, a red circle", "a blue square", "flamequick, a red circle", "", "a blue square "]
    settings = {"clip_skip": 1, "tokenizer": "tok-fp", "max_length": 77}
    enc = Encoder()
    got = TextCache(tmp_path / "c", "te-fp", settings).get_or_compute(caps, enc)
    assert sorted(x for b in enc.calls for x in b) == sorted(set(caps))   # trailing space is another caption
    assert all(np.array_equal(g, enc.made[c]) for g, c in zip(got, caps))
    got = TextCache(tmp_path / "c", "te-fp", settings).get_or_compute(caps, never)
    assert all(np.array_equal(g, enc.made[c]) for g, c in zip(got, caps))
    enc2 = Encoder(seed=1)
    TextCache(tmp_path / "c", "te-fp", dict(settings, clip_skip=2)).get_or_compute(caps, enc2)
    assert len(enc2.made) == 4


def test_fingerprints(tmp_path):
    rng = np.random.default_rng(7)
    sd = {"first_stage_model.w": rng.standard_normal((3, 4)).astype(np.float32),
          "model.diffusion_model.w": rng.standard_normal(5).astype(np.float32)}
    f = str(tmp_path / "m.safetensors")
    save_safetensors(sd, f)
    vae, whole = file_fingerprint(f, ("first_stage_model.",)), file_fingerprint(f)
    assert vae == tensors_fingerprint({"first_stage_model.w": sd["first_stage_model.w"]}) and vae != whole
    sd2 = dict(sd, **{"model.diffusion_model.w": sd["model.diffusion_model.w"] + 1})
    save_safetensors(sd2, f)
    assert file_fingerprint(f, ("first_stage_model.",)) == vae and file_fingerprint(f) != whole
    w = sd["first_stage_model.w"].copy()
    w[2, 1] = np.nextafter(w[2, 1], np.inf)            # one value one ulp off: another model
    assert tensors_fingerprint({"first_stage_model.w": w}) != vae
    assert tensors_fingerprint({"first_stage_model.w": sd["first_stage_model.w"].astype(np.float16)}) != vae
    with pytest.raises(CacheError, match="no tensor starts with cond_stage_model."):
        file_fingerprint(f, ("cond_stage_model.",))
