"""The CPU backend (fused Numba kernels + numpy library calls) against the reference
interpreter, op by op: every primitive and every flame.nn.functional op, forward and
backward, on fresh random inputs.

Each case is one traced function returning a dict of outputs. It is compiled once as
value_and_grad(loss, argnums, has_aux=True), where loss = sum(out * cotangent) over the float
outputs with random cotangents, so one compiled graph checks the forward outputs (aux) and
the gradients. Numba compile time dominates, so related ops share a case.
"""
import zlib

import numpy as np
import pytest

import flame
import flame.nn.functional as F
from flame.ir import ops
from flame.ir.passes import optimize
from flame.ir.primitives import PRIMS


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache_dir(tmp_path_factory):
    """Generated kernels go to a temporary cache, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLAME_CACHE_DIR", str(tmp_path_factory.mktemp("flame_cache")))
        yield


# ---------------------------------------------------------------- inputs

def normal(*shape):
    return ("n", shape)


def positive(*shape):          # log, sqrt, rsqrt, reciprocal, pow base: in [0.5, 2)
    return ("p", shape)


def integral(*shape):          # small integers stored as floats: comparisons see ties
    return ("k", shape)


def index(rows, *shape, dtype=np.int64):
    return ("i", shape, 0, rows, dtype)


def ints(lo, hi, *shape, dtype=np.int32):
    return ("i", shape, lo, hi, dtype)


def make(spec, rng, dtype):
    if callable(spec):
        return spec(rng)
    kind, shape = spec[0], spec[1]
    if kind == "n":
        x = rng.standard_normal(shape)
        x = np.where(np.abs(x) < 0.05, 0.5, x)   # keep away from the kinks of abs/sign/max
    elif kind == "p":
        x = rng.uniform(0.5, 2.0, shape)
    elif kind == "k":
        x = rng.integers(-2, 3, shape)
    else:
        return rng.integers(spec[2], spec[3], shape).astype(spec[4])
    return np.asarray(x, dtype)


# ---------------------------------------------------------------- the table
# name -> (fn returning a dict of Tensors, input specs, argnums to differentiate or None)

def unary(x, z):
    return {"neg": -z, "exp": x.exp(), "log": x.log(), "sqrt": x.sqrt(), "rsqrt": x.rsqrt(),
            "sin": z.sin(), "cos": z.cos(), "tanh": z.tanh(), "erf": z.erf(), "abs": abs(z),
            "sign": z.sign(), "reciprocal": x.reciprocal(), "sigmoid": z.sigmoid(),
            "detach": z.detach() * z}


def binary(x, y, p, q):
    # y [3,1] and q [4] broadcast against [2,3,4]; literals are typed scalars
    return {"add": x + y, "sub": y - x, "mul": x * q, "div": x / (p + 1.0), "pow": p ** x,
            "pow_lit": p ** 1.5 + 2.0 * x, "maximum": x.maximum(y), "minimum": x.minimum(q),
            "safe_mul": x.safe_mul(y)}


def safe_mul_zero(x, y):
    # 0 * inf would be nan; safe_mul keeps the masked zeros zero
    xz = flame.where(x > 0.0, x, 0.0)
    return {"safe_mul": xz.safe_mul(y.reciprocal()), "div0": (x - x) / (y - y)}


def nan_inf(x, z):
    # x holds a NaN, +inf and -inf: NaN wins maximum/minimum/amax as in numpy (and torch)
    return {"max_lhs": x.maximum(z), "max_rhs": z.maximum(x), "min_lhs": x.minimum(z),
            "min_rhs": z.minimum(x), "amax_rows": x.amax(1), "amax_all": x.amax(),
            "relu": F.relu(x), "softmax": F.softmax(x, dim=-1), "sum": x.sum(0)}


def with_nan_inf(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    x[0, 1], x[1, 2], x[2, 0] = np.nan, np.inf, -np.inf
    return x


def compare(x, y, a, b):
    # float ties come from integer-valued floats; a, b are i32 and i64 tensors
    keep = (x > y) & ~(x == 0.0)
    return {"eq": x == y, "ne": x != y, "lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y,
            "and_not": keep, "where": flame.where(x >= y, x * y, x - y),
            "where_lit": flame.where(keep, x, -1.5),
            "i32": (a * a - a).maximum(a + 1) + abs(a) * a.sign(), "i32_lt": a < 1,
            "i64": (b - 3) * b.minimum(b + b) - (-b), "i64_ge": b >= a.cast("i64")}


def casts(x, a):
    return {"to_i32": x.cast("i32"), "to_i64": (x * 3.0).cast("i64"), "to_bool": x.cast("bool"),
            "bool_to_f32": (x > 0.3).cast("f32") * x, "i32_to_f32": a.cast("f32") * x,
            "f64_round_trip": (x.cast("f64") * x.cast("f64")).cast("f32"),
            "i32_to_f64": a.cast("f64") + 0.5}


def reductions(x):
    return {"sum0": x.sum(0), "sum1k": x.sum(1, keepdim=True), "sum02": x.sum((0, 2)),
            "sum_all": x.sum(), "max_last": x.amax(-1), "max01k": x.amax((0, 1), keepdim=True),
            "max_all": x.amax(), "sum_sq": (x * x).sum(-1), "mean": x.mean(1)}


def movement(x, y, z):
    # x [2,3,4], y [3,1], z [2,2,4]
    return {"reshape": x.reshape(6, 4), "permute": x.permute(2, 0, 1),
            "permute_add": x.permute(1, 0, 2) + y.reshape(3, 1, 1),
            "expand": y.expand(2, 3, 5) * 1.5, "slice": x[:, ::2, 1:4:2],
            "slice_add": x[1:, 1:, ::3] + x[:1, :2, 2:],
            "pad": x.pad_general(((1, 0, 1), (0, 2, 0), (2, 1, 2)), 0.25),
            "concat": flame.concat([x, z, x[:, :1]], dim=1),
            "concat_add": flame.concat([z.permute(0, 2, 1), y.reshape(1, 3).expand(4, 3)
                                        .unsqueeze(0).expand(2, 4, 3)], dim=2) * 2.0,
            "flatten_t": x.transpose(0, 1).reshape(3, 8).T.sin()}


def matmuls(a, b, c, d, v):
    # a [2,1,3,4] @ b [5,4,6] broadcasts the batch; c [3,5] and d [7,6] exercise ta/tb
    return {"batched": a @ b, "ta": ops.matmul_t(c, a, ta=True),
            "tb": ops.matmul_t(b, d, tb=True), "ta_tb": ops.matmul_t(c, c.T, ta=True, tb=True),
            "vec": v @ c, "mat_add": (c @ c.T + 1.0).tanh()}


def convs(x, w, w2, gy, x2):
    # grouped strided conv, a dilated one, and the two gradient prims called directly
    return {"conv": ops.conv2d_raw(x, w, stride=2, padding=1, groups=2),
            "dilated": ops.conv2d_raw(x, w2, padding=(2, 1), dilation=(2, 1)),
            "input_grad": ops.conv2d_input_grad(gy, w2, in_hw=(7, 6), stride=(1, 1),
                                                padding=(0, 0), dilation=(1, 1), groups=1),
            "weight_grad": ops.conv2d_weight_grad(x2, gy, kernel=(3, 3), stride=(1, 1),
                                                  padding=(0, 0), dilation=(1, 1), groups=1)}


def gathers(t, i, j, s):
    # repeated indices: scatter_add must accumulate
    return {"gather": t[i], "gather_i32": ops.gather(t * 2.0, j),
            "scatter": ops.scatter_add(s, i, 7), "gather_add": t[i] + s}


def upsample(x):
    return {"up": ops.upsample_nearest(x, (2, 3)), "up_sq": ops.upsample_nearest(x * x, 2) + 1.0}


def functional_dense(x, w, b, g, beta):
    h = F.linear(x, w, b)
    return {"linear": h, "silu": F.silu(h), "gelu": F.gelu(h), "gelu_tanh": F.gelu(h, "tanh"),
            "softmax": F.softmax(h, dim=-1), "softmax0": F.softmax(h, dim=0),
            "log_softmax": F.log_softmax(h, dim=-1), "layer_norm": F.layer_norm(h, (4,), g, beta),
            "layer_norm2": F.layer_norm(h, (3, 4)), "mse": F.mse_loss(h, x[..., :4]),
            "mse_sum": F.mse_loss(h, b, reduction="sum"),
            "mse_none": F.mse_loss(x[..., 1:], h, reduction="none")}


def functional_conv(x, w, b, gamma, beta):
    y = F.conv2d(x, w, b, padding="same")
    return {"conv": y, "group_norm": F.group_norm(y, 2, gamma, beta),
            "group_norm_plain": F.group_norm(x, 1), "interp_up": F.interpolate(y, scale_factor=2),
            "interp_down": F.interpolate(x, size=(3, 2)), "pad": F.pad(y, (1, 2, -1, 0), value=0.5)}


def attention(q, k, v, m, fm):
    return {"plain": F.scaled_dot_product_attention(q, k, v),
            "bool_mask": F.scaled_dot_product_attention(q, k, v, attn_mask=m),
            "float_mask": F.scaled_dot_product_attention(q, k, v, attn_mask=fm, scale=0.3),
            "causal": F.scaled_dot_product_attention(q, k, v, is_causal=True)}


def embed_dropout(w, i, x):
    return {"embedding": F.embedding(i, w), "embedding_pad": F.embedding(i, w, padding_idx=2),
            "dropout": F.dropout(x, 0.3, seed=7), "dropout_eval": F.dropout(x, 0.3, training=False)}


def random_draws(x):
    # an explicit seed and the graph's rng_seed input (the call's seed=)
    return {"uniform": flame.rand_uniform((5, 7), seed=1234),
            "normal": flame.rand_normal((3, 11), seed=99),
            "uniform_graph_seed": flame.rand_uniform((2, 3)) + x,
            "normal_f64": flame.rand_normal((4, 4), "f64", seed=5),
            "uniform_f64": flame.rand_uniform((9,), "f64", seed=5)}


def large(x, b):
    # 64K elements: parallel (prange) kernels, and reductions long enough to be split into a
    # partial and a final pass (trailing axes for the total, leading axes for lead_sum)
    return {"silu": F.silu(x + b), "softmax": F.softmax(x, dim=-1), "total": (x * x).sum(),
            "col": x.sum(0), "row_max": x.amax(1), "lead_sum": x.reshape(32768, 2).sum(0)}


def attn_bool_mask(rng):
    m = rng.random((2, 5, 6)) > 0.3
    m[..., 0] = True   # every row keeps one key, so no row is all -inf
    return m


CASES = {
    "unary": (unary, [positive(3, 5), normal(3, 5)], (0, 1)),
    "binary": (binary, [normal(2, 3, 4), normal(3, 1), positive(2, 3, 4), normal(4)], (0, 1, 2, 3)),
    "safe_mul_zero": (safe_mul_zero, [normal(4, 6), integral(4, 6)], None),
    "nan_inf": (nan_inf, [with_nan_inf, normal(4, 5)], None),
    "compare": (compare, [integral(4, 5), integral(5), ints(-3, 4, 4, 5),
                          ints(-5, 6, 4, 5, dtype=np.int64)], (0, 1)),
    "cast": (casts, [normal(3, 4), ints(-3, 4, 3, 4)], (0,)),
    "reductions": (reductions, [normal(2, 3, 4)], (0,)),
    "movement": (movement, [normal(2, 3, 4), normal(3, 1), normal(2, 2, 4)], (0, 1, 2)),
    "matmul": (matmuls, [normal(2, 1, 3, 4), normal(5, 4, 6), normal(3, 5), normal(7, 6), normal(3)],
               (0, 1, 2, 3, 4)),
    "conv2d": (convs, [normal(2, 4, 7, 7), normal(6, 2, 3, 3), normal(3, 4, 3, 3), normal(2, 3, 5, 4),
                       normal(2, 4, 7, 6)], (0, 1, 2, 3, 4)),
    "gather_scatter": (gathers, [normal(7, 3), index(7, 2, 4), index(7, 3, dtype=np.int32),
                                 normal(2, 4, 3)], (0, 3)),
    "upsample": (upsample, [normal(2, 3, 4)], (0,)),
    "functional_dense": (functional_dense, [normal(2, 3, 5), normal(4, 5), normal(4), normal(4),
                                            normal(4)], (0, 1, 2, 3, 4)),
    "functional_conv": (functional_conv, [normal(2, 4, 6, 4), normal(4, 4, 3, 3), normal(4),
                                          normal(4), normal(4)], (0, 1, 2, 3, 4)),
    "attention": (attention, [normal(2, 5, 8), normal(2, 6, 8), normal(2, 6, 3), attn_bool_mask,
                              normal(5, 6)], (0, 1, 2, 4)),
    "embedding_dropout": (embed_dropout, [normal(5, 3), index(5, 2, 6), normal(4, 50)], (0, 2)),
    "random": (random_draws, [normal(2, 3)], None),
    "large": (large, [normal(64, 1024), normal(1024)], (0, 1)),
}


def inputs(name, dtype=np.float32):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return [make(s, rng, dtype) for s in CASES[name][1]]


def with_grads(fn, args, argnums):
    """value_and_grad of sum(out * cotangent) over fn's float outputs; the outputs ride as aux.
    The cotangents are extra (undifferentiated) arguments after fn's own."""
    g = flame.trace(fn, *args)
    outs = [(i, o) for i, o in enumerate(g.outputs) if o.dtype.is_float]
    rng = np.random.default_rng(1)
    cts = [rng.standard_normal(o.shape).astype(o.dtype.np) for _, o in outs]
    n = len(args)

    def loss(*a):
        res = fn(*a[:n])
        leaves = list(res.values())
        total = None
        for (i, _), ct in zip(outs, a[n:]):
            term = (leaves[i] * ct).sum()
            total = term if total is None else total + term
        return total, res

    return flame.value_and_grad(loss, argnums=argnums, has_aux=True), list(args) + cts


