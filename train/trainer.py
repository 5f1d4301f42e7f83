"""flame-train's run: config in, LoRA out. Every model computation is a compiled flame graph
(text encoding, VAE encoding, the UNet's forward, backward and AdamW update); numpy only
moves data in and out.

    validate config and paths -> scan images (skips listed) -> load models -> inject LoRA
    -> latent and text caches (compiled VAE encoder / text encoder, on disk) -> per micro-batch:
    inputs from the caches, timesteps and a noise seed from (seed, step) -> compiled step
    (one graph per bucket shape) -> metrics.jsonl, progress -> LoRA file (kohya format)

Outputs in save.output_dir: <name>.safetensors, <name>-step<N>.safetensors (every_steps,
the newest keep_last kept), state/ (the training state of each of those, for --resume; see
train/state.py), samples/ (with [sample] prompts), loss.png, config.toml (the resolved config),
train.log (what was printed), metrics.jsonl (one line per optimizer step). Ctrl-C or SIGTERM
finishes the step and saves (train/interrupts.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import flame
from flame.ir.errors import FlameError
from flame.models import load_text_encoder, load_tokenizer, load_unet, load_vae
from flame.models.configs import SD15_UNET, SD15_VAE, TINY_UNET, TINY_VAE
from flame.models.configs_clip import SD15_TEXT, TINY_TEXT
from flame.ir.printer import fmt_bytes
from flame.train import caches, data, plot, sample, state
from flame.train.check import param_bytes
from flame.train.interrupts import Interrupts
from flame.train.config import check_paths, to_toml
from flame.train.export import save_lora
from flame.train.lora import inject_lora, inject_lora_text_encoder, lora_parameters
from flame.train.objective import ObjectiveConfig, sample_timesteps
from flame.train.optim import AdamWConfig
from flame.train.schedule import ScheduleConfig, lr_at
from flame.train.step import TrainStep

ARCHITECTURES = {"sd15": (SD15_UNET, SD15_VAE, SD15_TEXT), "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT)}
MAX_SKIPPED_IN_ROW = 10     # train.nonfinite = "skip" still stops after this many in a row
LATENT_SETTINGS = {"pixels": "rgb8-lanczos-[-1,1]", "latent": "mean*scaling_factor", "dtype": "float32"}


class TrainError(FlameError, RuntimeError):
    pass


# ---------------------------------------------------------------- small pieces


class Log:
    """Prints and appends to train.log (flushed per line: a crash keeps what was said)."""

    def __init__(self, path: str | None, quiet: bool = False):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.quiet = quiet

    def __call__(self, msg: str = ""):
        if not self.quiet:
            print(msg, flush=True)
        self._write(msg)

    def quiet_line(self, bar, msg: str):
        """A line during the progress bar: above the bar on screen, and in the log."""
        if not self.quiet:
            bar.write(msg)
        self._write(msg)

    def _write(self, msg: str):
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def choose_backend(name: str) -> tuple[str, str]:
    from flame.runtime.device import cuda_available
    ok, why = cuda_available()
    if name == "cuda":
        if not ok:
            raise TrainError(f"train.backend = \"cuda\" but {why}; use backend = \"cpu\" (or \"auto\")")
        return "cuda", why
    if name == "cpu":
        return "cpu", "train.backend = \"cpu\""
    return ("cuda", f"auto: {why}") if ok else ("cpu", f"auto: no usable GPU ({why})")


def micro_seed(seed: int, stream: int, micro: int) -> int:
    """A 63-bit integer that depends only on (seed, stream, micro-batch index)."""
    a, b = np.random.SeedSequence([int(seed), int(stream), int(micro)]).generate_state(2)
    return int((int(a) << 31) ^ int(b)) & ((1 << 62) - 1)


# ---------------------------------------------------------------- models


@dataclass
class Models:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    lora: dict = field(default_factory=dict)        # kohya name -> LoRA module (UNet and text encoder)
    unet_params: dict = field(default_factory=dict)
    te_params: dict = field(default_factory=dict)


def load_models(cfg: dict, log) -> Models:
    m = cfg["model"]
    ckpt = m["checkpoint"]
    configs = (None, None, None) if os.path.isdir(ckpt) else ARCHITECTURES[m["architecture"]]
    t0 = time.time()
    log(f"loading {ckpt}")
    tok = load_tokenizer(m["tokenizer"] or ckpt)
    unet = load_unet(ckpt, configs[0])
    vae_path = m["vae"] or ckpt
    vae_cfg = None if os.path.isdir(vae_path) else configs[1]
    vae = load_vae(vae_path, vae_cfg)
    te = load_text_encoder(ckpt, configs[2], clip_skip=m["clip_skip"])
    ctx = unet.config.cross_attention_dim
    if te.config.hidden_size != ctx:
        raise TrainError(f"{ckpt}: the text encoder's width {te.config.hidden_size} is not the UNet's "
                         f"cross_attention_dim {ctx} (model.architecture = {m['architecture']!r}?)")
    log(f"  UNet {unet.num_parameters():,} parameters, VAE {vae.num_parameters():,}, "
        f"text encoder {te.num_parameters():,} ({time.time() - t0:.1f} s)")
    return Models(unet, vae, te, tok)


def add_lora(models: Models, cfg: dict, log):
    n, seed = cfg["network"], cfg["train"]["seed"]
    saved = flame.nn.init.rng()
    flame.manual_seed(seed)            # the LoRA's down weights are a function of the seed
    try:
        mods = inject_lora(models.unet, n["rank"], n["alpha"], n["conv_rank"], n["conv_alpha"])
        models.lora.update(mods)
        models.unet_params = lora_parameters(mods)
        for p in models.text_encoder.parameters():
            p.requires_grad = False
        if n["train_text_encoder"]:
            tmods = inject_lora_text_encoder(models.text_encoder, n["text_encoder_rank"] or n["rank"],
                                             n["text_encoder_alpha"] or n["alpha"])
            models.lora.update(tmods)
            models.te_params = lora_parameters(tmods)
    finally:
        flame.nn.init._rng = saved
    count = sum(p.data.size for p in {**models.unet_params, **models.te_params}.values())
    log(f"LoRA: {len(models.lora)} adapted layers, {count:,} trainable parameters "
        f"(rank {n['rank']}, alpha {n['alpha']:g}"
        + (f"; conv rank {n['conv_rank']}, alpha {n['conv_alpha']:g}" if n["conv_rank"] else "")
        + ("; text encoder too" if n["train_text_encoder"] else "") + ")")


def make_train_step(m: Models, cfg: dict, backend: str) -> TrainStep:
    """The run's compiled step (compiled per bucket shape on first use): UNet LoRA, and the
    text encoder's LoRA in its own learning-rate group when it is trained."""
    t = cfg["train"]
    trainable = {**m.unet_params, **m.te_params}
    groups = {k: 1 for k in m.te_params} if m.te_params else None
    ocfg = ObjectiveConfig(prediction=t["prediction"], min_snr_gamma=t["min_snr_gamma"] or None,
                           noise_offset=t["noise_offset"], t_min=t["timestep_min"], t_max=t["timestep_max"])
    acfg = AdamWConfig(betas=tuple(t["betas"]), eps=t["eps"], weight_decay=t["weight_decay"],
                       max_grad_norm=t["max_grad_norm"] or None, grad_accum=t["grad_accum"],
                       skip_nonfinite=True)   # a NaN step never reaches the weights
    if m.te_params:
        unet, te = m.unet, m.text_encoder

        def model(x, timesteps, ids):
            return unet(x, timesteps, te(ids))
    else:
        model = m.unet
    return TrainStep(model, trainable, ocfg, acfg, backend, groups=groups)


