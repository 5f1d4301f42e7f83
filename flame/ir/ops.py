"""Free functions over Tensors (the ones that are not methods): where, matmul, conv, gather,
concat, random draws, constants."""
from __future__ import annotations

import numpy as np

from . import dtypes as dt
from .errors import ShapeError
from .tensor import Tensor
from .tracer import bind, current, user_location


def const(value, dtype=None) -> Tensor:
    return Tensor.const(value, dtype)


def full(shape, value, dtype="f32") -> Tensor:
    d = dt.as_dtype(dtype)
    return Tensor.const(np.asarray(value, d.np)).expand(tuple(shape))


def zeros(shape, dtype="f32") -> Tensor:
    return full(shape, 0, dtype)


def ones(shape, dtype="f32") -> Tensor:
    return full(shape, 1, dtype)


def where(cond, x, y) -> Tensor:
    """Select x where cond holds, else y. Scalars take the other branch's dtype."""
    if not isinstance(cond, Tensor):
        raise TypeError("where: the condition must be a Tensor")
    if not isinstance(x, Tensor) and not isinstance(y, Tensor):
        raise TypeError("where: at least one branch must be a Tensor")
    ref = x if isinstance(x, Tensor) else y
    x, y = ref._lift(x), ref._lift(y)
    if x.dtype is not y.dtype:
        d = dt.promote(x.dtype, y.dtype)
        x, y = x.cast(d), y.cast(d)
    return bind("where", cond, x, y)


def stop_gradient(x: Tensor) -> Tensor:
    return x.detach()


def matmul_t(x: Tensor, y: Tensor, ta=False, tb=False) -> Tensor:
    """The matmul primitive: op(x) @ op(y), operands of rank >= 2."""
    return bind("matmul", x, y, ta=bool(ta), tb=bool(tb))


def matmul(x: Tensor, y: Tensor) -> Tensor:
    """torch.matmul semantics, 1-D operands included."""
    y = x._lift(y)
    if x.dtype is not y.dtype:
        d = dt.promote(x.dtype, y.dtype)
        x, y = x.cast(d), y.cast(d)
    if x.ndim == 0 or y.ndim == 0:
        raise ShapeError(f"{user_location()}: matmul: both operands need at least one dimension")
    xv = x.unsqueeze(0) if x.ndim == 1 else x
    yv = y.unsqueeze(-1) if y.ndim == 1 else y
    out = matmul_t(xv, yv)
    if x.ndim == 1:
        out = out.squeeze(-2)
    if y.ndim == 1:
        out = out.squeeze(-1)
    return out


def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(i) for i in v)


def conv2d_raw(x, w, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    return bind("conv2d", x, w, stride=_pair(stride), padding=_pair(padding),
                dilation=_pair(dilation), groups=int(groups))


def conv2d_input_grad(gy, w, in_hw, stride, padding, dilation, groups) -> Tensor:
    return bind("conv2d_input_grad", gy, w, in_hw=tuple(in_hw), stride=stride, padding=padding,
                dilation=dilation, groups=groups)


def conv2d_weight_grad(x, gy, kernel, stride, padding, dilation, groups) -> Tensor:
    return bind("conv2d_weight_grad", x, gy, kernel=tuple(kernel), stride=stride, padding=padding,
                dilation=dilation, groups=groups)


def gather(table: Tensor, idx: Tensor) -> Tensor:
    return bind("gather", table, idx)


def scatter_add(src: Tensor, idx: Tensor, rows: int) -> Tensor:
    return bind("scatter_add", src, idx, rows=int(rows))


def concat(xs, dim=0) -> Tensor:
    xs = list(xs)
    if not xs:
        raise ShapeError(f"{user_location()}: concat of no tensors")
    if len(xs) == 1:
        return xs[0]
    d = xs[0].dtype
    for x in xs[1:]:
        d = dt.promote(d, x.dtype)
    xs = [x.cast(d) for x in xs]
    return bind("concat", *xs, axis=dim % xs[0].ndim)


cat = concat


def stack(xs, dim=0) -> Tensor:
    xs = list(xs)
    return concat([x.unsqueeze(dim) for x in xs], dim)


def upsample_nearest(x: Tensor, scale) -> Tensor:
    return bind("upsample_nearest", x, scale=_pair(scale))


def _seed(seed):
    ctx = current()
    if seed is None:
        s = Tensor(ctx.seed_node())
    elif isinstance(seed, Tensor):
        s = seed
    else:
        s = Tensor.const(np.asarray(int(seed), np.int64))
    stream = ctx.rng_streams
    ctx.rng_streams += 1
    return s, stream


def rand_uniform(shape, dtype="f32", seed=None) -> Tensor:
    """Uniform [0, 1). seed: None (the graph's rng_seed input), an int, or a 0-d int Tensor."""
    s, stream = _seed(seed)
    return bind("rand_uniform", s, shape=tuple(int(i) for i in shape), dtype=dt.as_dtype(dtype), stream=stream)


def rand_normal(shape, dtype="f32", seed=None) -> Tensor:
    s, stream = _seed(seed)
    return bind("rand_normal", s, shape=tuple(int(i) for i in shape), dtype=dt.as_dtype(dtype), stream=stream)
