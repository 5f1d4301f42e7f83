"""Module and Parameter: torch-shaped containers of weights whose calls trace into scopes."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..ir import dtypes as dt
from ..ir import tracer
from ..ir.errors import FlameError
from ..ir.tensor import Tensor
from . import init


class StateDictError(FlameError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class Parameter:
    """A named weight. Holds a numpy array; inside a trace it is a graph input (`@p`)."""

    _flame_param = True

    def __init__(self, data, requires_grad: bool = True, dtype=None):
        arr = np.asarray(data)
        self.requires_grad = requires_grad
        if init.shape_only_active():   # no memory: a zero-strided view (see init.shape_only)
            d = dt.as_dtype(dtype).np if dtype is not None else (np.float32 if arr.dtype == np.float64 else arr.dtype)
            self.data = np.broadcast_to(np.zeros((), d), arr.shape)
            return
        if dtype is not None:
            arr = arr.astype(dt.as_dtype(dtype).np)
        elif arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.data = np.array(arr, order="C")
        self.requires_grad = requires_grad

    @property
    def data(self) -> np.ndarray:
        """The host array. If a compiled step updated this parameter on the GPU, the newest
        values are downloaded on first access."""
        owner = self.__dict__.get("_device_owner")
        if owner is not None:
            self.__dict__["_data"] = owner.download_param(self)
            self.__dict__["_device_owner"] = None
        return self.__dict__["_data"]

    @data.setter
    def data(self, value):
        self.__dict__["_data"] = value
        self.__dict__["version"] = self.__dict__.get("version", 0) + 1   # runners re-upload on change
        self.__dict__["_device_owner"] = None

    shape = property(lambda self: self.__dict__["_data"].shape)
    dtype = property(lambda self: dt.as_dtype(self.__dict__["_data"].dtype))
    ndim = property(lambda self: self.__dict__["_data"].ndim)

    def tensor(self) -> Tensor:
        """The parameter in the graph being traced. With `compute_dtype` set (see
        store_frozen_as) it is stored in its own dtype and cast at each use."""
        t = Tensor(tracer.current().param_node(self))
        cd = self.__dict__.get("compute_dtype")
        return t if cd is None else t.cast(cd)

    def numpy(self) -> np.ndarray:
        return self.data

    def __repr__(self):
        return f"Parameter({self.dtype.name}[{','.join(map(str, self.shape))}])"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.tensor(), name)

    def __bool__(self):
        return True

    __hash__ = object.__hash__


def _delegate(name):
    def method(self, *args):
        return getattr(self.tensor(), name)(*args)
    method.__name__ = name
    return method


for _n in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow", "rpow",
           "matmul", "rmatmul", "neg", "pos", "abs", "getitem", "lt", "le", "gt", "ge"):
    setattr(Parameter, f"__{_n}__", _delegate(f"__{_n}__"))


def as_tensor(x):
    """Tensor for a Tensor, a Parameter (its graph input) or a numpy array (a constant)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Parameter):
        return x.tensor()
    if x is None:
        return None
    return Tensor.const(np.asarray(x))