def sample_size(cfg: dict) -> tuple[int, int]:
    sm, res = cfg["sample"], cfg["buckets"]["resolution"]
    return (sm["width"] or res, sm["height"] or res)


def make_sampler(m: Models, encoders, cfg: dict, backend: str):
    """A Sampler over the run's UNet (LoRA included) and VAE, or None without prompts."""
    if not cfg["sample"]["prompts"]:
        return None
    w, h = sample_size(cfg)
    f = m.vae.config.downsampling * m.unet.config.downsampling
    if w % f or h % f:
        raise TrainError(f"sample size {w}x{h}: sides must be multiples of {f} for this model "
                         "(set sample.width / sample.height)")
    return sample.Sampler(m.unet, m.vae, lambda p: encoders.text(m.tokenizer.encode([p])),
                          cfg["train"]["prediction"], backend)


def check_bucket_shapes(ds, unet, vae, ckpt):
    check_bucket_shapes_of(ds, unet.config, vae.config, ckpt)


def check_bucket_shapes_of(ds, unet_cfg, vae_cfg, ckpt):
    """Every bucket's sides must survive the VAE's and then the UNet's downsamplings."""
    v, u = vae_cfg.downsampling, unet_cfg.downsampling
    for (w, h) in ds.buckets:
        if w % (v * u) or h % (v * u):
            raise TrainError(f"bucket {w}x{h}: sides must be multiples of {v * u} for this model ({ckpt}: "
                             f"the VAE divides by {v}, the UNet by {u}); make buckets.step a multiple of {v * u}")


