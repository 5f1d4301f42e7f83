"""The torch-like Tensor users write model code with. Each method binds primitives."""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import dtypes as dt
from .errors import ShapeError
from .primitives import norm_axes
from .tracer import bind, user_location


def _scalar_dtype(value, like: dt.DType) -> dt.DType:
    if isinstance(value, bool):
        return dt.boolean if like is dt.boolean else like
    if isinstance(value, numbers.Integral):
        return like
    return like if like.is_float else dt.f32


class Tensor:
    __array_ufunc__ = None  # numpy scalars defer to our operators

    def __init__(self, node):
        self.node = node
        self.name_hint = None

    # ---- basic facts
    shape = property(lambda self: self.node.shape)
    dtype = property(lambda self: self.node.dtype)
    ndim = property(lambda self: self.node.ndim)

    def dim(self):
        return self.ndim

    def size(self, d=None):
        return self.shape if d is None else self.shape[d]

    def numel(self):
        return self.node.size

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"Tensor({self.node.type_str}, %{self.node.id} {self.node.op})"

    def __bool__(self):
        raise TypeError(f"{user_location()}: the truth value of a traced Tensor is not known "
                        "while tracing; use flame.where instead of if/else on tensor values")

    # ---- constants and conversion
    @staticmethod
    def const(value, dtype=None) -> "Tensor":
        arr = np.asarray(value)
        d = dt.as_dtype(dtype) if dtype is not None else dt.as_dtype(arr.dtype)
        arr = np.array(arr, dtype=d.np, order="C")
        arr.flags.writeable = False
        return bind("const", value=arr, dtype=d)

    def _lift(self, other) -> "Tensor":
        if isinstance(other, Tensor):
            return other
        if getattr(other, "_flame_param", False):
            return other.tensor()
        if isinstance(other, np.ndarray):
            return Tensor.const(other)
        return Tensor.const(other, _scalar_dtype(other, self.dtype))

    def cast(self, dtype) -> "Tensor":
        d = dt.as_dtype(dtype)
        return self if d is self.dtype else bind("cast", self, dtype=d)

    to = type_as = None  # set below

    def float(self):
        return self.cast(dt.f32)

    def half(self):
        return self.cast(dt.f16)

    def bfloat16(self):
        return self.cast(dt.bf16)

    def detach(self):
        return bind("stop_gradient", self)

    def contiguous(self):
        return self

    # ---- binary arithmetic with promotion
    def _binary(self, op, other, reverse=False):
        other = self._lift(other)
        a, b = (other, self) if reverse else (self, other)
        if a.dtype is not b.dtype:
            d = dt.promote(a.dtype, b.dtype)
            a, b = a.cast(d), b.cast(d)
        return bind(op, a, b)

    def _arith(self, op, other, reverse=False):
        if isinstance(other, float) and not self.dtype.is_float:
            return self.cast(dt.f32)._binary(op, other, reverse)
        return self._binary(op, other, reverse)

    __add__ = lambda s, o: s._arith("add", o)
    __radd__ = lambda s, o: s._arith("add", o, True)
    __sub__ = lambda s, o: s._arith("sub", o)
    __rsub__ = lambda s, o: s._arith("sub", o, True)
    __mul__ = lambda s, o: s._arith("mul", o)
    __rmul__ = lambda s, o: s._arith("mul", o, True)
    __truediv__ = lambda s, o: (s if s.dtype.is_float else s.float())._arith("div", o)
    __rtruediv__ = lambda s, o: (s if s.dtype.is_float else s.float())._arith("div", o, True)
    __pow__ = lambda s, o: s._arith("pow", o)
    __rpow__ = lambda s, o: s._arith("pow", o, True)
    __neg__ = lambda s: bind("neg", s)
    __pos__ = lambda s: s
    __abs__ = lambda s: bind("abs", s)
    __matmul__ = lambda s, o: s.matmul(o)
    __rmatmul__ = lambda s, o: s._lift(o).matmul(s)
    __eq__ = lambda s, o: s._arith("eq", o)
    __ne__ = lambda s, o: s._arith("ne", o)
    __lt__ = lambda s, o: s._arith("lt", o)
    __le__ = lambda s, o: s._arith("le", o)
    __gt__ = lambda s, o: s._arith("gt", o)
    __ge__ = lambda s, o: s._arith("ge", o)
    __and__ = lambda s, o: s._binary("logical_and", o)
    __invert__ = lambda s: bind("logical_not", s)
    __hash__ = object.__hash__

    def safe_mul(self, other):
        return self._arith("safe_mul", other)

    def maximum(self, other):
        return self._arith("maximum", other)

    def minimum(self, other):
        return self._arith("minimum", other)

    def pow(self, other):
        return self ** other

    def clamp(self, min=None, max=None):
        out = self
        if min is not None:
            out = out.maximum(min)
        if max is not None:
            out = out.minimum(max)
        return out

    # ---- unary: neg exp log sqrt rsqrt sin cos tanh erf abs sign reciprocal sigmoid (below)

    # ---- reductions
    def _axes(self, dim):
        return norm_axes(dim, self.ndim)

    def sum(self, dim=None, keepdim=False, *, keepdims=None):
        keep = keepdim if keepdims is None else keepdims
        return bind("sum", self, axes=self._axes(dim), keepdims=bool(keep))

    def amax(self, dim=None, keepdim=False, *, keepdims=None):
        keep = keepdim if keepdims is None else keepdims
        return bind("max", self, axes=self._axes(dim), keepdims=bool(keep))

    max = amax

    def amin(self, dim=None, keepdim=False):
        return -((-self).amax(dim, keepdim))

    min = amin

    def mean(self, dim=None, keepdim=False, *, keepdims=None):
        axes = self._axes(dim)
        n = math.prod(self.shape[a] for a in axes)
        return self.sum(axes, keepdim, keepdims=keepdims) * (1.0 / n)

    def var(self, dim=None, keepdim=False, unbiased=True, *, correction=None):
        axes = self._axes(dim)
        n = math.prod(self.shape[a] for a in axes)
        corr = (1 if unbiased else 0) if correction is None else correction
        d = self - self.mean(axes, keepdim=True)
        return (d * d).sum(axes, keepdim) * (1.0 / max(n - corr, 1))

    def softmax(self, dim=-1):
        m = self.amax(dim, keepdim=True).detach()
        e = (self - m).exp()
        return e / e.sum(dim, keepdim=True)

    def log_softmax(self, dim=-1):
        z = self - self.amax(dim, keepdim=True).detach()
        return z - z.exp().sum(dim, keepdim=True).log()

    # ---- movement
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = [int(s) for s in shape]
        if shape.count(-1) > 1:
            raise ShapeError(f"{user_location()}: reshape: only one dimension can be -1, got {shape}")
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if known == 0 or self.node.size % known:
                raise ShapeError(f"{user_location()}: reshape: cannot reshape {self.node.type_str} to {shape}")
            shape[shape.index(-1)] = self.node.size // known
        shape = tuple(shape)
        return self if shape == self.shape else bind("reshape", self, shape=shape)

    view = reshape

    def flatten(self, start_dim=0, end_dim=-1):
        if self.ndim == 0:
            return self.reshape(1)
        s, e = start_dim % self.ndim, end_dim % self.ndim
        return self.reshape(self.shape[:s] + (math.prod(self.shape[s:e + 1]),) + self.shape[e + 1:])

    def unsqueeze(self, dim):
        d = dim % (self.ndim + 1)
        return self.reshape(self.shape[:d] + (1,) + self.shape[d:])

    def squeeze(self, dim=None):
        if dim is None:
            return self.reshape(tuple(s for s in self.shape if s != 1))
        d = dim % self.ndim
        return self.reshape(self.shape[:d] + self.shape[d + 1:]) if self.shape[d] == 1 else self

    def permute(self, *perm):
        if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
            perm = tuple(perm[0])
        perm = tuple(p % self.ndim for p in perm) if self.ndim else tuple(perm)
        return self if perm == tuple(range(self.ndim)) else bind("permute", self, perm=perm)

    def transpose(self, d0, d1):
        perm = list(range(self.ndim))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.permute(perm)

    @property
    def mT(self):
        return self.transpose(-2, -1)

    @property
    def T(self):
        return self.permute(tuple(reversed(range(self.ndim))))

    def expand(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        lead = len(shape) - self.ndim
        shape = tuple(self.shape[i - lead] if s == -1 else int(s) for i, s in enumerate(shape))
        return self if shape == self.shape else bind("expand", self, shape=shape)

    broadcast_to = expand

    def expand_as(self, other):
        return self.expand(other.shape)

    def slice_general(self, starts, stops, steps):
        if tuple(starts) == (0,) * self.ndim and tuple(stops) == self.shape and set(steps) <= {1}:
            return self
        return bind("slice", self, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))

    def pad_general(self, pads, value=0.0):
        if all(p == (0, 0, 0) for p in pads):
            return self
        return bind("pad", self, pads=tuple(tuple(p) for p in pads), value=value)

    def narrow(self, dim, start, length):
        d = dim % self.ndim
        starts = [0] * self.ndim
        stops = list(self.shape)
        starts[d], stops[d] = start, start + length
        return self.slice_general(starts, stops, [1] * self.ndim)

    def chunk(self, chunks, dim=0):
        d = dim % self.ndim
        size = -(-self.shape[d] // chunks)
        return self.split(size, d)

    def split(self, size, dim=0):
        d = dim % self.ndim
        n = self.shape[d]
        sizes = [size] * (n // size) + ([n % size] if n % size else []) if isinstance(size, int) else list(size)
        out, start = [], 0
        for s in sizes:
            out.append(self.narrow(d, start, s))
            start += s
        return tuple(out)

    def __getitem__(self, idx):
        if isinstance(idx, Tensor):
            from . import ops
            return ops.gather(self, idx)
        if not isinstance(idx, tuple):
            idx = (idx,)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (self.ndim - n_real) + idx[k + 1:]
        idx = idx + (slice(None),) * (self.ndim - sum(1 for i in idx if i is not None))
        starts, stops, steps, out_shape, axis = [], [], [], [], 0
        for i in idx:
            if i is None:
                out_shape.append(1)
                continue
            n = self.shape[axis]
            if isinstance(i, slice):
                b, e, s = i.indices(n)
                if s < 1:
                    raise ShapeError(f"{user_location()}: negative slice steps are not supported")
                e = max(e, b)
                starts.append(b); stops.append(e); steps.append(s)
                out_shape.append(max(0, -(-(e - b) // s)))
            elif isinstance(i, numbers.Integral):
                j = int(i) + (n if i < 0 else 0)
                if not 0 <= j < n:
                    raise ShapeError(f"{user_location()}: index {i} is out of range for axis {axis} of {self.node.type_str}")
                starts.append(j); stops.append(j + 1); steps.append(1)
            else:
                raise TypeError(f"{user_location()}: unsupported index {i!r}")
            axis += 1
        return self.slice_general(starts, stops, steps).reshape(tuple(out_shape))

    # ---- matrix
    def matmul(self, other):
        from . import ops
        return ops.matmul(self, other)


def _unary(op):
    return lambda self: bind(op, self)


for _op in ("neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "erf", "abs", "sign",
            "reciprocal", "sigmoid"):
    setattr(Tensor, _op, _unary(_op))

Tensor.to = lambda self, dtype: self.cast(dtype)
Tensor.type_as = lambda self, other: self.cast(other.dtype)
