"""AdamW inside the compiled step: global-norm clipping, bias correction, decoupled decay.

The moments (and, with gradient accumulation, the gradient sums) are flame Parameters with
requires_grad=False: the step returns their new values through `param_updates`, so on the
GPU they live in the step's arena and never travel to the host.

Everything that changes from step to step without changing the graph comes in as one f32[4]
`hyper` input computed on the host in float64 (`AdamW.hyper`): [1 - lr*wd, lr / (1 - b1^k),
sqrt(1 - b2^k), grad_scale]. Computing the bias corrections on the host keeps
`1 - 0.999^1` exact (float32 would lose four digits to cancellation there) and gives the
same scalars torch.optim.AdamW uses; a new LR or step count is new data, never a new graph.

Gradient accumulation (k micro-batches per update) uses two graphs: `accumulate` (in each
bucket's forward+backward graph) adds the micro-batch gradients into persistent sums, and
`apply` — one small graph for all buckets — scales the sums by grad_scale = 1/k, clips, runs
AdamW and zeroes the sums. Micro-batches may come from different buckets, the big graph is
compiled once per bucket (not once per k), and k can change without recompiling. With k = 1
`update` does the whole thing in the forward+backward graph, with no sums at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import flame
from flame.ir.ops import where
from flame.ir.tensor import Tensor
from flame.ir.tracer import current
from flame.nn.module import Parameter


@dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW's hyper-parameters, plus clipping (max_grad_norm: None or 0 = off,
    torch.nn.utils.clip_grad_norm_'s rule) and grad_accum (micro-batches per update)."""
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    # a step whose gradients hold a NaN or inf leaves the weights and moments as they were
    # (in the graph: the loss is still reported, and the host decides to stop or go on)
    skip_nonfinite: bool = False

    def __post_init__(self):
        where = "train/optim.py AdamWConfig"
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"{where}: betas={self.betas!r} must each be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"{where}: eps={self.eps!r} must be > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"{where}: weight_decay={self.weight_decay!r} must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"{where}: max_grad_norm={self.max_grad_norm!r} must be >= 0 (0 or None: off)")
        if int(self.grad_accum) != self.grad_accum or self.grad_accum < 1:
            raise ValueError(f"{where}: grad_accum={self.grad_accum!r} must be an integer >= 1")


def as_adamw_config(cfg) -> AdamWConfig:
    if cfg is None:
        return AdamWConfig()
    if isinstance(cfg, AdamWConfig):
        return cfg
    if isinstance(cfg, dict):
        return AdamWConfig(**cfg)
    raise TypeError(f"train/optim.py: expected an AdamWConfig or dict, got {type(cfg).__name__}")


def graph_name(p: Parameter) -> str:
    """The name this Parameter has as an input of the graph being traced (the key
    param_updates wants)."""
    return current().param_node(p).attrs["name"]


def _named(params) -> dict:
    if isinstance(params, dict):
        items = list(params.items())
    else:
        items = [(f"param{i}", p) for i, p in enumerate(params)]
    for k, p in items:
        if not isinstance(p, Parameter):
            raise TypeError(f"train/optim.py: trainable {k!r} is a {type(p).__name__}, not a flame Parameter")
        if not p.dtype.is_float:
            raise TypeError(f"train/optim.py: trainable {k!r} has dtype {p.dtype.name}; it must be floating point")
    if len({id(p) for _, p in items}) != len(items):
        raise ValueError("train/optim.py: the same Parameter is listed twice among the trainables")
    return dict(items)


