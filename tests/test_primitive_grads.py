"""Gradient checks for every primitive in the table, driven by one table of cases.

Each case is a small float64 function written with the Tensor API / flame.ir.ops plus the
same function in torch. For a differentiable case we check, through flame.value_and_grad on
the reference interpreter: the forward against torch, the gradient of sum(f(x) * w) against
central finite differences along random directions, and against torch.autograd. For the
non-differentiable ones the forward must match and every gradient must be exactly zero.
Inputs are fresh random numbers each run; the seed is in every failure message
(FLAME_TEST_SEED=<seed> replays it).
"""
import os
import secrets
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import flame
from flame.ir import ops, rng as flame_rng
from flame.ir.primitives import PRIMS

F64 = np.float64


# ---------------------------------------------------------------- input generators (rng -> array)

def N(*shape):                    # any real
    return lambda r: r.standard_normal(shape)


def P(*shape):                    # positive, away from 0 (log, sqrt, rsqrt, pow base)
    return lambda r: r.uniform(0.5, 2.0, shape)


def NZ(*shape):                   # either sign, away from 0 (abs, reciprocal, divisor)
    return lambda r: r.choice([-1.0, 1.0], shape) * r.uniform(0.3, 2.0, shape)


def D(*shape, half=0):
    """Values at least 0.2 apart: distinct integers plus a fraction in [0.1, 0.4) (half=0)
    or [0.6, 0.9) (half=1), so max has no ties within an array nor maximum across two."""
    n = int(np.prod(shape))
    return lambda r: ((r.permutation(n) - n // 2) + r.uniform(0.1, 0.4, n) + 0.5 * half).reshape(shape)


def Z(*shape):                    # small integers as floats: comparisons see ties
    return lambda r: r.integers(-2, 3, shape).astype(F64)


def B(*shape):
    return lambda r: r.random(shape) < 0.5


def I(*shape, hi, dtype=np.int64):   # indices in [0, hi), repeats included
    return lambda r: r.integers(0, hi, shape).astype(dtype)


def SEED():
    return lambda r: np.asarray(r.integers(0, 2**31), np.int64)


# ---------------------------------------------------------------- torch references

CONV = dict(stride=(2, 2), padding=(1, 1), dilation=(2, 2), groups=2)
CONV_ODD = dict(stride=(1, 2), padding=(2, 0), dilation=(1, 1), groups=1)


def t_conv_dx(in_shape, a):
    """The input gradient of torch's conv2d as a (differentiable) function of (gy, w)."""
    def f(gy, w):
        x = torch.zeros(in_shape, dtype=gy.dtype, requires_grad=True)
        return torch.autograd.grad(TF.conv2d(x, w, **a), x, gy, create_graph=True)[0]
    return f


def t_conv_dw(w_shape, a):
    def f(x, gy):
        w = torch.zeros(w_shape, dtype=x.dtype, requires_grad=True)
        return torch.autograd.grad(TF.conv2d(x, w, **a), w, gy, create_graph=True)[0]
    return f


def t_pad(pads, value):
    """Interior padding the slow obvious way: a filled tensor with x written on a stride."""
    def f(x):
        shape = [lo + hi + s + max(s - 1, 0) * it for s, (lo, hi, it) in zip(x.shape, pads)]
        out = torch.full(shape, value, dtype=x.dtype)
        out[tuple(slice(lo, lo + (s - 1) * (it + 1) + 1, it + 1)
                  for s, (lo, hi, it) in zip(x.shape, pads))] = x
        return out
    return f


def t_rand(fn, dtype=np.float64):
    return lambda x, s: torch.from_numpy(fn(int(s), 0, x.numel(), dtype).reshape(tuple(x.shape)))


CONST = np.random.default_rng().standard_normal((3, 4))


# ---------------------------------------------------------------- the table

@dataclass
class Case:
    prim: str
    fn: object          # flame Tensors -> Tensor
    ref: object         # torch tensors -> tensor
    gens: tuple         # one generator per input
    diff: bool = True   # False: forward only, every gradient exactly zero
    fd: bool = True     # finite differences (off where the op rounds to float32)
    tag: str = ""

    @property
    def id(self):
        return self.prim + (f"-{self.tag}" if self.tag else "")


def unary(name, gen=N, tfn=None, **kw):
    return Case(name, lambda x: getattr(x, name)(), tfn or getattr(torch, name), (gen(3, 4),), **kw)


CASES = [
    unary("neg"), unary("exp"), unary("log", P), unary("sqrt", P), unary("rsqrt", P),
    unary("sin"), unary("cos"), unary("tanh"), unary("erf"), unary("abs", NZ),
    unary("sign", Z, diff=False), unary("reciprocal", NZ), unary("sigmoid"),
    Case("stop_gradient", lambda x: x.detach(), lambda x: x.detach(), (N(3, 4),), diff=False),
    Case("stop_gradient", flame.stop_gradient, lambda x: x.detach(), (N(3, 4),), diff=False, tag="free"),
    # binary ops broadcast their operands
    Case("add", lambda x, y: x + y, torch.add, (N(3, 1, 4), N(5, 4))),
    Case("add", lambda x: 2.5 + x, lambda x: 2.5 + x, (N(3, 4),), tag="scalar"),
    Case("sub", lambda x, y: x - y, torch.sub, (N(4), N(2, 3, 4))),
    Case("mul", lambda x, y: x * y, torch.mul, (N(2, 3, 1), N(1, 3, 5))),
    Case("div", lambda x, y: x / y, torch.div, (N(3, 4), NZ(4))),
    Case("div", lambda x, y: x / y, torch.div, (NZ(2, 1), NZ(2, 3)), tag="both"),
    Case("pow", lambda x, y: x ** y, torch.pow, (P(3, 4), N(3, 1))),
    Case("pow", lambda x: x ** 3.0, lambda x: x ** 3.0, (N(3, 4),), tag="const-exponent"),
    Case("maximum", lambda x, y: x.maximum(y), torch.maximum, (D(3, 1, 4), D(5, 4, half=1))),
    Case("minimum", lambda x, y: x.minimum(y), torch.minimum, (D(5, 4, half=1), D(3, 1, 4))),
    Case("safe_mul", lambda x, y: x.safe_mul(y), torch.mul, (N(3, 4), N(1, 4))),
    *[Case(op, (lambda o: lambda x, y: getattr(x, o)(y))(f"__{op}__"), getattr(torch, op),
           (Z(3, 4), Z(4)), diff=False) for op in ("eq", "ne", "lt", "le", "gt", "ge")],
    Case("logical_and", lambda x, y: (x > 0) & (y > 0), lambda x, y: (x > 0) & (y > 0),
         (N(3, 4), N(2, 1, 4)), diff=False),
    Case("logical_not", lambda x: ~(x > 0), lambda x: ~(x > 0), (N(3, 4),), diff=False),
    Case("where", ops.where, torch.where, (B(4), N(3, 4), N(3, 1))),
    Case("where", lambda x, y: ops.where(x > y, x * y, y), lambda x, y: torch.where(x > y, x * y, y),
         (D(2, 3, 4), D(3, 1, half=1)), tag="computed-cond"),
    Case("cast", lambda x: x.cast("f32").cast("f64"), lambda x: x.float().double(), (N(3, 4),), fd=False),
    Case("cast", lambda x: x.cast("f32"), lambda x: x.float(), (N(3, 4),), fd=False, tag="to-f32"),
    # reductions over several axes, with and without keepdims
    Case("sum", lambda x: x.sum((0, 2)), lambda x: x.sum((0, 2)), (N(3, 4, 5),)),
    Case("sum", lambda x: x.sum((1, -1), keepdim=True), lambda x: x.sum((1, -1), keepdim=True),
         (N(3, 4, 5),), tag="keepdims"),
    Case("sum", lambda x: x.sum(), lambda x: x.sum(), (N(3, 4, 5),), tag="all"),
    Case("max", lambda x: x.amax((0, 2)), lambda x: x.amax((0, 2)), (D(3, 4, 5),)),
    Case("max", lambda x: x.amax(1, keepdim=True), lambda x: x.amax(1, keepdim=True),
         (D(3, 4, 5),), tag="keepdims"),
    Case("max", lambda x: x.amax(), lambda x: x.amax(), (D(3, 4, 5),), tag="all"),
    # movement
    Case("reshape", lambda x: x.reshape(6, 10), lambda x: x.reshape(6, 10), (N(3, 4, 5),)),
    Case("permute", lambda x: x.permute(2, 0, 1), lambda x: x.permute(2, 0, 1), (N(3, 4, 5),)),
    Case("expand", lambda x: x.expand(2, 3, 4, 5), lambda x: x.expand(2, 3, 4, 5), (N(3, 1, 5),)),
    Case("slice", lambda x: x[1:6:2, ::3, 2:], lambda x: x[1:6:2, ::3, 2:], (N(7, 8, 4),)),
    Case("slice", lambda x: x[2, 1:7:4], lambda x: x[2, 1:7:4], (N(4, 8, 3),), tag="int-index"),
    Case("pad", lambda x: x.pad_general(((1, 2, 1), (0, 1, 2)), 1.5), t_pad(((1, 2, 1), (0, 1, 2)), 1.5),
         (N(3, 4),)),
    Case("concat", lambda x, y, z: ops.concat([x, y, z], 1), lambda x, y, z: torch.cat([x, y, z], 1),
         (N(2, 3, 4), N(2, 1, 4), N(2, 5, 4))),
    # matmul: batch broadcast, transposes, torch.matmul's 1-D rules
    Case("matmul", lambda x, y: x @ y, torch.matmul, (N(2, 1, 3, 4), N(3, 4, 5))),
    Case("matmul", lambda x, y: ops.matmul_t(x, y, ta=True), lambda x, y: x.mT @ y,
         (N(2, 4, 3), N(4, 5)), tag="ta"),
    Case("matmul", lambda x, y: ops.matmul_t(x, y, tb=True), lambda x, y: x @ y.mT,
         (N(3, 4), N(2, 5, 4)), tag="tb"),
    Case("matmul", lambda x, y: ops.matmul_t(x, y, ta=True, tb=True), lambda x, y: x.mT @ y.mT,
         (N(1, 4, 3), N(2, 5, 4)), tag="ta-tb"),
    Case("matmul", lambda x, y: x @ y, torch.matmul, (N(4), N(2, 4, 3)), tag="vector"),
    # convolutions and their two transposes
    Case("conv2d", lambda x, w: ops.conv2d_raw(x, w, **CONV), lambda x, w: TF.conv2d(x, w, **CONV),
         (N(2, 4, 9, 8), N(6, 2, 3, 3))),
    Case("conv2d", lambda x, w: ops.conv2d_raw(x, w, **CONV_ODD), lambda x, w: TF.conv2d(x, w, **CONV_ODD),
         (N(1, 3, 5, 7), N(2, 3, 2, 3)), tag="per-axis"),
    Case("conv2d_input_grad", lambda gy, w: ops.conv2d_input_grad(gy, w, in_hw=(9, 8), **CONV),
         t_conv_dx((2, 4, 9, 8), CONV), (N(2, 6, 4, 3), N(6, 2, 3, 3))),
    Case("conv2d_weight_grad", lambda x, gy: ops.conv2d_weight_grad(x, gy, kernel=(3, 3), **CONV),
         t_conv_dw((6, 2, 3, 3), CONV), (N(2, 4, 9, 8), N(2, 6, 4, 3))),
    # integer indices carry no gradient
    Case("gather", ops.gather, lambda t, i: t[i], (N(5, 3), I(2, 4, hi=5))),
    Case("scatter_add", lambda s, i: ops.scatter_add(s, i, 5),
         lambda s, i: torch.zeros(5, 3, dtype=s.dtype).index_add(0, i.reshape(-1).long(), s.reshape(-1, 3)),
         (N(2, 4, 3), I(2, 4, hi=5, dtype=np.int32))),
    Case("upsample_nearest", lambda x: ops.upsample_nearest(x, (2, 3)),
         lambda x: TF.interpolate(x, scale_factor=(2, 3), mode="nearest"), (N(2, 3, 4, 5),)),
    # no inputs to differentiate: the gradient is absent, reported as zeros
    Case("rand_uniform", lambda x, s: flame.rand_uniform(x.shape, "f64", seed=s), t_rand(flame_rng.uniform),
         (N(3, 4), SEED()), diff=False),
    Case("rand_normal", lambda x, s: flame.rand_normal(x.shape, "f64", seed=s), t_rand(flame_rng.normal),
         (N(3, 4), SEED()), diff=False),
    Case("const", lambda x: flame.const(CONST), lambda x: torch.from_numpy(CONST), (N(3, 4),), diff=False),
]


# ---------------------------------------------------------------- helpers

@pytest.fixture
def seeded(request):
    """(seed, Generator): a fresh seed per test, or FLAME_TEST_SEED to replay one."""
    seed = int(os.environ.get("FLAME_TEST_SEED") or secrets.randbits(32))
    request.node.user_properties.append(("seed", seed))
    return seed, np.random.default_rng(seed)


def weighted(fn):
    """x -> (sum(f(x) * w), f(x)): a scalar whose gradient is the VJP of f with cotangent w."""
    def loss(*a):
        *xs, w = a
        out = fn(*xs)
        return ((out if out.dtype.is_float else out.cast(w.dtype)) * w).sum(), out
    return loss


def is_float(a):
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def torch_run(case, inputs, w=None):
    ts = [torch.from_numpy(np.array(a)).requires_grad_(is_float(a)) for a in inputs]
    out = case.ref(*ts)
    if w is None:
        return out, None
    loss = (out.to(torch.float64) * torch.from_numpy(w)).sum()
    want = [t for t in ts if t.requires_grad]
    grads = torch.autograd.grad(loss, want, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(want, grads)]


def rel_err(a, b):
    a, b = np.asarray(a, F64), np.asarray(b, F64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


# ---------------------------------------------------------------- tests

def test_table_covers_every_primitive():
    missing = set(PRIMS) - {c.prim for c in CASES}
    assert not missing, f"primitives without a gradient test: {sorted(missing)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_uses_its_primitive(case, seeded):
    """The table is honest: each case's graph contains the primitive it is filed under."""
    _, r = seeded
    g = flame.trace(case.fn, *[gen(r) for gen in case.gens])
    assert case.prim in {n.op for n in g.nodes}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_primitive(case, seeded):
    seed, r = seeded
    msg = f"{case.id} seed={seed}"
    inputs = [gen(r) for gen in case.gens]
    tout, _ = torch_run(case, inputs)
    w = r.standard_normal(tuple(tout.shape))
    argnums = tuple(range(len(inputs)))
    (_, out), grads = flame.value_and_grad(weighted(case.fn), argnums=argnums, has_aux=True)(*inputs, w)

    # forward
    tout = tout.detach().numpy()
    assert out.shape == tout.shape, msg
    if is_float(tout):
        np.testing.assert_allclose(out, tout, rtol=1e-12, atol=1e-12, err_msg=msg)
    else:
        np.testing.assert_array_equal(out, tout, err_msg=msg)

    # every gradient has its input's shape; integer and boolean inputs get exact zeros
    for a, g in zip(inputs, grads):
        assert g.shape == np.shape(a), msg
        if not (case.diff and is_float(a)):
            assert not np.any(g), f"{msg}: a gradient flowed where none should"
    if not case.diff:
        return

    fl = [i for i, a in enumerate(inputs) if is_float(a)]
    # against torch.autograd
    _, tgrads = torch_run(case, inputs, w)
    for i, tg in zip(fl, tgrads):
        assert rel_err(grads[i], tg.numpy()) <= 1e-6, f"{msg}: grad of input {i} vs torch"
    # against central differences along random directions: <grad, d> = dL/dt at t=0
    if case.fd:
        loss = flame.compile(lambda *a: weighted(case.fn)(*a)[0], *inputs, w)
        eps = 1e-6
        for _ in range(3):
            d = {i: r.standard_normal(np.shape(inputs[i])) for i in fl}
            shifted = lambda s: [a + s * d[i] if i in d else a for i, a in enumerate(inputs)]
            fd = (loss(*shifted(eps), w) - loss(*shifted(-eps), w)) / (2 * eps)
            gd = sum(float(np.sum(grads[i] * d[i])) for i in fl)
            scale = sum(float(np.linalg.norm(grads[i]) * np.linalg.norm(d[i])) for i in fl)
            assert abs(fd - gd) <= 1e-6 * max(abs(gd), 1e-2 * scale), \
                f"{msg}: directional derivative {gd} vs finite differences {fd}"


# ---------------------------------------------------------------- ties, masked branches, detach, casts

def vjp_pair(fn, tfn, inputs, w):
    (_, out), g = flame.value_and_grad(weighted(fn), argnums=tuple(range(len(inputs))), has_aux=True)(*inputs, w)
    ts = [torch.from_numpy(a.copy()).requires_grad_() for a in inputs]
    tg = torch.autograd.grad((tfn(*ts) * torch.from_numpy(w)).sum(), ts)
    return g, [t.numpy() for t in tg]


@pytest.mark.parametrize("op", ["maximum", "minimum"])
def test_binary_ties_split_evenly_like_torch(op, seeded):
    seed, r = seeded
    x = Z(3, 4)(r)
    y = np.where(r.random((3, 4)) < 0.5, x, Z(3, 4)(r))   # many exact ties
    w = r.standard_normal((3, 4))
    g, tg = vjp_pair(lambda a, b: getattr(a, op)(b), getattr(torch, op), [x, y], w)
    tie = x == y
    assert tie.any()
    for a, b in zip(g, tg):
        np.testing.assert_allclose(a, b, rtol=1e-15, err_msg=f"seed={seed}")
        np.testing.assert_allclose(a[tie], 0.5 * w[tie], rtol=1e-15, err_msg=f"seed={seed}")


@pytest.mark.parametrize("axes,keep", [((1, 2), False), ((0,), True), (None, False)])
def test_max_ties_share_like_torch_amax(axes, keep, seeded):
    seed, r = seeded
    x = r.integers(0, 3, (4, 3, 5)).astype(F64)          # every row has ties at its max
    w = r.standard_normal(np.amax(x, axis=axes, keepdims=keep).shape)
    (g,), (tg,) = vjp_pair(lambda a: a.amax(axes, keepdim=keep),
                           lambda a: a.amax(axes if axes is not None else (), keepdim=keep), [x], w)
    np.testing.assert_allclose(g, tg, rtol=1e-14, err_msg=f"seed={seed}")


@pytest.mark.parametrize("name,fn,dfn", [
    ("sqrt", lambda x: x.sqrt(), lambda x: 0.5 / np.sqrt(x)),
    ("log", lambda x: x.log(), lambda x: 1.0 / x),
    ("rsqrt", lambda x: x.rsqrt(), lambda x: -0.5 * x ** -1.5),
    ("reciprocal", lambda x: x.reciprocal(), lambda x: -1.0 / x ** 2),
])
def test_where_keeps_nan_out_of_the_untaken_branch(name, fn, dfn, seeded):
    seed, r = seeded
    x = NZ(4, 5)(r)
    x[0, 0], x[1, 1] = -1.0, 0.0             # a negative and an exact zero, whatever the draw
    w = r.standard_normal((4, 5))
    (_, out), g = flame.value_and_grad(weighted(lambda a: ops.where(a > 0, fn(a), 0.0)), has_aux=True)(x, w)
    pos = x > 0
    with np.errstate(all="ignore"):
        want = np.where(pos, w * dfn(x), 0.0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g)), f"{name} seed={seed}: NaN leaked"
    np.testing.assert_allclose(g, want, rtol=1e-12, err_msg=f"{name} seed={seed}")


def test_detach_blocks_gradient(seeded):
    seed, r = seeded
    x, y = N(3, 4)(r), N(3, 4)(r)
    w = r.standard_normal((3, 4))
    fns = (lambda a, b: a.detach() * a + flame.stop_gradient(b) * a * b,
           lambda a, b: a.detach() * a + b.detach() * a * b)
    g, tg = vjp_pair(*fns, [x, y], w)
    for a, b in zip(g, tg):
        np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=f"seed={seed}")
    np.testing.assert_allclose(g[0], w * (x + y * y), rtol=1e-12, err_msg=f"seed={seed}")


def test_cast_chain_f32_f64_f32(seeded):
    """A float32 function computed in float64 in the middle: the gradient comes back in
    float32 and matches torch running the same chain."""
    seed, r = seeded
    x, y = N(3, 4)(r).astype(np.float32), N(4)(r).astype(np.float32)
    w = r.standard_normal((3, 4)).astype(np.float32)
    f = lambda a, b: ((a.cast("f64").sin() * b.cast("f64")).cast("f32") * a)
    t = lambda a, b: ((a.double().sin() * b.double()).float() * a)
    (_, out), g = flame.value_and_grad(weighted(f), argnums=(0, 1), has_aux=True)(x, y, w)
    ts = [torch.from_numpy(a).requires_grad_() for a in (x, y)]
    tout = t(*ts)
    tg = torch.autograd.grad((tout * torch.from_numpy(w)).sum(), ts)
    assert out.dtype == np.float32 and all(a.dtype == np.float32 for a in g)
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-6, err_msg=f"seed={seed}")
    for a, b in zip(g, tg):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"seed={seed}")