def assert_close(got, want, what, rtol, atol):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: {got.dtype}{list(got.shape)} vs interp {want.dtype}{list(want.shape)}"
    if want.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    scale = float(np.max(np.abs(want[np.isfinite(want)]), initial=1.0))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(scale, 1.0), err_msg=what)


def run_case(name, dtype=np.float32, rtol=1e-5, atol=1e-6, backend="cpu"):
    """The case on `backend` (tests/test_gpu.py runs the same table on "cuda")."""
    fn, _, argnums = CASES[name]
    args = inputs(name, dtype)
    target, call_args = (fn, args) if argnums is None else with_grads(fn, args, argnums)
    cpu = flame.compile(target, *call_args, backend=backend)
    ref = flame.compile(target, *call_args, backend="interp")
    got, want = cpu(*call_args, seed=11), ref(*call_args, seed=11)
    if argnums is None:
        pairs = [(f"{name}.{k}", got[k], want[k]) for k in want]
    else:
        (value, aux), grads = got
        (rvalue, raux), rgrads = want
        pairs = [(f"{name} loss", value, rvalue)]
        pairs += [(f"{name}.{k}", aux[k], raux[k]) for k in raux]
        pairs += [(f"{name} d/d arg{i}", g, r) for i, g, r in zip(argnums, grads, rgrads)]
    for what, g, w in pairs:
        assert_close(g, w, what, rtol, atol)
    return cpu, got, want


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_matches_interp_f32(name):
    run_case(name)