class AdamW:
    """params: a dict {name: Parameter} (names used for the state's names) or a list.
    groups: {name: group index} for parameters with their own learning rate (the text
    encoder's LoRA); absent names are in group 0. With G > 1 groups `hyper` is f32[G, 4],
    one row per group; clipping stays global over all groups, as in torch."""

    def __init__(self, params, cfg=None, groups: dict | None = None):
        self.cfg = as_adamw_config(cfg)
        self.params = _named(params)
        groups = dict(groups or {})
        unknown = [k for k in groups if k not in self.params]
        if unknown:
            raise KeyError(f"train/optim.py: group given for {unknown[0]!r}, which is not a trainable")
        self.group = {k: int(groups.get(k, 0)) for k in self.params}
        self.num_groups = max(self.group.values(), default=0) + 1
        if sorted(set(self.group.values())) != list(range(self.num_groups)):
            raise ValueError(f"train/optim.py: groups must be numbered 0..G-1, got {sorted(set(self.group.values()))}")
        zeros = lambda p: Parameter(np.zeros(p.shape, np.float32), requires_grad=False)
        self.m = {k: zeros(p) for k, p in self.params.items()}
        self.v = {k: zeros(p) for k, p in self.params.items()}
        self.gsum = {k: zeros(p) for k, p in self.params.items()} if self.cfg.grad_accum > 1 else {}

    # ---- host side
    @property
    def hyper_shape(self) -> tuple:
        return (4,) if self.num_groups == 1 else (self.num_groups, 4)

    def hyper(self, lr, step: int, grad_scale: float = 1.0) -> np.ndarray:
        """f32[4] (or f32[G, 4]) for optimizer step `step` (1-based, as torch counts it) at
        learning rate lr (one number, or one per group)."""
        if step < 1:
            raise ValueError(f"train/optim.py: optimizer step {step} must be >= 1 (the first update is step 1)")
        lrs = [float(x) for x in np.atleast_1d(lr)]
        if len(lrs) == 1:
            lrs = lrs * self.num_groups
        if len(lrs) != self.num_groups:
            raise ValueError(f"train/optim.py: {len(lrs)} learning rates for {self.num_groups} groups")
        b1, b2 = self.cfg.betas
        rows = [[1.0 - x * self.cfg.weight_decay, x / (1.0 - b1 ** step), math.sqrt(1.0 - b2 ** step),
                 grad_scale] for x in lrs]
        return np.array(rows[0] if self.num_groups == 1 else rows, np.float32)

    def state_dict(self) -> dict:
        """Moments (and pending gradient sums) as host arrays, for a resumable checkpoint."""
        out = {}
        for tag, d in (("m", self.m), ("v", self.v), ("gsum", self.gsum)):
            out.update({f"{tag}.{k}": p.data for k, p in d.items()})
        return out

    def load_state_dict(self, sd: dict):
        for tag, d in (("m", self.m), ("v", self.v), ("gsum", self.gsum)):
            for k, p in d.items():
                key = f"{tag}.{k}"
                if key not in sd:
                    raise KeyError(f"train/optim.py: optimizer state has no {key!r}")
                if tuple(np.shape(sd[key])) != p.shape:
                    raise ValueError(f"train/optim.py: optimizer state {key!r} has shape "
                                     f"{list(np.shape(sd[key]))}, the parameter {list(p.shape)}")
                p.data = np.array(sd[key], np.float32)

    # ---- in the graph
    def _name_state(self):
        names = current().param_names
        for tag, d in (("m", self.m), ("v", self.v), ("gsum", self.gsum)):
            for k, p in d.items():
                names.setdefault(id(p), f"adamw.{tag}.{k}")

    def _check(self, grads):
        if len(grads) != len(self.params):
            raise ValueError(f"train/optim.py: {len(grads)} gradients for {len(self.params)} parameters")
        for (k, p), g in zip(self.params.items(), grads):
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"train/optim.py: gradient of {k!r} has shape {list(g.shape)}, "
                                 f"the parameter {list(p.shape)}")

    def update(self, grads, hyper: Tensor):
        """(new params and moments {graph name: value}, global gradient norm before
        clipping) from this step's gradients (in the order of self.params)."""
        grads = list(grads.values()) if isinstance(grads, dict) else list(grads)
        self._check(grads)
        self._name_state()
        return self._adamw([g.cast("f32") for g in grads], hyper)

    def accumulate(self, grads) -> dict:
        """{graph name of each gradient sum: sum + grad}."""
        if not self.gsum:
            raise ValueError("train/optim.py: accumulate needs grad_accum > 1 in AdamWConfig")
        grads = list(grads.values()) if isinstance(grads, dict) else list(grads)
        self._check(grads)
        self._name_state()
        out = {}
        for k, g in zip(self.params, grads):
            s = self.gsum[k]
            out[graph_name(s)] = s.tensor() + g.cast("f32")
        return out

    def apply(self, hyper: Tensor):
        """AdamW from the gradient sums (scaled by hyper[3]); the sums are reset to zero.
        Returns (updates, gradient norm) like `update`."""
        if not self.gsum:
            raise ValueError("train/optim.py: apply needs grad_accum > 1 in AdamWConfig")
        self._name_state()
        out, norm = self._adamw([self.gsum[k].tensor() for k in self.params], hyper)
        for k, s in self.gsum.items():
            out[graph_name(s)] = flame.zeros(s.shape)
        return out, norm

    def _adamw(self, grads, hyper) -> dict:
        b1, b2 = self.cfg.betas
        rows = [hyper] if self.num_groups == 1 else [hyper[g] for g in range(self.num_groups)]
        bc2_sqrt, grad_scale = rows[0][2], rows[0][3]
        grads = [g * grad_scale for g in grads]
        sq = [(g * g).sum() for g in grads]
        # summed as a balanced tree: SD 1.5's 512 LoRA tensors as one chain of adds fuse into
        # a kernel whose expression is too deep for the code generator to emit
        while len(sq) > 1:
            sq = [a + b for a, b in zip(sq[0::2], sq[1::2])] + sq[len(sq) // 2 * 2:]
        norm = sq[0].sqrt()
        if self.cfg.max_grad_norm:
            # torch.nn.utils.clip_grad_norm_: scale by min(1, max / (norm + 1e-6))
            coef = (float(self.cfg.max_grad_norm) / (norm + 1e-6)).minimum(1.0)
            grads = [g * coef for g in grads]
        # NaN < x is false: `finite` holds only when every gradient is finite (a float32 sum of
        # squares below 3e38; no inf literal in generated source)
        finite = norm < 3.0e38 if self.cfg.skip_nonfinite else None
        out = {}
        for (k, p), g in zip(self.params.items(), grads):
            decay, step_size = rows[self.group[k]][0], rows[self.group[k]][1]
            m, v = self.m[k], self.v[k]
            pt = p.tensor()
            m1 = m.tensor() + (g - m.tensor()) * (1.0 - b1)       # torch: exp_avg.lerp_(g, 1 - b1)
            v1 = v.tensor() * b2 + g * g * (1.0 - b2)
            denom = v1.sqrt() / bc2_sqrt + float(self.cfg.eps)
            newp = (pt.cast("f32") * decay - step_size * (m1 / denom)).cast(p.dtype)
            if finite is not None:
                newp, m1, v1 = where(finite, newp, pt), where(finite, m1, m.tensor()), where(finite, v1, v.tensor())
            out[graph_name(p)] = newp
            out[graph_name(m)] = m1
            out[graph_name(v)] = v1
        return out, norm
