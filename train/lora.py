"""LoRA adapters for the SD 1.x UNet and the CLIP text encoder, named as kohya's sd-scripts
(`networks.lora`) names them, so the file train/export.py writes loads in ComfyUI, A1111 and
diffusers.

    y = base(x) + up(down(x)) * (alpha / rank)

down is drawn Kaiming-uniform (torch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))), up
starts at zero, so a fresh adapter changes nothing. LoRA weights are float32; the base weights
are frozen (requires_grad=False) and may be stored in bf16 (`base_dtype`), cast to the
activations' dtype in the forward.

State-dict names: a LoRA module replaces the wrapped Linear/Conv2d in its parent under the same
attribute name and holds the base `weight`/`bias` Parameters itself, with `lora_down`/`lora_up`
submodules, so the base keys are unchanged (`...attn1.to_q.weight`) and the adapter adds
`...attn1.to_q.lora_down.weight` / `.lora_up.weight`. Load base weights before injecting (or
with strict=False after).

What gets an adapter (kohya's rule, by module class):
  - every Linear and 1x1 Conv2d inside a Transformer2DModel (the spatial transformer): proj_in,
    proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2 -- rank, alpha;
  - LoCon (conv_rank > 0) adds ResnetBlock2D, Downsample2D and Upsample2D: their 3x3 convs
    (conv1, conv2, the samplers' conv) get conv_rank/conv_alpha, and, as in kohya, their
    Linear and 1x1 convs (time_emb_proj, conv_shortcut) get rank/alpha;
  - text encoder: CLIPAttention (q/k/v/out_proj) and CLIPMLP (fc1, fc2) of every layer.
Names: `lora_unet_` / `lora_te_` + the module path with `.` replaced by `_`.
"""
from __future__ import annotations

import math

import numpy as np

import flame.nn as nn
import flame.nn.functional as F
from flame.ir import dtypes as dt
from flame.ir.errors import FlameError
from flame.nn import init
from flame.nn.module import Parameter

UNET_PREFIX, TE_PREFIX = "lora_unet", "lora_te"
DEFAULT_TARGETS = ("Transformer2DModel",)
CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPMLP")


class LoRAError(FlameError, ValueError):
    pass


def kaiming_uniform(shape, fan_in) -> Parameter:
    """torch.nn.init.kaiming_uniform_(w, a=sqrt(5)): gain sqrt(2/(1+5)), bound gain*sqrt(3/fan_in)
    = 1/sqrt(fan_in). Drawn from flame.nn.init's generator (flame.manual_seed)."""
    if init.shape_only_active():
        return Parameter(np.broadcast_to(np.float32(0), shape), dtype="f32")
    bound = 1.0 / math.sqrt(fan_in)
    return Parameter(init.rng().uniform(-bound, bound, size=shape).astype(np.float32))


def _freeze(p: Parameter | None, base_dtype):
    if p is None:
        return None
    p.requires_grad = False
    if base_dtype is not None and p.dtype.is_float and p.dtype is not dt.as_dtype(base_dtype):
        p.data = p.data.astype(dt.as_dtype(base_dtype).np)
    return p


def _check(rank, alpha, what):
    if not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"{what}: LoRA rank must be a positive integer, got {rank!r}")
    if alpha is None:   # kohya: no alpha means alpha = rank (scale 1)
        alpha = rank
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"{what}: LoRA alpha must be a positive number, got {alpha!r}")
    return float(alpha)


class LoRABase(nn.Module):
    """Shared bookkeeping: rank, alpha (a Python float baked into traced graphs: change it before
    compiling), scale, and the two trainable weights."""
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lora_parameters(self) -> dict:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}


class LoRALinear(LoRABase):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, base_dtype=None):
        super().__init__()
        self.alpha = _check(rank, alpha, f"LoRALinear({base.in_features}, {base.out_features})")
        self.rank, self.in_features, self.out_features = rank, base.in_features, base.out_features
        self.weight = _freeze(base.weight, base_dtype)
        self.bias = _freeze(base.bias, base_dtype)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        self.lora_down.weight = kaiming_uniform((rank, base.in_features), base.in_features)
        self.lora_up.weight = Parameter(np.zeros((base.out_features, rank), np.float32))

    def forward(self, x):
        cd = x.dtype   # compute in the activations' dtype; bf16-stored weights are cast up
        b = None if self.bias is None else self.bias.cast(cd)
        y = F.linear(x, self.weight.cast(cd), b)
        d = F.linear(x, self.lora_down.weight.cast(cd))
        return y + F.linear(d, self.lora_up.weight.cast(cd)) * self.scale

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