@pytest.mark.parametrize("name", ["unary", "reductions", "attention"])
def test_cpu_matches_interp_f64(name):
    run_case(name, np.float64, rtol=1e-12, atol=1e-13)


def test_random_draws_equal_the_interpreter():
    """Same seed, same numbers on every backend: uniform bit for bit, normal to 1e-5."""
    _, got, want = run_case("random")
    for k in ("uniform", "uniform_f64", "uniform_graph_seed"):
        np.testing.assert_array_equal(got[k], want[k])
    for k in ("normal", "normal_f64"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    # the numbers are a function of the seed: a different call seed gives a different draw
    x = inputs("random")[0]
    c = flame.compile(lambda x: flame.rand_uniform((2, 3)) + x, x, backend="cpu")
    assert not np.array_equal(c(x, seed=1), c(x, seed=2))
    np.testing.assert_array_equal(c(x, seed=1), c(x, seed=1))


def test_large_kernels_run_in_parallel():
    cpu, _, _ = run_case("large")
    assert any("numba.prange" in src for src in cpu.runner.sources.values())


def test_dropout_keeps_about_one_minus_p():
    # an independent check of the draw: the kept fraction of 4*50 elements is near 0.7
    _, got, _ = run_case("embedding_dropout")
    x = inputs("embedding_dropout")[2]
    kept = got[0][1]["dropout"] != 0
    assert 0.55 < kept.mean() < 0.85
    np.testing.assert_allclose(got[0][1]["dropout"][kept], (x / 0.7)[kept], rtol=1e-6)


def test_half_precision_is_refused_clearly():
    x = np.ones((4,), np.float16)
    with pytest.raises(NotImplementedError, match="f16"):
        flame.compile(lambda x: x * 2.0 + 1.0, x, backend="cpu")


# Removed by the optimizer before any backend sees them (after autodiff a detach is an identity).
OPTIMIZED_AWAY = {"stop_gradient"}


def test_every_primitive_is_covered_by_the_cpu_table():
    """A new primitive fails here until a CASES entry runs it on the CPU backend."""
    seen, traced = set(), set()
    for name, (fn, _, argnums) in CASES.items():
        args = inputs(name)
        target, call_args = (fn, args) if argnums is None else with_grads(fn, args, argnums)
        g = flame.trace(target, *call_args)
        traced |= {n.op for n in g.nodes}
        seen |= {n.op for n in optimize(g).nodes}
    missing = set(PRIMS) - seen - OPTIMIZED_AWAY
    assert not missing, f"primitives with no CPU-backend coverage: {sorted(missing)}"
    assert OPTIMIZED_AWAY <= traced - seen
