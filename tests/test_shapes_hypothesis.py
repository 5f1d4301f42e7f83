"""Property tests of the shape rules: broadcasting of binary ops (output shape, values, and the
unbroadcast gradient each operand gets back), shape errors that name the user's line, and the
movement ops (reshape, permute, expand, slice) against numpy."""
import os
import re

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

import flame

SETTINGS = settings(max_examples=50, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def unbroadcast(g, shape):
    """numpy's answer to 'which output elements used each operand element': sum the leading
    axes away, then every axis the operand has as 1."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    return g.sum(axis=tuple(i for i, s in enumerate(shape) if s == 1), keepdims=True)


def apart(r, shape, half):
    """Floats on a 1.0 grid plus a fraction in [0.1,0.4) (half=0) or [0.6,0.9) (half=1): two
    arrays with different halves never tie, so maximum/minimum are differentiable."""
    return r.integers(-3, 3, shape) + r.uniform(0.1, 0.4, shape) + 0.5 * half


# name: (flame fn, numpy fn, df/dx, df/dy), derivatives written out in numpy
BINARY = {
    "add": (lambda x, y: x + y, np.add, lambda x, y: 1.0, lambda x, y: 1.0),
    "sub": (lambda x, y: x - y, np.subtract, lambda x, y: 1.0, lambda x, y: -1.0),
    "mul": (lambda x, y: x * y, np.multiply, lambda x, y: y, lambda x, y: x),
    "div": (lambda x, y: x / y, np.divide, lambda x, y: 1 / y, lambda x, y: -x / y ** 2),
    "pow": (lambda x, y: x ** y, np.power, lambda x, y: y * x ** (y - 1), lambda x, y: x ** y * np.log(x)),
    "maximum": (lambda x, y: x.maximum(y), np.maximum, lambda x, y: x > y, lambda x, y: y > x),
    "minimum": (lambda x, y: x.minimum(y), np.minimum, lambda x, y: x < y, lambda x, y: y < x),
}


def operands(r, op, sx, sy):
    if op == "div":
        return r.standard_normal(sx), r.uniform(0.5, 2.0, sy)     # divisor away from 0
    if op == "pow":
        return r.uniform(0.5, 2.0, sx), r.standard_normal(sy)     # positive base
    return apart(r, sx, 0), apart(r, sy, 1)


@SETTINGS
@given(op=st.sampled_from(sorted(BINARY)),
       shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
       seed=seeds)
def test_binary_broadcast(op, shapes, seed):
    f, ref, dfdx, dfdy = BINARY[op]
    (sx, sy), out_shape = shapes
    r = np.random.default_rng(seed)
    x, y = operands(r, op, sx, sy)
    w = r.standard_normal(out_shape)

    def loss(a, b, c):
        out = f(a, b)
        return (out * c).sum(), out
    (_, out), (gx, gy) = flame.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, y, w)
    assert out.shape == np.broadcast_shapes(sx, sy) == out_shape
    np.testing.assert_allclose(out, ref(x, y), rtol=1e-13, atol=1e-13)
    assert gx.shape == sx and gy.shape == sy
    xb, yb = np.broadcast_arrays(x, y)
    np.testing.assert_allclose(gx, unbroadcast(w * dfdx(xb, yb), sx), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gy, unbroadcast(w * dfdy(xb, yb), sy), rtol=1e-12, atol=1e-12)


@st.composite
def incompatible_shapes(draw):
    """Two shapes that do not broadcast: on one trailing-aligned axis both sizes differ and
    neither is 1."""
    a = draw(array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    nb = draw(st.integers(1, 4))
    b = [draw(st.sampled_from([1, a[-1 - k]])) if k < len(a) else draw(st.integers(1, 5))
         for k in range(nb)][::-1]
    k = draw(st.integers(1, min(len(a), nb)))          # the clash, counted from the right
    b[-k] = draw(st.integers(2, 6).filter(lambda s: s != a[-k]))
    if a[-k] == 1:
        a = a[:-k] + (draw(st.integers(2, 6).filter(lambda s: s != b[-k])),) + a[len(a) - k + 1:]
    return a, tuple(b)


METHOD = {"add": "__add__", "sub": "__sub__", "mul": "__mul__", "div": "__truediv__",
          "pow": "__pow__", "maximum": "maximum", "minimum": "minimum"}


def _clash(op, x, y):
    return getattr(x, METHOD[op])(y)     # the line a shape error must name


CLASH_LINE = _clash.__code__.co_firstlineno + 1


@SETTINGS
@given(op=st.sampled_from(sorted(BINARY)), shapes=incompatible_shapes())
def test_incompatible_shapes_name_the_callers_line(op, shapes):
    sa, sb = shapes
    try:
        flame.trace(lambda x, y: _clash(op, x, y), flame.spec(sa, "f64"), flame.spec(sb, "f64"))
    except flame.ShapeError as e:
        m = re.match(r"(\S+?\.py):(\d+)", str(e))
        assert m, f"no file:line in {e}"
        assert os.path.samefile(m.group(1), __file__) and int(m.group(2)) == CLASH_LINE, str(e)
    else:
        raise AssertionError(f"{op} of {sa} and {sb} traced without a ShapeError")


# ---------------------------------------------------------------- movement ops against numpy


def vjp(fn, x, out_shape, r):
    w = r.standard_normal(out_shape)

    def loss(a, c):
        out = fn(a)
        return (out * c).sum(), out
    (_, out), g = flame.value_and_grad(loss, has_aux=True)(x, w)
    return out, g, w


@SETTINGS
@given(shape=array_shapes(min_dims=0, max_dims=4, max_side=4), data=st.data(), seed=seeds)
def test_reshape_and_permute_round_trip(shape, data, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape)
    new = tuple(data.draw(st.permutations(list(shape) + [1]))) if shape else (1, 1)
    perm = tuple(data.draw(st.permutations(range(len(new)))))
    inv = tuple(np.argsort(perm))
    f = lambda a: a.reshape(new).permute(perm)
    out, g, w = vjp(f, x, tuple(new[p] for p in perm), r)
    np.testing.assert_array_equal(out, np.transpose(x.reshape(new), perm))
    np.testing.assert_array_equal(g, np.transpose(w, inv).reshape(shape))   # the adjoint
    back = flame.compile(lambda a: f(a).permute(inv).reshape(shape), x)(x)
    np.testing.assert_array_equal(back, x)


@SETTINGS
@given(shapes=mutually_broadcastable_shapes(num_shapes=1, min_dims=0, max_dims=4, max_side=4),
       seed=seeds)
def test_expand(shapes, seed):
    (shape,), target = shapes
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape)
    out, g, w = vjp(lambda a: a.expand(target), x, target, r)
    np.testing.assert_array_equal(out, np.broadcast_to(x, target))
    np.testing.assert_allclose(g, unbroadcast(w, shape), rtol=1e-13, atol=1e-13)


@st.composite
def slices(draw, shape):
    """A python index per axis: a slice with any start/stop/positive step (out-of-range and
    empty ones included), an integer, or a negative integer."""
    idx = []
    for n in shape:
        kind = draw(st.sampled_from(["slice", "slice", "int"]))
        if kind == "int":
            idx.append(draw(st.integers(-n, n - 1)))
        else:
            b, e = (draw(st.none() | st.integers(-n - 1, n + 1)) for _ in range(2))
            idx.append(slice(b, e, draw(st.none() | st.integers(1, 3))))
    return tuple(idx)


@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=5), data=st.data(), seed=seeds)
def test_slice(shape, data, seed):
    idx = data.draw(slices(shape))
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape)
    want = x[idx]
    out, g, w = vjp(lambda a: a[idx], x, want.shape, r)
    np.testing.assert_array_equal(out, want)
    expect = np.zeros(shape)
    expect[idx] = w                    # the adjoint: w written back where it was read
    np.testing.assert_array_equal(g, expect)