# ---------------------------------------------------------------- encoders (compiled)


class Encoders:
    """The compiled VAE encoder and text encoder, one graph per input shape."""

    def __init__(self, models: Models, backend: str, log):
        self.models, self.backend, self.log = models, backend, log
        self.graphs = {}

    def _get(self, key, build):
        c = self.graphs.get(key)
        if c is None:
            t0 = time.time()
            c = self.graphs[key] = build()
            self.log(f"  compiled {key[0]} for {list(key[1])} ({time.time() - t0:.1f} s)")
        return c

    def latents(self, px: np.ndarray) -> np.ndarray:
        vae = self.models.vae
        sf = float(vae.scaling_factor)
        c = self._get(("the VAE encoder", px.shape), lambda: flame.compile(
            lambda x: vae.encode(x)[0] * sf, flame.spec(px.shape, "f32"), backend=self.backend))
        return np.asarray(c(px), np.float32)

    def text(self, ids: np.ndarray) -> np.ndarray:
        te = self.models.text_encoder
        c = self._get(("the text encoder", ids.shape), lambda: flame.compile(
            te, flame.spec(ids.shape, "i64"), backend=self.backend))
        return np.asarray(c(ids), np.float32)


def latent_items(ds, cfg, hashes: dict) -> list:
    """The (image, crop, flip) combinations the run can use, for the latent cache;
    hashes: {path: content hash} of every record."""
    items = []
    for r in ds.records:
        crop = data.center_crop(r.resized, r.bucket)
        for flip in ((False, True) if cfg["data"][r.folder]["flip"] else (False,)):
            items.append(caches.LatentItem(r.path, hashes[r.path], r.resized, crop, flip))
    return items


def cache_folder(cfg) -> str:
    if cfg["train"]["cache_dir"]:
        return cfg["train"]["cache_dir"]
    root = os.environ.get("FLAME_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flame")
    return os.path.join(root, "train")


# ---------------------------------------------------------------- the run


@dataclass
class Result:
    lora_path: str
    output_dir: str
    log_path: str
    metrics_path: str
    config_path: str
    losses: list
    steps: int
    seconds: float
    backend: str
    interrupted: bool = False


