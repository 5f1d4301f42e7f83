"""On-disk caches of VAE latents and text embeddings, in safetensors, reused across runs.

Layout: `<folder>/<kind>/<model fingerprint[:16]>-<settings digest[:16]>/<shard>.safetensors`.
A change of model weights or of preprocessing settings selects another folder (a miss for
everything; the old folder stays, so switching back reuses it). Inside, one shard file per
bucket (latents: `512x768.safetensors`) or one for all captions (`text.safetensors`): thousands
of tiny files are slow to open and to list, and one file per bucket is small enough to rewrite
atomically when entries are added. The safetensors header is the shard's index (entry key ->
offset), so no separate index file can disagree with the data.

An entry's key is its content: the image file's sha256 plus the resize, crop box and flip
(so the per-image crop is recorded in the key: `<sha[:32]>_512x704_crop0,32,512,672_flip`),
or the caption's sha256. A changed image file has another hash: a miss.

Every shard's metadata holds the cache version, the full model fingerprint, the settings (as
canonical JSON) and the sha256 of its data bytes, checked when it is opened. A shard that
fails any check (damaged header, truncated, bytes changed, other model or settings) is
reported -- in `cache.events` and through the `logging` module, logger "flame.train.caches" --
and its entries are recomputed and the file rewritten; never silently dropped or trusted.

Latents are the encoder's mean times the VAE's scaling factor (no sampling): SD's VAE has a
tiny posterior variance, so sampling adds almost nothing, and a mean is reproducible (kohya's
trainer caches one `latent_dist.sample()` drawn at caching time; diffusers' scripts sample
every step without a cache). The compute function decides what is stored: the cache stores
what it returns, bit for bit.

Text embeddings are only valid when the text encoder is frozen and the captions are final
(trigger word applied, no per-step shuffle or token dropout: each distinct caption is an entry).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from flame.ir.errors import FlameError
from flame.models.checkpoint import CheckpointError, load_safetensors, read_header, save_safetensors

VERSION = "1"
log = logging.getLogger("flame.train.caches")


class CacheError(FlameError):
    pass


# ------------------------------------------------------------------ fingerprints


def content_hash(path) -> str:
    """sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensors_fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: any change of
    weights (not just of shapes, as a fine-tuned VAE of the same architecture has) changes it.
    About 0.3 s for SD 1.5's VAE."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def file_fingerprint(path, prefixes: Sequence[str] = ()) -> str:
    """tensors_fingerprint of a safetensors file's tensors whose names start with one of
    `prefixes` (all if empty), e.g. ("first_stage_model.",) for the VAE in a full SD checkpoint.
    Memory-mapped: only the selected tensors are read."""
    sd = load_safetensors(os.fspath(path))
    if prefixes:
        sd = {k: v for k, v in sd.items() if k.startswith(tuple(prefixes))}
        if not sd:
            raise CacheError(f"{path}: no tensor starts with {', '.join(prefixes)}")
    return tensors_fingerprint(sd)


def module_fingerprint(module) -> str:
    """tensors_fingerprint of a loaded flame Module's state dict (whatever file it came from)."""
    return tensors_fingerprint(module.state_dict())


def tokenizer_fingerprint(tok) -> str:
    """sha256 of a flame CLIPTokenizer's whole pipeline (vocabulary, merges, normaliser),
    its special ids and its max_length."""
    h = hashlib.sha256(tok.tokenizer.to_str().encode())
    h.update(f"|{tok.bos_id}|{tok.eos_id}|{tok.pad_id}|{tok.max_length}".encode())
    return h.hexdigest()


def settings_json(settings: Mapping) -> str:
    """Canonical JSON of the settings (sorted keys); an unserialisable value is named."""
    for k, v in settings.items():
        try:
            json.dumps(v)
        except TypeError:
            raise CacheError(f"cache setting {k!r}={v!r} is not JSON-serialisable") from None
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------ the store