class LoRAConv2d(LoRABase):
    """down: a conv with the base's kernel, stride and padding, [r, in, kh, kw]; up: 1x1,
    [out, r, 1, 1] (kohya's and PEFT's layout)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None, base_dtype=None):
        super().__init__()
        what = f"LoRAConv2d({base.in_channels}, {base.out_channels}, kernel_size={base.kernel_size})"
        self.alpha = _check(rank, alpha, what)
        if base.groups != 1 or base.dilation not in (1, (1, 1)):
            raise LoRAError(f"{what}: LoRA on grouped or dilated convolutions is not built")
        self.rank = rank
        self.in_channels, self.out_channels, self.kernel_size = base.in_channels, base.out_channels, base.kernel_size
        self.stride, self.padding = base.stride, base.padding
        self.weight = _freeze(base.weight, base_dtype)
        self.bias = _freeze(base.bias, base_dtype)
        kh, kw = base.kernel_size
        self.lora_down = nn.Conv2d(base.in_channels, rank, (kh, kw), base.stride, base.padding, bias=False)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.lora_down.weight = kaiming_uniform((rank, base.in_channels, kh, kw), base.in_channels * kh * kw)
        self.lora_up.weight = Parameter(np.zeros((base.out_channels, rank, 1, 1), np.float32))

    def forward(self, x):
        cd = x.dtype
        b = None if self.bias is None else self.bias.cast(cd)
        y = F.conv2d(x, self.weight.cast(cd), b, self.stride, self.padding)
        d = F.conv2d(x, self.lora_down.weight.cast(cd), None, self.stride, self.padding)
        return y + F.conv2d(d, self.lora_up.weight.cast(cd)) * self.scale

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}, alpha={self.alpha:g}")


LORA_TYPES = (LoRALinear, LoRAConv2d)


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _replace(model: nn.Module, path: str, new: nn.Module):
    """Swap the submodule at `path` in place: same attribute name, same position among its
    siblings (a ModuleList's forward iterates in order: to_out is [Linear, Dropout])."""
    parent_path, _, name = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path] if parent_path else model
    if name not in parent._modules:
        raise LoRAError(f"{path}: no such submodule to replace")
    object.__setattr__(new, "_name", name)
    parent._modules[name] = new


def _plan(model, prefix, targets, rank, alpha, conv_rank, conv_alpha):
    """(path, kind, rank, alpha) for every Linear/Conv2d inside a module of a target class."""
    if any(isinstance(m, LORA_TYPES) for m in model.modules()):
        raise LoRAError(f"{type(model).__name__} already has LoRA modules: inject once, on the base model")
    plan, seen = [], set()
    for path, m in model.named_modules():
        if type(m).__name__ not in targets:
            continue
        for sub, child in m.named_modules(path):
            if sub in seen:
                continue
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)):
                plan.append((sub, child, rank, alpha))
            elif isinstance(child, nn.Conv2d) and conv_rank:
                plan.append((sub, child, conv_rank, conv_alpha))
            else:
                continue
            seen.add(sub)
    if not plan:
        raise LoRAError(f"{type(model).__name__}: no module of the classes {', '.join(targets)} "
                        f"holds a Linear or Conv2d: nothing to adapt")
    return plan


def _inject(model, prefix, targets, rank, alpha, conv_rank, conv_alpha, base_dtype):
    alpha = _check(rank, alpha, f"{prefix}")
    if conv_rank:
        # kohya's default conv_alpha (networks/lora.py create_network) is 1, not conv_rank
        conv_alpha = _check(conv_rank, 1.0 if conv_alpha is None else conv_alpha, f"{prefix} conv")
    plan = _plan(model, prefix, targets, rank, alpha, conv_rank, conv_alpha)
    for p in model.parameters():   # the whole base model is frozen, not only the wrapped layers
        p.requires_grad = False
    out = {}
    for path, child, r, a in plan:
        cls = LoRALinear if isinstance(child, nn.Linear) else LoRAConv2d
        lora = cls(child, r, a, base_dtype)
        _replace(model, path, lora)
        out[kohya_name(prefix, path)] = lora
    return out


def inject_lora(unet, rank: int, alpha: float | None = None, conv_rank: int = 0, conv_alpha=None,
                targets=DEFAULT_TARGETS, base_dtype=None) -> dict:
    """Wrap the UNet's target layers in place (see the module docstring); freezes every base
    parameter. Returns {kohya name: LoRA module} in model order."""
    if not isinstance(conv_rank, int) or conv_rank < 0:
        raise LoRAError(f"conv_rank must be a non-negative integer (0 = no conv LoRA), got {conv_rank!r}")
    targets = tuple(targets) + (CONV_TARGETS if conv_rank else ())
    return _inject(unet, UNET_PREFIX, targets, rank, alpha, conv_rank, conv_alpha, base_dtype)


def inject_lora_text_encoder(te, rank: int, alpha: float | None = None, base_dtype=None) -> dict:
    """q/k/v/out_proj and fc1/fc2 of every CLIP encoder layer, named
    lora_te_text_model_encoder_layers_<i>_self_attn_q_proj, ..._mlp_fc1, ..."""
    return _inject(te, TE_PREFIX, TE_TARGETS, rank, alpha, 0, None, base_dtype)


def lora_modules(model, prefix: str) -> dict:
    """{kohya name: LoRA module} of a model injected earlier (for loading and saving)."""
    return {kohya_name(prefix, p): m for p, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def lora_parameters(modules: dict) -> dict:
    """{"<kohya name>.lora_down.weight": Parameter, ...}: the trainable set, named as in the file
    (pass to flame.value_and_grad(params=...))."""
    return {f"{n}.{k}": p for n, m in modules.items() for k, p in m.lora_parameters().items()}