class Module:
    """Like torch.nn.Module: attributes that are Parameters or Modules are registered in
    order; calling a module traces its forward inside the module's scope."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_name", "")
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning {name!r}")
        for d in (self._parameters, self._modules, self._buffers):
            d.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            object.__setattr__(value, "_name", name)
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        for key in ("_parameters", "_modules", "_buffers"):
            if key in d and name in d[key]:
                return d[key][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def register_buffer(self, name, value, persistent=True):
        """A non-trained array (traced as a constant); in the state dict when persistent."""
        self._buffers[name] = (np.asarray(value), persistent)

    def buffer(self, name) -> Tensor:
        return Tensor.const(self._buffers[name][0])

    # ---- traversal
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def children(self):
        return list(self._modules.values())

    def named_parameters(self, prefix="", recurse=True):
        seen = set()
        for mp, m in (self.named_modules(prefix) if recurse else [(prefix, self)]):
            for n, p in m._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mp}.{n}" if mp else n), p

    def parameters(self, recurse=True):
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def store_frozen_as(self, dtype, compute_dtype="f32") -> int:
        """Store every frozen (requires_grad=False) floating-point parameter in `dtype` (bf16
        halves a base model's memory and upload), cast to `compute_dtype` where it is used, so
        the arithmetic stays float32. Trainable parameters are untouched. Returns how many
        parameters changed."""
        d, cd = dt.as_dtype(dtype), dt.as_dtype(compute_dtype)
        n = 0
        for p in self.parameters():
            if p.requires_grad or not p.dtype.is_float:
                continue
            if p.dtype is not d:
                a = p.data
                if a.size > 1 and not any(a.strides):   # a shape_only() placeholder: stays one zero
                    p.data = np.broadcast_to(np.zeros((), d.np), a.shape)
                else:
                    p.data = np.asarray(a, np.float32).astype(d.np)
                n += 1
            p.__dict__["compute_dtype"] = None if d is cd else cd
        return n

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters())

    # ---- state
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        out = OrderedDict()
        for mp, m in self.named_modules():
            for n, p in m._parameters.items():
                out[f"{mp}.{n}" if mp else n] = p.data
            for n, (v, persistent) in m._buffers.items():
                if persistent:
                    out[f"{mp}.{n}" if mp else n] = v
        return out

    def load_state_dict(self, state_dict, strict: bool = True, source: str = ""):
        """Copy arrays in by name, cast to each parameter's dtype. Mis-shaped keys are always
        an error; missing and unexpected keys are an error when strict. Returns
        (missing, unexpected)."""
        targets = {}
        for mp, m in self.named_modules():
            for n in m._parameters:
                targets[f"{mp}.{n}" if mp else n] = (m, n, "param")
            for n, (v, persistent) in m._buffers.items():
                if persistent:
                    targets[f"{mp}.{n}" if mp else n] = (m, n, "buffer")
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        misshaped = []
        for k, (m, n, kind) in targets.items():
            if k in state_dict:
                want = m._parameters[n].shape if kind == "param" else m._buffers[n][0].shape
                got = tuple(np.shape(state_dict[k]))
                if got != tuple(want):
                    misshaped.append((k, tuple(want), got))
        if misshaped or (strict and (missing or unexpected)):
            raise StateDictError(state_dict_report(type(self).__name__, missing, unexpected, misshaped, source))
        for k, (m, n, kind) in targets.items():
            if k in state_dict:
                if kind == "param":
                    p = m._parameters[n]
                    p.data = np.array(state_dict[k], dtype=p.data.dtype, order="C")
                else:
                    v, persistent = m._buffers[n]
                    m._buffers[n] = (np.asarray(state_dict[k]).astype(v.dtype), persistent)
        return missing, unexpected

    # ---- modes and dtype
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, dtype):
        d = dt.as_dtype(dtype)
        for p in self.parameters():
            if p.dtype.is_float:
                p.data = p.data.astype(d.np)
        return self

    def requires_grad_(self, flag: bool = True):
        for p in self.parameters():
            p.requires_grad = flag
        return self

    # ---- calling
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        if not tracer.tracing():
            raise tracer.TraceError(
                f"{type(self).__name__} was called outside a trace: use flame.compile(model, ...) "
                "or flame.trace(model, ...)")
        ctx = tracer.current()
        if not ctx.scope:
            ctx.name_params(self)
            for path, m in self.named_modules():
                ctx.module_paths.setdefault(id(m), path)
        # a child called from its parent's forward (through a ModuleList it iterates, say)
        # gets its whole path below the current scope: blocks.1.norm, not 1.norm
        cur = ".".join(s for s in ctx.scope if s)
        full = ctx.module_paths.get(id(self))
        name = self._name
        if full and (not cur or full.startswith(cur + ".")):
            name = full[len(cur) + 1:] if cur else full
        with tracer.scope(name if ctx.scope else ""):
            return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for n, m in self._modules.items():
            lines.append(f"  ({n}): " + repr(m).replace("\n", "\n  "))
        return lines[0] + (")" if len(lines) == 1 else "\n" + "\n".join(lines[1:]) + "\n)")


def state_dict_report(what, missing, unexpected, misshaped, source="") -> str:
    src = f" from {source}" if source else ""
    lines = [f"cannot load the state dict{src} into {what}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20])
                     + (f", … and {len(missing) - 20} more" if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                     + (f", … and {len(unexpected) - 20} more" if len(unexpected) > 20 else ""))
    for k, want, got in misshaped[:20]:
        lines.append(f"  wrong shape for {k}: model has {list(want)}, the state dict has {list(got)}")
    if len(misshaped) > 20:
        lines.append(f"  … and {len(misshaped) - 20} more wrongly shaped keys")
    return "\n".join(lines)