class ShardedCache:
    """Entries (key -> one array) in shard files under one (fingerprint, settings) folder.
    Subclasses say how an item maps to a shard and a key, and how to name it in errors."""

    kind = "tensors"

    def __init__(self, folder, fingerprint: str, settings: Mapping, *, flush_every: int = 256):
        self.fingerprint = str(fingerprint)
        self.settings = settings_json(settings)
        digest = hashlib.sha256(self.settings.encode()).hexdigest()
        self.dir = os.path.join(os.fspath(folder), self.kind, f"{self.fingerprint[:16]}-{digest[:16]}")
        self.flush_every = flush_every
        self.events: list[str] = []      # what happened that a person should know (corrupt files)
        self.stats = {"hits": 0, "computed": 0, "rebuilt_files": 0}
        self._shards: dict[str, dict] = {}

    # what subclasses define
    def shard_of(self, item) -> str:
        raise NotImplementedError

    def key_of(self, item) -> str:
        raise NotImplementedError

    def describe(self, item) -> str:
        return repr(item)

    def path(self, shard: str) -> str:
        return os.path.join(self.dir, f"{shard}.safetensors")

    def _event(self, msg: str):
        self.events.append(msg)
        log.warning(msg)

    def _open(self, shard: str) -> dict:
        """The shard's entries, copied into memory ({} if it does not exist or is rejected)."""
        if shard in self._shards:
            return self._shards[shard]
        path, entries = self.path(shard), {}
        if os.path.exists(path):
            try:
                entries = self._read_checked(path)
            except CheckpointError as e:
                self.stats["rebuilt_files"] += 1
                self._event(f"{path}: corrupt cache file ({e}); its entries are recomputed and the file rewritten")
        self._shards[shard] = entries
        return entries

    def _read_checked(self, path: str) -> dict:
        header, start = read_header(path)
        meta = header.get("__metadata__", {})
        want = {"flame.cache.version": VERSION, "flame.cache.fingerprint": self.fingerprint,
                "flame.cache.settings": self.settings}
        for k, v in want.items():
            if meta.get(k) != v:
                raise CheckpointError(f"metadata {k} is {meta.get(k)!r}, expected {v!r}")
        h = hashlib.sha256()
        if os.path.getsize(path) > start:
            h.update(memoryview(np.memmap(path, dtype=np.uint8, mode="r", offset=start)))
        if h.hexdigest() != meta.get("flame.cache.sha256"):
            raise CheckpointError("its data does not match the checksum written with it")
        return {k: np.array(v) for k, v in load_safetensors(path).items()}

    def _write(self, shard: str):
        entries = self._shards[shard]
        h = hashlib.sha256()
        for a in entries.values():    # save_safetensors lays the tensors out in this order, unpadded
            h.update(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        os.makedirs(self.dir, exist_ok=True)
        save_safetensors(entries, self.path(shard), {
            "flame.cache.version": VERSION, "flame.cache.kind": self.kind,
            "flame.cache.fingerprint": self.fingerprint, "flame.cache.settings": self.settings,
            "flame.cache.sha256": h.hexdigest()})

    def get_or_compute(self, items: Sequence, compute_fn: Callable[[list], np.ndarray], *,
                       batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list:
        """One array per item, from the cache or from compute_fn(batch of items) -> array
        [len(batch), ...], called only for misses (each distinct key once), in batches of one
        shard (one bucket shape). progress(done, total) after each batch. New entries are
        written every `flush_every` and at the end, also when compute_fn raises."""
        keyed = [(self.shard_of(it), self.key_of(it)) for it in items]
        misses: dict[str, dict[str, object]] = {}
        for it, (shard, key) in zip(items, keyed):
            if key not in self._open(shard):
                misses.setdefault(shard, {}).setdefault(key, it)
        total = sum(len(m) for m in misses.values())
        self.stats["hits"] += len(items) - sum(1 for s, k in keyed if k in misses.get(s, {}))
        done, dirty = 0, {}
        try:
            for shard in sorted(misses):
                pending = list(misses[shard].items())
                for i in range(0, len(pending), batch_size):
                    batch = pending[i:i + batch_size]
                    values = self._checked(compute_fn([it for _, it in batch]), [it for _, it in batch])
                    entries = self._open(shard)
                    for (key, _), v in zip(batch, values):
                        entries[key] = v
                    dirty[shard] = dirty.get(shard, 0) + len(batch)
                    done += len(batch)
                    self.stats["computed"] += len(batch)
                    if dirty[shard] >= self.flush_every:
                        self._write(shard)
                        dirty[shard] = 0
                    if progress:
                        progress(done, total)
        finally:
            for shard, n in dirty.items():
                if n:
                    self._write(shard)
        return [self._shards[s][k] for s, k in keyed]

    def _checked(self, out, batch: list) -> list:
        out = np.asarray(out)
        if out.ndim == 0 or out.shape[0] != len(batch):
            raise CacheError(f"{self.kind} cache: the compute function returned shape {out.shape} "
                             f"for a batch of {len(batch)}")
        rows = [np.array(r) for r in out]    # copies: never views of the caller's buffer
        if out.dtype.kind == "f" or out.dtype == ml_dtypes.bfloat16:
            for it, r in zip(batch, rows):
                if not np.isfinite(r.astype(np.float32)).all():
                    raise CacheError(f"{self.describe(it)}: the {self.kind} computed for it are not "
                                     "finite (NaN or inf); nothing was cached for it")
        return rows


# ------------------------------------------------------------------ the two caches


@dataclass(frozen=True)
class LatentItem:
    """One image as the VAE sees it: resized to `size` (width, height), cropped to `crop`
    (left, top, right, bottom, in the resized image), flipped horizontally if `flip`."""
    path: str                               # the image file: for messages and for compute_fn
    content: str                            # content_hash(path)
    size: tuple                             # (width, height) after resizing
    crop: tuple                             # (left, top, right, bottom)
    flip: bool = False

    @property
    def bucket(self) -> tuple:
        l, t, r, b = self.crop
        return (r - l, b - t)

    def key(self) -> str:
        w, h = self.size
        return (f"{self.content[:32]}_{w}x{h}_crop{','.join(str(int(c)) for c in self.crop)}"
                + ("_flip" if self.flip else ""))


class LatentCache(ShardedCache):
    """VAE latents, one shard per bucket. fingerprint: of the VAE's weights (module_fingerprint
    or file_fingerprint); settings: everything else that changes the pixels or the latents,
    e.g. {"resize": "lanczos", "scaling_factor": 0.18215, "dtype": "float32", "latent": "mean"}."""

    kind = "latents"

    def shard_of(self, item: LatentItem) -> str:
        w, h = item.bucket
        return f"{w}x{h}"

    def key_of(self, item: LatentItem) -> str:
        return item.key()

    def describe(self, item: LatentItem) -> str:
        return f"{item.path} (crop {item.crop}{', flipped' if item.flip else ''})"


class TextCache(ShardedCache):
    """Text-encoder outputs per caption (str items), one shard. fingerprint: of the text
    encoder's weights; settings: {"clip_skip": ..., "tokenizer": tokenizer_fingerprint(tok), ...}."""

    kind = "text"

    def shard_of(self, caption: str) -> str:
        return "text"

    def key_of(self, caption: str) -> str:
        return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]

    def describe(self, caption: str) -> str:
        return f"caption {caption[:60]!r}"