def test_safe_mul_is_zero_where_lhs_is_zero(seeded):
    seed, r = seeded
    x = np.where(r.random((3, 4)) < 0.5, 0.0, N(3, 4)(r))
    y = np.where(x == 0, np.inf, N(3, 4)(r))
    out = flame.compile(lambda a, b: a.safe_mul(b), x, y)(x, y)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out, np.where(x == 0, 0.0, x * y), err_msg=f"seed={seed}")


# ---------------------------------------------------------------- random draws

def draws(shape, dtype, kind, seed=None, two=False):
    """Compile a graph with one (or two) draws and run it with the graph's rng seed."""
    f = getattr(flame, kind)
    c = flame.compile(lambda x: (f(shape, dtype), f(shape, dtype)) if two else f(shape, dtype),
                      np.zeros(1))
    return c(np.zeros(1), seed=seed)


@pytest.mark.parametrize("kind", ["rand_uniform", "rand_normal"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_random_is_a_function_of_seed_and_stream(kind, dtype, seeded):
    seed, r = seeded
    s = int(r.integers(0, 2**31))
    a, b = draws((64, 8), dtype, kind, s), draws((64, 8), dtype, kind, s)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, draws((64, 8), dtype, kind, s + 1)), f"seed={s}: seed ignored"
    s0, s1 = draws((64, 8), dtype, kind, s, two=True)
    np.testing.assert_array_equal(s0, a)                 # the first op is stream 0
    assert not np.array_equal(s0, s1), f"seed={s}: two ops drew the same stream"
    gen = getattr(flame_rng, kind.split("_")[1])
    for k, got in enumerate((s0, s1)):
        np.testing.assert_array_equal(got, gen(s, k, 64 * 8, got.dtype.type).reshape(64, 8))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_random_statistics(dtype, seeded):
    _, r = seeded
    s = int(r.integers(0, 2**31))
    n = 100_000
    u = draws((n,), dtype, "rand_uniform", s).astype(F64)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005, f"seed={s}"
    z = draws((n,), dtype, "rand_normal", s).astype(F64)
    assert np.all(np.isfinite(z))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02, f"seed={s}"
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.01, f"seed={s}: not a normal shape"
