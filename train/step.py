"""The compiled training step: objective forward, backward w.r.t. the trainables, AdamW.

One graph per bucket shape (latents [B,4,h,w] and text embeddings [B,77,d]), compiled on
first use and cached by shape. Each graph's inputs are the batch, the timesteps (int64[B],
drawn on the host), the noise seed (int64, noise is drawn in the graph) and the f32[4]
optimizer scalars (see train/optim.py): changing the LR or the step count never recompiles.

grad_accum = 1: one graph does forward, backward and the update (`__call__`).
grad_accum = k > 1: each bucket's graph adds its gradients into persistent sums, and a
single small graph shared by all buckets applies AdamW every k-th micro-batch.
"""
from __future__ import annotations

import numpy as np

import flame
from flame.ir.dtypes import as_dtype
from flame.train.objective import as_objective_config, diffusion_loss
from flame.train.optim import AdamW


class TrainStep:
    """step(latents, text_emb, timesteps, seed, lr, step) -> loss (float) for one
    micro-batch; `step` is the 1-based optimizer step that this micro-batch contributes to.
    With grad_accum = k the update runs on every k-th call (those calls' lr and step are
    used); `pending` says how many micro-batches wait in the sums."""

    def __init__(self, model, trainable, objective_cfg=None, optim_cfg=None, backend="cpu", options=None,
                 groups=None):
        self.model = model
        self.objective = as_objective_config(objective_cfg)
        self.opt = AdamW(trainable, optim_cfg, groups)
        self.backend = backend
        self.options = options
        self.compiled: dict = {}      # (kind, shapes) -> flame Compiled
        self.traces = 0               # graphs traced so far (tests check that LR changes add none)
        self.pending = 0
        self.last_grad_norm = None    # global gradient norm (before clipping) of the last update

    # ---- graphs
    def _loss_and_grads(self, latents, text_emb, timesteps, seed):
        def loss_fn(latents, text_emb, timesteps, seed):
            return diffusion_loss(self.model, latents, text_emb, timesteps, seed, self.objective)
        return flame.value_and_grad(loss_fn, params=list(self.opt.params.values()))(
            latents, text_emb, timesteps, seed)

    def _fused(self, latents, text_emb, timesteps, seed, hyper):
        self.traces += 1
        loss, grads = self._loss_and_grads(latents, text_emb, timesteps, seed)
        updates, norm = self.opt.update(grads, hyper)
        return (loss, norm), updates

    def _accumulate(self, latents, text_emb, timesteps, seed):
        self.traces += 1
        loss, grads = self._loss_and_grads(latents, text_emb, timesteps, seed)
        return loss, self.opt.accumulate(grads)

    def _apply(self, hyper):
        self.traces += 1
        updates, norm = self.opt.apply(hyper)
        return norm, updates

    @staticmethod
    def _specs(latents_shape, text_shape, latents_dtype="f32", text_dtype="f32"):
        b = int(latents_shape[0])
        if int(text_shape[0]) != b:
            raise ValueError(f"train/step.py: latents batch {b} and text embeddings batch {text_shape[0]} differ")
        return (flame.spec(latents_shape, latents_dtype), flame.spec(text_shape, text_dtype),
                flame.spec((b,), "i64"), flame.spec((), "i64"))

    def _what(self, latents_shape, text_shape, latents_dtype, text_dtype):
        """(cache key, function, specs) of one bucket shape's graph."""
        accum = self.opt.cfg.grad_accum > 1
        latents_dtype, text_dtype = as_dtype(latents_dtype).name, as_dtype(text_dtype).name
        key = ("accumulate" if accum else "fused", tuple(latents_shape), tuple(text_shape),
               latents_dtype, text_dtype)
        specs = self._specs(latents_shape, text_shape, latents_dtype, text_dtype)
        if accum:
            return key, self._accumulate, specs
        return key, self._fused, (*specs, flame.spec(self.opt.hyper_shape, "f32"))

    def compile_for(self, latents_shape, text_shape, latents_dtype="f32", text_dtype="f32"):
        """The compiled graph for one bucket shape (traced and compiled on first request)."""
        key, fn, specs = self._what(latents_shape, text_shape, latents_dtype, text_dtype)
        c = self.compiled.get(key)
        if c is None:
            c = flame.compile(fn, *specs, backend=self.backend, options=self.options, param_updates=True)
            self.compiled[key] = c
        return c

    def plan_for(self, latents_shape, text_shape, latents_dtype="f32", text_dtype="f32"):
        """The schedule compile_for would run (kernels, arena plan), compiling nothing."""
        _, fn, specs = self._what(latents_shape, text_shape, latents_dtype, text_dtype)
        traces = self.traces
        sched = flame.plan(fn, *specs, backend=self.backend, options=self.options)
        self.traces = traces          # a plan is not a compiled graph
        return sched

    def _apply_graph(self):
        c = self.compiled.get(("apply",))
        if c is None:
            c = flame.compile(self._apply, flame.spec(self.opt.hyper_shape, "f32"), backend=self.backend,
                              options=self.options, param_updates=True)
            self.compiled[("apply",)] = c
        return c

    # ---- calls
    def __call__(self, latents, text_emb, timesteps, seed, lr, step) -> float:
        if self.opt.cfg.grad_accum == 1:
            latents, text_emb, timesteps, seed = self._inputs(latents, text_emb, timesteps, seed)
            c = self.compile_for(latents.shape, text_emb.shape, latents.dtype, text_emb.dtype)
            loss, norm = c(latents, text_emb, timesteps, seed, self.opt.hyper(lr, step))
            self.last_grad_norm = float(norm)
            return float(loss)
        loss = self.accumulate(latents, text_emb, timesteps, seed)
        if self.pending == self.opt.cfg.grad_accum:
            self.apply(lr, step)
        return loss

    def accumulate(self, latents, text_emb, timesteps, seed) -> float:
        """Forward and backward of one micro-batch, gradients added to the sums."""
        if self.opt.cfg.grad_accum == 1:
            raise ValueError("train/step.py: accumulate needs grad_accum > 1 (grad_accum = 1 updates in __call__)")
        latents, text_emb, timesteps, seed = self._inputs(latents, text_emb, timesteps, seed)
        c = self.compile_for(latents.shape, text_emb.shape, latents.dtype, text_emb.dtype)
        loss = float(c(latents, text_emb, timesteps, seed))
        self.pending += 1
        return loss

    def apply(self, lr, step):
        """AdamW on the mean of the pending micro-batches' gradients; the sums restart."""
        if self.pending == 0:
            raise ValueError("train/step.py: apply with no accumulated micro-batch")
        norm = self._apply_graph()(self.opt.hyper(lr, step, grad_scale=1.0 / self.pending))
        self.last_grad_norm = float(norm)
        self.pending = 0

    def _inputs(self, latents, text_emb, timesteps, seed):
        latents, text_emb = np.asarray(latents), np.asarray(text_emb)
        timesteps = np.asarray(timesteps)
        if timesteps.shape != (latents.shape[0],) or timesteps.dtype.kind not in "iu":
            raise ValueError(f"train/step.py: timesteps must be integers of shape [{latents.shape[0]}], "
                             f"got {timesteps.dtype}{list(timesteps.shape)}")
        return latents, text_emb, timesteps.astype(np.int64), np.asarray(int(seed), np.int64)


def build_train_step(unet, lora_params, objective_cfg=None, optim_cfg=None, batch_shapes=(),
                     backend="cpu", options=None, groups=None) -> TrainStep:
    """unet(x, timesteps, context) -> prediction; lora_params: the trainable Parameters (a
    dict {name: Parameter} or a list; every other Parameter the unet uses stays frozen).
    batch_shapes: (latents shape, text embedding shape) pairs to compile now; others compile
    on first use."""
    step = TrainStep(unet, lora_params, objective_cfg, optim_cfg, backend, options, groups)
    for lat, txt in batch_shapes:
        step.compile_for(lat, txt)
    if step.opt.cfg.grad_accum > 1 and batch_shapes:
        step._apply_graph()
    return step
