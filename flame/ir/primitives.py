"""The table of primitives: for each op, side by side, its shape/dtype rule, its numpy
reference implementation and its VJP rule.

- `shape(a, *xs) -> (shape, dtype)` gets the attrs dict and the input nodes.
- `impl(a, *arrays) -> array` is the numpy reference; the interpreter casts the result to
  the node's dtype (and runs f16/bf16 in float32, as the kernels do).
- `vjp` holds one rule per input, `rule(g, *xs, o, a) -> Tensor | None`, written with the
  ordinary Tensor API so a rule reads like the math; None means "no gradient flows here".
  Broadcast inputs need no care: autodiff sums a cotangent back to its input's shape in one
  place (`unbroadcast`). Variadic ops give a single rule taking the input index first.

Adding an op touches this file only (plus a Tensor method or functional wrapper if users
should reach it by name).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import dtypes as dt
from . import rng
from .errors import ShapeError


@dataclass
class Primitive:
    name: str
    shape: object
    impl: object
    vjp: object = ()               # tuple of per-input rules, or one rule for variadic ops
    inputs: tuple = ("x",)          # input names, used to tag backward nodes: [matmul.rhs]
    variadic: bool = False
    kind: str = "elementwise"       # elementwise | reduce | movement | matmul | conv | gather | random | other
    doc: str = ""

    def rule_name(self, i: int) -> str:
        if self.variadic:
            return f"{self.name}.{i}"
        return f"{self.name}.{self.inputs[i]}"


PRIMS: dict[str, Primitive] = {}


def prim(name, shape, impl, vjp=(), **kw):
    PRIMS[name] = Primitive(name, shape, impl, vjp, **kw)


# ---------------------------------------------------------------- shape helpers

def fmt(x) -> str:
    return f"{x.dtype.name}[{','.join(map(str, x.shape))}]"


def broadcast_shapes(*xs) -> tuple:
    nd = max(len(x.shape) for x in xs)
    out = []
    for d in range(nd):
        size = 1
        for x in xs:
            k = d - (nd - len(x.shape))
            s = x.shape[k] if k >= 0 else 1
            if s != 1:
                if size not in (1, s):
                    raise ShapeError("cannot broadcast " + " with ".join(fmt(x) for x in xs))
                size = s
        out.append(size)
    return tuple(out)


def norm_axes(axes, ndim) -> tuple:
    if axes is None:
        return tuple(range(ndim))
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ShapeError(f"axis {a} is out of range for a tensor of rank {ndim}")
        out.append(a % ndim if ndim else 0)
    return tuple(sorted(set(out)))


def _float_only(x, op):
    if not x.dtype.is_float:
        raise ShapeError(f"{op} needs a floating-point input, got {fmt(x)}")


def same(a, x):
    return x.shape, x.dtype


def same_float(op):
    def rule(a, x):
        _float_only(x, op)
        return x.shape, x.dtype
    return rule


def binary_rule(op, out_dtype=None):
    def rule(a, x, y):
        shape = broadcast_shapes(x, y)
        if x.dtype is not y.dtype:
            raise ShapeError(f"{op} of {fmt(x)} and {fmt(y)}: dtypes differ (cast one first)")
        return shape, out_dtype or x.dtype
    return rule


# ---------------------------------------------------------------- unary

def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


SQRT_2_OVER_PI = 2.0 / math.sqrt(math.pi)

prim("neg", same, lambda a, x: -x,
     vjp=(lambda g, x, o, a: -g,))
prim("exp", same_float("exp"), lambda a, x: np.exp(x),
     vjp=(lambda g, x, o, a: g * o,))
prim("log", same_float("log"), lambda a, x: np.log(x),
     vjp=(lambda g, x, o, a: g.safe_mul(x.reciprocal()),))
prim("sqrt", same_float("sqrt"), lambda a, x: np.sqrt(x),
     vjp=(lambda g, x, o, a: g.safe_mul(0.5 * o.reciprocal()),))
prim("rsqrt", same_float("rsqrt"), lambda a, x: 1.0 / np.sqrt(x),
     vjp=(lambda g, x, o, a: g.safe_mul(-0.5 * o * o * o),))
prim("sin", same_float("sin"), lambda a, x: np.sin(x),
     vjp=(lambda g, x, o, a: g * x.cos(),))
prim("cos", same_float("cos"), lambda a, x: np.cos(x),
     vjp=(lambda g, x, o, a: -(g * x.sin()),))
prim("tanh", same_float("tanh"), lambda a, x: np.tanh(x),
     vjp=(lambda g, x, o, a: g * (1.0 - o * o),))
prim("erf", same_float("erf"), lambda a, x: _erf(x),
     vjp=(lambda g, x, o, a: g * (SQRT_2_OVER_PI * (-(x * x)).exp()),))
prim("abs", same, lambda a, x: np.abs(x),
     vjp=(lambda g, x, o, a: g * x.sign(),))
prim("sign", same, lambda a, x: np.sign(x),
     vjp=(None,))
prim("reciprocal", same_float("reciprocal"), lambda a, x: 1.0 / x,
     vjp=(lambda g, x, o, a: g.safe_mul(-(o * o)),))
prim("sigmoid", same_float("sigmoid"), lambda a, x: 1.0 / (1.0 + np.exp(-x)),
     vjp=(lambda g, x, o, a: g * (o * (1.0 - o)),))
prim("stop_gradient", same, lambda a, x: x, vjp=(None,),
     doc="identity whose gradient is zero (detach)")

# ---------------------------------------------------------------- binary (numpy broadcasting)

BIN = ("lhs", "rhs")


def _pow_grad_exponent(g, x, y, o, a):
    import flame.ir.ops as ops
    return g.safe_mul(ops.where(x == 0.0, 0.0, o * x.log()))


def _max_grad(g, x, y, o, a):
    import flame.ir.ops as ops
    return ops.where(x > y, g, ops.where(x == y, 0.5 * g, 0.0))


def _max_grad_rhs(g, x, y, o, a):
    import flame.ir.ops as ops
    return ops.where(y > x, g, ops.where(x == y, 0.5 * g, 0.0))


def _min_grad(g, x, y, o, a):
    import flame.ir.ops as ops
    return ops.where(x < y, g, ops.where(x == y, 0.5 * g, 0.0))


def _min_grad_rhs(g, x, y, o, a):
    import flame.ir.ops as ops
    return ops.where(y < x, g, ops.where(x == y, 0.5 * g, 0.0))


prim("add", binary_rule("add"), lambda a, x, y: x + y, inputs=BIN,
     vjp=(lambda g, x, y, o, a: g, lambda g, x, y, o, a: g))
prim("sub", binary_rule("sub"), lambda a, x, y: x - y, inputs=BIN,
     vjp=(lambda g, x, y, o, a: g, lambda g, x, y, o, a: -g))
prim("mul", binary_rule("mul"), lambda a, x, y: x * y, inputs=BIN,
     vjp=(lambda g, x, y, o, a: g * y, lambda g, x, y, o, a: g * x))
prim("div", binary_rule("div"), lambda a, x, y: x / y, inputs=BIN,
     vjp=(lambda g, x, y, o, a: g.safe_mul(y.reciprocal()),
          lambda g, x, y, o, a: g.safe_mul(-(o / y))))
prim("pow", binary_rule("pow"), lambda a, x, y: np.power(x, y), inputs=("base", "exponent"),
     vjp=(lambda g, x, y, o, a: g.safe_mul(y * x ** (y - 1.0)), _pow_grad_exponent))
prim("maximum", binary_rule("maximum"), lambda a, x, y: np.maximum(x, y), inputs=BIN,
     vjp=(_max_grad, _max_grad_rhs), doc="ties split the gradient evenly, like torch")
prim("minimum", binary_rule("minimum"), lambda a, x, y: np.minimum(x, y), inputs=BIN,
     vjp=(_min_grad, _min_grad_rhs))
prim("safe_mul", binary_rule("safe_mul"),
     lambda a, x, y: np.where(x == 0, np.zeros((), x.dtype), x * y), inputs=BIN,
     vjp=(lambda g, x, y, o, a: g.safe_mul(y), lambda g, x, y, o, a: g.safe_mul(x)),
     doc="x * y, but 0 wherever x is 0: a cotangent masked to zero by `where` stays zero "
         "through a derivative that is infinite or NaN in the branch not taken")

for _name, _fn in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                   ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)):
    prim(_name, binary_rule(_name, dt.boolean), (lambda f: lambda a, x, y: f(x, y))(_fn),
         inputs=BIN, vjp=(None, None))

prim("logical_and", binary_rule("logical_and", dt.boolean), lambda a, x, y: x & y,
     inputs=BIN, vjp=(None, None))
prim("logical_not", same, lambda a, x: ~x, vjp=(None,))


def _where_shape(a, c, x, y):
    if c.dtype is not dt.boolean:
        raise ShapeError(f"where needs a bool condition, got {fmt(c)}")
    if x.dtype is not y.dtype:
        raise ShapeError(f"where of {fmt(x)} and {fmt(y)}: dtypes differ")
    return broadcast_shapes(c, x, y), x.dtype


def _where_taken(g, c, x, y, o, a):
    import flame.ir.ops as ops
    return ops.where(c, g, 0.0)


def _where_other(g, c, x, y, o, a):
    import flame.ir.ops as ops
    return ops.where(c, 0.0, g)


prim("where", _where_shape, lambda a, c, x, y: np.where(c, x, y), inputs=("cond", "then", "else"),
     vjp=(None, _where_taken, _where_other))


def _cast_shape(a, x):
    return x.shape, a["dtype"]


def _cast_grad(g, x, o, a):
    return g.cast(x.dtype) if x.dtype.is_float else None


prim("cast", _cast_shape, lambda a, x: x.astype(a["dtype"].np), vjp=(_cast_grad,))

# ---------------------------------------------------------------- reductions


def _reduce_shape(a, x):
    axes = a["axes"]
    if a["keepdims"]:
        return tuple(1 if i in axes else s for i, s in enumerate(x.shape)), x.dtype
    return tuple(s for i, s in enumerate(x.shape) if i not in axes), x.dtype


def _keep(g, x, a):
    """g with the reduced axes put back as size 1, so it broadcasts against x."""
    if a["keepdims"]:
        return g
    return g.reshape(tuple(1 if i in a["axes"] else s for i, s in enumerate(x.shape)))


def _max_reduce_grad(g, x, o, a):
    mask = (x == _keep(o, x, a)).cast(x.dtype)
    count = mask.sum(a["axes"], keepdims=True)
    return _keep(g, x, a) * mask / count


prim("sum", _reduce_shape, lambda a, x: np.sum(x, axis=a["axes"], keepdims=a["keepdims"]),
     vjp=(lambda g, x, o, a: _keep(g, x, a).expand(x.shape),), kind="reduce")
prim("max", _reduce_shape, lambda a, x: np.max(x, axis=a["axes"], keepdims=a["keepdims"]),
     vjp=(_max_reduce_grad,), kind="reduce", doc="ties share the gradient evenly, like torch.amax")

# ---------------------------------------------------------------- movement


def _reshape_shape(a, x):
    shape = a["shape"]
    if math.prod(shape) != math.prod(x.shape):
        raise ShapeError(f"cannot reshape {fmt(x)} to [{','.join(map(str, shape))}]")
    return shape, x.dtype


def _permute_shape(a, x):
    perm = a["perm"]
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"permute({list(perm)}) is not a permutation of the {x.ndim} axes of {fmt(x)}")
    return tuple(x.shape[p] for p in perm), x.dtype


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _expand_shape(a, x):
    shape = a["shape"]
    if len(shape) < x.ndim:
        raise ShapeError(f"cannot expand {fmt(x)} to fewer dims [{','.join(map(str, shape))}]")
    for s, t in zip(x.shape[::-1], shape[::-1]):
        if s != 1 and s != t:
            raise ShapeError(f"cannot expand {fmt(x)} to [{','.join(map(str, shape))}]")
    return shape, x.dtype


def _expand_grad(g, x, o, a):
    from .autodiff import unbroadcast
    return unbroadcast(g, x.shape)


def slice_len(start, stop, step):
    return max(0, -(-(stop - start) // step))


def _slice_shape(a, x):
    if len(a["starts"]) != x.ndim:
        raise ShapeError(f"slice of {fmt(x)} needs {x.ndim} (start, stop, step) triples")
    out = []
    for s, (b, e, st) in enumerate(zip(a["starts"], a["stops"], a["steps"])):
        if st < 1 or not 0 <= b <= x.shape[s] or not b <= e <= x.shape[s]:
            raise ShapeError(f"slice {b}:{e}:{st} is out of range for axis {s} of {fmt(x)}")
        out.append(slice_len(b, e, st))
    return tuple(out), x.dtype


def _slice_impl(a, x):
    return x[tuple(slice(b, e, s) for b, e, s in zip(a["starts"], a["stops"], a["steps"]))]


def _slice_grad(g, x, o, a):
    pads = []
    for n, (b, e, st), m in zip(x.shape, zip(a["starts"], a["stops"], a["steps"]), o.shape):
        last = b + (m - 1) * st if m else b - 1
        pads.append((b, n - last - 1, st - 1) if m else (0, n, 0))
    return g.pad_general(tuple(pads), 0.0)


def _pad_shape(a, x):
    if len(a["pads"]) != x.ndim:
        raise ShapeError(f"pad of {fmt(x)} needs {x.ndim} (lo, hi, interior) triples")
    out = []
    for s, (lo, hi, it) in zip(x.shape, a["pads"]):
        if lo < 0 or hi < 0 or it < 0:
            raise ShapeError(f"pad widths must be >= 0 (slice instead), got {a['pads']}")
        out.append(lo + hi + s + max(s - 1, 0) * it)
    return tuple(out), x.dtype


def _pad_impl(a, x):
    shape, _ = _pad_shape(a, x)
    out = np.full(shape, a["value"], dtype=x.dtype)
    out[tuple(slice(lo, lo + (s - 1) * (it + 1) + 1 if s else lo, it + 1)
              for s, (lo, hi, it) in zip(x.shape, a["pads"]))] = x
    return out


def _pad_grad(g, x, o, a):
    return g.slice_general(tuple(lo for lo, hi, it in a["pads"]),
                           tuple(lo + (s - 1) * (it + 1) + 1 if s else lo
                                 for s, (lo, hi, it) in zip(x.shape, a["pads"])),
                           tuple(it + 1 for lo, hi, it in a["pads"]))


def _concat_shape(a, *xs):
    ax = a["axis"]
    first = xs[0]
    for x in xs[1:]:
        if x.ndim != first.ndim or x.dtype is not first.dtype or any(
                s != t for i, (s, t) in enumerate(zip(x.shape, first.shape)) if i != ax):
            raise ShapeError(f"cannot concat {' and '.join(fmt(x) for x in xs)} along axis {ax}")
    shape = list(first.shape)
    shape[ax] = sum(x.shape[ax] for x in xs)
    return tuple(shape), first.dtype


def _concat_grad(i, g, *xs_o_a):
    *xs, o, a = xs_o_a
    ax = a["axis"]
    start = sum(x.shape[ax] for x in xs[:i])
    starts = tuple(start if d == ax else 0 for d in range(o.ndim))
    stops = tuple(start + xs[i].shape[ax] if d == ax else o.shape[d] for d in range(o.ndim))
    return g.slice_general(starts, stops, (1,) * o.ndim)


prim("reshape", _reshape_shape, lambda a, x: x.reshape(a["shape"]),
     vjp=(lambda g, x, o, a: g.reshape(x.shape),), kind="movement")
prim("permute", _permute_shape, lambda a, x: np.transpose(x, a["perm"]),
     vjp=(lambda g, x, o, a: g.permute(_inverse(a["perm"])),), kind="movement")
prim("expand", _expand_shape, lambda a, x: np.broadcast_to(x, a["shape"]),
     vjp=(_expand_grad,), kind="movement")
prim("slice", _slice_shape, _slice_impl, vjp=(_slice_grad,), kind="movement",
     doc="per axis start:stop:step with step >= 1; its gradient is an interior pad")
prim("pad", _pad_shape, _pad_impl, vjp=(_pad_grad,), kind="movement",
     doc="per axis (lo, hi, interior) with a constant value; its gradient is a strided slice")
prim("concat", _concat_shape, lambda a, *xs: np.concatenate(xs, axis=a["axis"]),
     vjp=_concat_grad, variadic=True, kind="movement")

# ---------------------------------------------------------------- matmul


def _matmul_shape(a, x, y):
    if x.ndim < 2 or y.ndim < 2:
        raise ShapeError(f"matmul needs operands of rank >= 2, got {fmt(x)} and {fmt(y)}")
    if x.dtype is not y.dtype:
        raise ShapeError(f"matmul of {fmt(x)} and {fmt(y)}: dtypes differ")
    m, k = (x.shape[-1], x.shape[-2]) if a["ta"] else x.shape[-2:]
    k2, n = (y.shape[-1], y.shape[-2]) if a["tb"] else y.shape[-2:]
    if k != k2:
        raise ShapeError(f"matmul of {fmt(x)}{'ᵀ' if a['ta'] else ''} and "
                         f"{fmt(y)}{'ᵀ' if a['tb'] else ''}: inner sizes {k} and {k2} differ")

    class B:  # batch parts, for broadcast_shapes
        def __init__(s, t):
            s.shape, s.dtype = t.shape[:-2], t.dtype
    batch = broadcast_shapes(B(x), B(y))
    return batch + (m, n), x.dtype


def _mT(x):
    return np.swapaxes(x, -1, -2)


def _matmul_impl(a, x, y):
    return np.matmul(_mT(x) if a["ta"] else x, _mT(y) if a["tb"] else y)


def _matmul_grad_lhs(g, x, y, o, a):
    import flame.ir.ops as ops
    if not a["ta"]:          # dX = G · op(Y)ᵀ
        return ops.matmul_t(g, y, tb=not a["tb"])
    return ops.matmul_t(y, g, ta=a["tb"], tb=True)    # dX = op(Y) · Gᵀ


def _matmul_grad_rhs(g, x, y, o, a):
    import flame.ir.ops as ops
    if not a["tb"]:          # dY = op(X)ᵀ · G
        return ops.matmul_t(x, g, ta=not a["ta"])
    return ops.matmul_t(g, x, ta=True, tb=a["ta"])    # dY = Gᵀ · op(X)


prim("matmul", _matmul_shape, _matmul_impl, inputs=BIN, kind="matmul",
     vjp=(_matmul_grad_lhs, _matmul_grad_rhs),
     doc="batched op(x)·op(y) with broadcast batch dims; attrs ta/tb transpose the last two axes")

# ---------------------------------------------------------------- conv2d
# attrs: stride (sh, sw), padding (ph, pw), dilation (dh, dw), groups


def conv_out_hw(h, w, kh, kw, a):
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _conv_check(a, x_shape, w_shape, what):
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    g = a["groups"]
    if c % g or o % g or cg != c // g:
        raise ShapeError(f"{what}: input has {c} channels and weight [{o},{cg},{kh},{kw}] "
                         f"with groups={g} needs {cg * g}")
    oh, ow = conv_out_hw(h, w, kh, kw, a)
    if oh < 1 or ow < 1:
        raise ShapeError(f"{what}: kernel {kh}x{kw} does not fit input {h}x{w}")
    return (n, o, oh, ow)


def _conv_shape(a, x, w):
    if x.ndim != 4 or w.ndim != 4:
        raise ShapeError(f"conv2d needs NCHW input and OIHW weight, got {fmt(x)} and {fmt(w)}")
    if x.dtype is not w.dtype:
        raise ShapeError(f"conv2d of {fmt(x)} and {fmt(w)}: dtypes differ")
    return _conv_check(a, x.shape, w.shape, "conv2d"), x.dtype


def _windows(xp, kh, kw, oh, ow, a):
    """View [N, C, kh, kw, oh, ow] of the padded input: element (i, j, y, x) is
    xp[..., y*sh + i*dh, x*sw + j*dw]."""
    (sh, sw), (dh, dw) = a["stride"], a["dilation"]
    n, c = xp.shape[:2]
    s = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp, (n, c, kh, kw, oh, ow), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw),
        writeable=False)


def _pad_hw(x, a):
    ph, pw = a["padding"]
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def conv2d_ref(a, x, w):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    g = a["groups"]
    oh, ow = conv_out_hw(h, wd, kh, kw, a)
    win = _windows(np.ascontiguousarray(_pad_hw(x, a)), kh, kw, oh, ow, a)
    win = win.reshape(n, g, cg, kh, kw, oh, ow)
    wg = w.reshape(g, o // g, cg, kh, kw)
    out = np.einsum("ngcijyx,gocij->ngoyx", win, wg, optimize=True)
    return out.reshape(n, o, oh, ow)


def conv2d_input_grad_ref(a, gy, w):
    n, o, oh, ow = gy.shape
    _, cg, kh, kw = w.shape
    g = a["groups"]
    h, wd = a["in_hw"]
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    gyg = gy.reshape(n, g, o // g, oh, ow)
    wg = w.reshape(g, o // g, cg, kh, kw)
    cols = np.einsum("ngoyx,gocij->ngcijyx", gyg, wg, optimize=True).reshape(n, g * cg, kh, kw, oh, ow)
    xp = np.zeros((n, g * cg, h + 2 * ph, wd + 2 * pw), dtype=gy.dtype)
    for i in range(kh):
        for j in range(kw):
            xp[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh,
               j * dw: j * dw + (ow - 1) * sw + 1: sw] += cols[:, :, i, j]
    return xp[:, :, ph: ph + h, pw: pw + wd]


def conv2d_weight_grad_ref(a, x, gy):
    n, c, h, wd = x.shape
    _, o, oh, ow = gy.shape
    kh, kw = a["kernel"]
    g = a["groups"]
    cg = c // g
    win = _windows(np.ascontiguousarray(_pad_hw(x, a)), kh, kw, oh, ow, a).reshape(n, g, cg, kh, kw, oh, ow)
    gyg = gy.reshape(n, g, o // g, oh, ow)
    return np.einsum("ngcijyx,ngoyx->gocij", win, gyg, optimize=True).reshape(o, cg, kh, kw)


def _conv_input_grad_shape(a, gy, w):
    n, o = gy.shape[:2]
    x_shape = (n, w.shape[1] * a["groups"]) + tuple(a["in_hw"])
    if _conv_check(a, x_shape, w.shape, "conv2d_input_grad") != gy.shape:
        raise ShapeError(f"conv2d_input_grad: {fmt(gy)} is not the output shape of this conv")
    return x_shape, gy.dtype


def _conv_weight_grad_shape(a, x, gy):
    o = gy.shape[1]
    w_shape = (o, x.shape[1] // a["groups"]) + tuple(a["kernel"])
    if _conv_check(a, x.shape, w_shape, "conv2d_weight_grad") != gy.shape:
        raise ShapeError(f"conv2d_weight_grad: {fmt(gy)} is not the output shape of this conv")
    return w_shape, x.dtype


def _conv_attrs(a):
    return {k: a[k] for k in ("stride", "padding", "dilation", "groups")}


def _conv_dx(gy, w, a, hw):
    import flame.ir.ops as ops
    return ops.conv2d_input_grad(gy, w, in_hw=hw, **_conv_attrs(a))


def _conv_dw(x, gy, a, k):
    import flame.ir.ops as ops
    return ops.conv2d_weight_grad(x, gy, kernel=k, **_conv_attrs(a))


def _conv(x, w, a):
    import flame.ir.ops as ops
    return ops.conv2d_raw(x, w, **_conv_attrs(a))


prim("conv2d", _conv_shape, conv2d_ref, inputs=("input", "weight"), kind="conv",
     vjp=(lambda g, x, w, o, a: _conv_dx(g, w, a, x.shape[2:]),
          lambda g, x, w, o, a: _conv_dw(x, g, a, w.shape[2:])),
     doc="NCHW x OIHW; attrs stride, padding, dilation (pairs) and groups")
prim("conv2d_input_grad", _conv_input_grad_shape, conv2d_input_grad_ref, inputs=("grad", "weight"),
     kind="conv",
     vjp=(lambda g, gy, w, o, a: _conv(g, w, a),
          lambda g, gy, w, o, a: _conv_dw(g, gy, a, w.shape[2:])),
     doc="the transpose of conv2d in its input (a transposed convolution)")
prim("conv2d_weight_grad", _conv_weight_grad_shape, conv2d_weight_grad_ref,
     inputs=("input", "grad"), kind="conv",
     vjp=(lambda g, x, gy, o, a: _conv_dx(gy, g, a, x.shape[2:]),
          lambda g, x, gy, o, a: _conv(x, g, a)),
     doc="the transpose of conv2d in its weight")

# ---------------------------------------------------------------- gather / scatter


def _gather_shape(a, table, idx):
    if idx.dtype not in (dt.i32, dt.i64):
        raise ShapeError(f"gather indices must be i32 or i64, got {fmt(idx)}")
    if table.ndim < 1:
        raise ShapeError("gather needs a table of rank >= 1")
    return idx.shape + table.shape[1:], table.dtype


def _scatter_shape(a, src, idx):
    if idx.dtype not in (dt.i32, dt.i64):
        raise ShapeError(f"scatter_add indices must be i32 or i64, got {fmt(idx)}")
    if src.shape[:idx.ndim] != idx.shape:
        raise ShapeError(f"scatter_add of {fmt(src)} by indices {fmt(idx)}: leading dims differ")
    return (a["rows"],) + src.shape[idx.ndim:], src.dtype


def _scatter_impl(a, src, idx):
    out = np.zeros((a["rows"],) + src.shape[idx.ndim:], dtype=src.dtype)
    np.add.at(out, idx.reshape(-1), src.reshape((-1,) + src.shape[idx.ndim:]))
    return out


def _gather_grad(g, table, idx, o, a):
    import flame.ir.ops as ops
    return ops.scatter_add(g, idx, table.shape[0])


def _scatter_grad(g, src, idx, o, a):
    import flame.ir.ops as ops
    return ops.gather(g, idx)


prim("gather", _gather_shape, lambda a, t, i: t[i], inputs=("table", "index"), kind="gather",
     vjp=(_gather_grad, None), doc="rows of table picked by integer indices (embedding)")
prim("scatter_add", _scatter_shape, _scatter_impl, inputs=("src", "index"), kind="gather",
     vjp=(_scatter_grad, None), doc="rows of src summed into `rows` rows by index")

# ---------------------------------------------------------------- nearest upsampling


def _upsample_shape(a, x):
    if x.ndim < 2:
        raise ShapeError(f"upsample_nearest needs rank >= 2, got {fmt(x)}")
    sh, sw = a["scale"]
    return x.shape[:-2] + (x.shape[-2] * sh, x.shape[-1] * sw), x.dtype


def _upsample_grad(g, x, o, a):
    sh, sw = a["scale"]
    lead = x.shape[:-2]
    h, w = x.shape[-2:]
    k = len(lead)
    return g.reshape(lead + (h, sh, w, sw)).sum((k + 1, k + 3))


prim("upsample_nearest", _upsample_shape,
     lambda a, x: np.repeat(np.repeat(x, a["scale"][0], axis=-2), a["scale"][1], axis=-1),
     vjp=(_upsample_grad,), doc="integer-factor nearest upsampling of the last two axes")

# ---------------------------------------------------------------- random


def _random_shape(a, seed):
    if seed.dtype not in (dt.i32, dt.i64) or seed.shape != ():
        raise ShapeError(f"random seed must be a 0-d i32/i64 tensor, got {fmt(seed)}")
    return a["shape"], a["dtype"]


def _rand_impl(fn):
    def impl(a, seed):
        n = math.prod(a["shape"])
        ct = np.float32 if a["dtype"].itemsize < 4 else a["dtype"].np
        return fn(int(seed), a["stream"], n, ct).reshape(a["shape"])
    return impl


prim("rand_uniform", _random_shape, _rand_impl(rng.uniform), inputs=("seed",), vjp=(None,),
     kind="random", doc="counter-based uniform [0,1) from (seed, stream, element index)")
prim("rand_normal", _random_shape, _rand_impl(rng.normal), inputs=("seed",), vjp=(None,),
     kind="random", doc="counter-based standard normal (Box-Muller on two counters)")

# ---------------------------------------------------------------- constants


def _const_shape(a):
    return a["value"].shape, a["dtype"]


prim("const", _const_shape, lambda a: a["value"], inputs=(), kind="other",
     doc="a literal array (attrs value, dtype); scalars are 0-d and typed to their use")


def const_value(a):
    return a["value"]


def attrs_key(attrs: dict):
    """A hashable form of an attrs dict (arrays by content), for CSE."""
    items = []
    for k in sorted(attrs):
        v = attrs[k]
        if isinstance(v, np.ndarray):
            v = ("array", v.shape, v.dtype.str, v.tobytes())
        elif isinstance(v, list):
            v = tuple(v)
        items.append((k, v))
    return tuple(items)