class Trainer:
    def __init__(self, cfg: dict, source: str = "config", quiet: bool = False):
        check_paths(cfg, source)
        self.cfg, self.source = cfg, source
        out = cfg["save"]["output_dir"]
        os.makedirs(out, exist_ok=True)
        self.paths = {k: os.path.join(out, f) for k, f in
                      (("log", "train.log"), ("metrics", "metrics.jsonl"), ("config", "config.toml"),
                       ("curve", "loss.png"))}
        self.log = Log(self.paths["log"], quiet)
        self.quiet = quiet

    # -- setup
    def prepare(self):
        cfg, log = self.cfg, self.log
        t = cfg["train"]
        log(f"flame-train {time.strftime('%Y-%m-%d %H:%M:%S')}: config {self.source}")
        with open(self.paths["config"], "w", encoding="utf-8") as f:
            f.write(to_toml(cfg))
        self.backend, why = choose_backend(t["backend"])
        base_dtype = t["base_dtype"] if t["base_dtype"] != "auto" else ("bf16" if self.backend == "cuda" else "f32")
        log(f"backend: {self.backend} ({why}); base weights stored as {base_dtype}, arithmetic float32")
        log("scanning images")
        self.ds = data.scan(cfg)
        log(data.report(self.ds))
        self.models = load_models(cfg, log)
        check_bucket_shapes(self.ds, self.models.unet, self.models.vae, cfg["model"]["checkpoint"])
        self.encoders = Encoders(self.models, self.backend, log)
        self._build_caches()
        add_lora(self.models, cfg, log)
        if base_dtype != "f32":
            self.models.unet.store_frozen_as(base_dtype)
            self.models.text_encoder.store_frozen_as(base_dtype)
        self._build_step()
        self.sampler = make_sampler(self.models, self.encoders, cfg, self.backend)

    def _build_caches(self):
        cfg, log, m = self.cfg, self.log, self.models
        folder = cache_folder(cfg)
        self.latents = None
        if cfg["train"]["cache_latents"]:
            # each image file is read and hashed once: the cache keys, and the keys looked up per step
            self._hashes = {r.path: caches.content_hash(r.path) for r in self.ds.records}
            items = latent_items(self.ds, cfg, self._hashes)
            lc = caches.LatentCache(folder, caches.module_fingerprint(m.vae),
                                    {**LATENT_SETTINGS, "scaling_factor": float(m.vae.scaling_factor)})
            t0 = time.time()

            def encode(batch):
                px = np.stack([data.pixels(it.path, it.size, it.crop, it.flip) for it in batch])
                return self.encoders.latents(px)
            values = lc.get_or_compute(items, encode, batch_size=1,
                                       progress=lambda d, n: d == n and log(f"  encoded {n} image(s)"))
            self.latents = {it.key(): v for it, v in zip(items, values)}
            log(f"latents: {lc.stats['hits']} from the cache, {lc.stats['computed']} encoded "
                f"({time.time() - t0:.1f} s; {lc.dir})")
            for e in lc.events:
                log(f"  {e}")
        self.text = None
        captions = data.distinct_captions(self.ds, cfg)
        if not cfg["network"]["train_text_encoder"] and captions is not None:
            tc = caches.TextCache(folder, caches.module_fingerprint(m.text_encoder),
                                  {"clip_skip": cfg["model"]["clip_skip"],
                                   "tokenizer": caches.tokenizer_fingerprint(m.tokenizer)})
            t0 = time.time()
            values = tc.get_or_compute(captions, lambda b: self.encoders.text(m.tokenizer.encode(b)),
                                       batch_size=1)
            self.text = dict(zip(captions, values))
            log(f"text embeddings: {tc.stats['hits']} from the cache, {tc.stats['computed']} encoded "
                f"({time.time() - t0:.1f} s; {tc.dir})")
            for e in tc.events:
                log(f"  {e}")

    def _build_step(self):
        self.step = make_train_step(self.models, self.cfg, self.backend)
        self.objective = self.step.objective
        t = self.cfg["train"]
        te_lr = t["text_encoder_lr"] if t["text_encoder_lr"] is not None else t["lr"]
        self.schedules = [ScheduleConfig(lr=x, name=t["lr_scheduler"], warmup_steps=t["warmup_steps"],
                                         total_steps=t["steps"])
                          for x in ([t["lr"], te_lr] if self.models.te_params else [t["lr"]])]

    # -- per micro-batch
    def inputs(self, batch):
        recs = [self.ds.records[it.record] for it in batch]
        if self.latents is not None:
            lat = np.stack([self.latents[self._latent_key(r, it)] for r, it in zip(recs, batch)])
        else:
            px = np.stack([data.pixels(r.path, r.resized, it.crop, it.flip) for r, it in zip(recs, batch)])
            lat = self.encoders.latents(px)
        caps = [it.caption for it in batch]
        if self.models.te_params:
            ctx = self.models.tokenizer.encode(caps)
        elif self.text is not None:
            ctx = np.stack([self.text[c] for c in caps])
        else:
            ctx = self.encoders.text(self.models.tokenizer.encode(caps))
        return lat, ctx

    def _latent_key(self, r, it):
        return caches.LatentItem(r.path, self._hashes[r.path], r.resized, it.crop, it.flip).key()

    def lrs(self, opt_step: int):
        """The learning rate of each parameter group (UNet, then text encoder) at this step."""
        lrs = [lr_at(opt_step - 1, s) for s in self.schedules]
        return lrs[0] if len(lrs) == 1 else lrs

    # -- the loop
    def metadata(self, started: float, step: int, epoch: int) -> dict:
        cfg, t = self.cfg, self.cfg["train"]
        b = cfg["buckets"]
        triggers = [d["trigger"] for d in cfg["data"] if d["trigger"]]
        return {
            "ss_sd_model_name": os.path.basename(os.path.normpath(cfg["model"]["checkpoint"])),
            "ss_learning_rate": t["lr"], "ss_unet_lr": t["lr"],
            "ss_text_encoder_lr": self.schedules[1].lr if len(self.schedules) > 1 else None,
            "ss_max_train_steps": t["steps"], "ss_steps": step, "ss_epoch": epoch,
            "ss_lr_scheduler": t["lr_scheduler"], "ss_lr_warmup_steps": t["warmup_steps"],
            "ss_optimizer": f"AdamW(betas={tuple(t['betas'])},eps={t['eps']},weight_decay={t['weight_decay']})",
            "ss_seed": t["seed"], "ss_noise_offset": t["noise_offset"] or None,
            "ss_min_snr_gamma": t["min_snr_gamma"] or None, "ss_clip_skip": cfg["model"]["clip_skip"],
            "ss_resolution": f"({b['resolution']}, {b['resolution']})",
            "ss_enable_bucket": "True", "ss_min_bucket_reso": b["min_size"], "ss_max_bucket_reso": b["max_size"],
            "ss_bucket_no_upscale": str(not b["upscale"]),
            "ss_bucket_info": {"buckets": {f"{w}x{h}": c for (w, h), c in sorted(self.ds.buckets.items())}},
            "ss_num_train_images": self.ds.items_per_epoch,
            "ss_batch_size_per_device": t["batch_size"], "ss_gradient_accumulation_steps": t["grad_accum"],
            "ss_max_grad_norm": t["max_grad_norm"], "ss_mixed_precision": "no",
            "ss_caption_dropout_rate": max((d["caption_dropout"] for d in cfg["data"]), default=0.0),
            "ss_keep_tokens": max((d["keep_tokens"] for d in cfg["data"]), default=0),
            "ss_flip_aug": str(any(d["flip"] for d in cfg["data"])),
            "ss_shuffle_caption": str(any(d["shuffle_captions"] for d in cfg["data"])),
            "ss_prediction_type": t["prediction"],
            "ss_training_started_at": f"{started:.3f}", "ss_training_finished_at": f"{time.time():.3f}",
            "ss_output_name": cfg["save"]["name"],
            "ss_tag_frequency": self.ds.tag_frequency(),
            "ss_dataset_dirs": {os.path.basename(os.path.normpath(f["path"])):
                                {"n_repeats": f["repeats"], "img_count": f["images"]} for f in self.ds.folders},
            "ss_training_comment": "trained with flame",
            "modelspec.trigger_phrase": ", ".join(dict.fromkeys(triggers)) or None,
            "modelspec.prediction_type": t["prediction"],
            "modelspec.resolution": f"{b['resolution']}x{b['resolution']}",
            "modelspec.encoder_layer": cfg["model"]["clip_skip"],
            "modelspec.timestep_range": f"{t['timestep_min']},{t['timestep_max']}",
        }

    def save(self, path: str, started: float, step: int, epoch: int) -> str:
        save_lora(path, self.models.lora, self.metadata(started, step, epoch), self.cfg["save"]["dtype"])
        return path

    def render(self, step: int, say) -> list[str]:
        """The [sample] prompts with the LoRA as it is now, into samples/step<N>-<i>.png."""
        t0 = time.time()
        paths = sample.render(self.sampler, self.cfg["sample"], os.path.join(self.cfg["save"]["output_dir"], "samples"),
                              f"step{step:06d}", sample_size(self.cfg))
        say(f"  samples at step {step}: {paths[-1]} ({time.time() - t0:.1f} s)")
        return paths

    def periodic_lora(self, step: int) -> str:
        sv = self.cfg["save"]
        return os.path.join(sv["output_dir"], f"{sv['name']}-step{step:06d}.safetensors")

    def checkpoint(self, lora_path: str, started: float, position: dict) -> str:
        """The LoRA and the training state for `position`, each written atomically."""
        sv = self.cfg["save"]
        self.save(lora_path, started, position["step"], position["epoch"])
        opt = self.step.opt
        sp = state.state_path(sv["output_dir"], sv["name"], position["step"])
        state.save_state(sp, {k: p.data for k, p in opt.params.items()}, opt.state_dict(), position, self.cfg)
        self._last_saved = lora_path
        self._metrics_file.flush()
        plot.write_loss_curve(self.paths["metrics"], self.paths["curve"],
                              f"{sv['name']}: loss per step (blue: moving average)")
        return sp

    def resume_from(self, path: str) -> dict:
        """Load a state file into the trainables and the optimizer; returns its position."""
        params, opt_state, position, saved_cfg = state.load_state(path)
        diff = state.config_difference(saved_cfg, state.comparable_config(self.cfg))
        if diff:
            raise TrainError(f"{path}: cannot resume: the config differs from the run that saved it "
                             "([save] may change, nothing else):\n  " + "\n  ".join(diff))
        opt = self.step.opt
        missing = [k for k in opt.params if k not in params]
        if missing or len(params) != len(opt.params):
            raise TrainError(f"{path}: the state holds {len(params)} trainables, the run has {len(opt.params)}"
                             + (f" (e.g. {missing[0]!r} is missing)" if missing else ""))
        for k, p in opt.params.items():
            if params[k].shape != p.shape:
                raise TrainError(f"{path}: {k} has shape {list(params[k].shape)}, the run's is {list(p.shape)}")
            p.data = np.array(params[k], np.float32)
        try:
            opt.load_state_dict(opt_state)
        except (KeyError, ValueError) as e:
            raise TrainError(f"{path}: {e}") from None
        self.log(f"resuming from {path}: step {position['step']}, epoch {position['epoch']}")
        return position

    def _keep_metrics_until(self, step: int):
        """metrics.jsonl without the lines of steps after `step` (done after the last save
        by a run that was killed): they are done again now."""
        p = self.paths["metrics"]
        if not os.path.exists(p):
            return
        with open(p, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(p, "w", encoding="utf-8") as f:
            f.writelines(lines)

    def train(self, resume: bool = False) -> Result:
        from tqdm import tqdm
        cfg, log = self.cfg, self.log
        t, sv = cfg["train"], cfg["save"]
        started = time.time()
        position = {"step": 0, "epoch": 0, "pos": 0, "micro": 0, "smooth": None}
        final = os.path.join(sv["output_dir"], f"{sv['name']}.safetensors")
        if resume:
            found = state.latest_state(sv["output_dir"], sv["name"])
            if found is None:
                raise TrainError(f"--resume: no training state in {os.path.join(sv['output_dir'], state.FOLDER)} "
                                 f"for save.name = {sv['name']!r}")
            position = self.resume_from(found)
            if position["step"] >= t["steps"]:
                log(f"the run already finished at step {position['step']} (train.steps = {t['steps']}): {final}")
                return self._result(final, [], position["step"], 0.0)
        self._keep_metrics_until(position["step"])
        epoch, pos, micro = position["epoch"], position["pos"], position["micro"]
        batches = data.epoch_batches(self.ds, cfg, epoch)
        log(f"training: {t['steps']} steps x {t['grad_accum']} micro-batch(es) of up to {t['batch_size']} "
            f"image(s); {len(batches)} micro-batches per epoch")
        losses = []
        bar = tqdm(total=t["steps"], initial=position["step"], unit="step", disable=self.quiet,
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        smooth = position["smooth"]
        stop = Interrupts(lambda: self.log.quiet_line(
            bar, "  interrupted: finishing this step, then saving (press Ctrl-C again to stop at once)"))
        opt_step, skipped_in_row = position["step"], 0
        try:
            with stop, open(self.paths["metrics"], "a", encoding="utf-8") as metrics:
                self._metrics_file = metrics
                for opt_step in range(position["step"] + 1, t["steps"] + 1):
                    lr = self.lrs(opt_step)
                    step_losses = []
                    for _ in range(t["grad_accum"]):
                        if pos == len(batches):
                            epoch, pos = epoch + 1, 0
                            batches = data.epoch_batches(self.ds, cfg, epoch)
                        batch = batches[pos]
                        pos += 1
                        lat, ctx = self.inputs(batch)
                        ts = sample_timesteps(np.random.default_rng(micro_seed(t["seed"], 2, micro)),
                                              len(batch), self.objective)
                        key_before = len(self.step.compiled)
                        t0 = time.time()
                        loss = self.step(lat, ctx, ts, micro_seed(t["seed"], 3, micro), lr, opt_step)
                        if len(self.step.compiled) != key_before:
                            w, h = self.ds.records[batch[0].record].bucket
                            c = list(self.step.compiled.values())[-1]
                            self.log.quiet_line(bar, f"  compiled the training step for bucket {w}x{h}, batch "
                                                     f"{len(batch)} ({time.time() - t0:.1f} s; arena "
                                                     f"{fmt_bytes(c.runner.plan.peak)} planned)")
                        micro += 1
                        step_losses.append(loss)
                    loss = float(np.mean(step_losses))
                    finite = math.isfinite(loss) and math.isfinite(self.step.last_grad_norm)
                    if not finite:
                        # the compiled update left the weights and moments unchanged
                        what = (f"step {opt_step}: the loss is {loss}, the gradient norm "
                                f"{self.step.last_grad_norm} (learning rate {lr})")
                        skipped_in_row += 1
                        if t["nonfinite"] == "stop" or skipped_in_row >= MAX_SKIPPED_IN_ROW:
                            why = ("" if t["nonfinite"] == "stop" else
                                   f"; {skipped_in_row} steps in a row were not finite")
                            raise TrainError(f"{what}; stopping{why}. Last saved LoRA: "
                                             f"{self._last_saved or 'none yet'}. Lower train.lr, set "
                                             "train.max_grad_norm, or train.nonfinite = \"skip\".")
                        self.log.quiet_line(bar, f"  {what}: update skipped (train.nonfinite = \"skip\")")
                    else:
                        skipped_in_row = 0
                        losses.append(loss)
                        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
                    lr0 = lr if not isinstance(lr, list) else lr[0]
                    rec = {"step": opt_step, "loss": loss if finite else None, "lr": lr,
                           "grad_norm": self.step.last_grad_norm if finite else None,
                           "epoch": epoch, "time": round(time.time() - started, 3)}
                    if not finite:
                        rec["skipped"] = True
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    if smooth is not None:
                        bar.set_postfix_str(f"loss {smooth:.4f} lr {lr0:.2e}", refresh=False)
                    bar.update(1)
                    here = {"step": opt_step, "epoch": epoch, "pos": pos, "micro": micro, "smooth": smooth}
                    last = opt_step == t["steps"]
                    if stop.requested and not last:
                        p = self.periodic_lora(opt_step)
                        sp = self.checkpoint(p, started, here)
                        bar.close()
                        log(f"interrupted after step {opt_step} of {t['steps']}: saved {p} and {sp}; "
                            f"continue with --resume")
                        return self._result(p, losses, opt_step, time.time() - started, interrupted=True)
                    every = cfg["sample"]["every_steps"]
                    if self.sampler and every and opt_step % every == 0 and not last:
                        self.render(opt_step, lambda msg: self.log.quiet_line(bar, msg))
                    if sv["every_steps"] and opt_step % sv["every_steps"] == 0 and not last:
                        p = self.periodic_lora(opt_step)
                        self.checkpoint(p, started, here)
                        self.log.quiet_line(bar, f"  saved {p} (and its training state)")
                        for f in state.prune(sv["output_dir"], sv["name"], sv["keep_last"], self.periodic_lora):
                            self.log.quiet_line(bar, f"  removed {f} (save.keep_last = {sv['keep_last']})")
                self.checkpoint(final, started, here)
                if self.sampler:
                    self.render(t["steps"], lambda msg: self.log.quiet_line(bar, msg))
        finally:
            bar.close()
        secs = time.time() - started
        n = len(losses)
        if n:
            first, last = np.mean(losses[:max(1, n // 5)]), np.mean(losses[-max(1, n // 5):])
            images = sum(len(b) for b in batches) / max(len(batches), 1) * n * t["grad_accum"]
            log(f"done: {n} steps in {secs:.1f} s ({n * t['grad_accum'] / secs:.2f} micro-batches/s, "
                f"about {images / secs:.2f} images/s); loss {first:.4f} (first fifth) -> {last:.4f} (last fifth)")
        if self.step.compiled:
            arena = max(c.runner.plan.peak for c in self.step.compiled.values())
            weights = max(param_bytes(c.graph) for c in self.step.compiled.values())
            log(f"memory: largest training graph's arena {fmt_bytes(arena)}, weights and optimizer state "
                f"{fmt_bytes(weights)} ({self.backend})")
        log(f"LoRA:    {final}")
        log(f"config:  {self.paths['config']}")
        log(f"log:     {self.paths['log']}")
        log(f"metrics: {self.paths['metrics']}")
        log(f"curve:   {self.paths['curve']}")
        return self._result(final, losses, t["steps"], secs)

    def _result(self, lora_path, losses, steps, seconds, interrupted=False) -> Result:
        return Result(lora_path, self.cfg["save"]["output_dir"], self.paths["log"], self.paths["metrics"],
                      self.paths["config"], losses, steps, seconds, self.backend, interrupted)

    _last_saved = None


def run(cfg: dict, source: str = "config", quiet: bool = False, resume: bool = False) -> Result:
    tr = Trainer(cfg, source, quiet)
    try:
        tr.prepare()
        return tr.train(resume)
    finally:
        tr.log.close()
