"""Each pass in flame.ir.passes on small traced graphs: the rewrite happened, the values did not
change (reference interpreter, before vs after, on random inputs), and scope, source line and
backward rule survive on every node."""
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import flame
from flame.ir import passes as P
from flame.ir.interp import run_graph
from flame.ir.tracer import bind, scope

rng = np.random.default_rng()
X = flame.spec((2, 3, 4))   # the default input of the hand-built graphs


# ---------------------------------------------------------------- helpers


def feeds(graph):
    return {n.attrs["name"]: (rng.standard_normal(n.shape) + 0.5).astype(n.dtype.np)
            for n in graph.inputs}


def live(graph):
    """Nodes the outputs depend on (computed here, not by dce)."""
    want, out = {o.id for o in graph.outputs}, []
    for n in reversed(graph.nodes):
        if n.id in want:
            out.append(n)
            want.update(i.id for i in n.inputs)
    return out[::-1]


def live_ops(graph):
    return Counter(n.op for n in live(graph) if n.op != "const")


def provenance(graph):
    return {(n.scope, n.loc, n.rule) for n in graph.nodes}


def n_forward(graph):
    return sum(n.rule is None and n.op != "const" for n in live(graph))


def assert_origins(before, after):
    """Every node after a pass is one from before, a copy of one, or made in place of one
    (a collapse keeps the op, a fold makes a const): same scope, line and rule."""
    origins = {(n.op, n.scope, n.loc, n.rule) for n in before.nodes}
    origins |= {("const", n.scope, n.loc, n.rule) for n in before.nodes}
    for n in after.nodes:
        assert (n.op, n.scope, n.loc, n.rule) in origins, f"{n} has no origin"
    # a backward node replaced by a new one must not turn into a forward one
    assert n_forward(after) <= n_forward(before)


def check_pass(graph, p):
    """Run pass p; values identical on random inputs, no new (scope, line, rule) invented."""
    out = p(graph)
    f = feeds(graph)
    for a, b in zip(run_graph(graph, f), run_graph(out, f)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)   # every rewrite here is exact
    assert provenance(out) <= provenance(graph)
    assert_origins(graph, out)
    assert all(n.loc for n in out.nodes), "a node lost its source line"
    assert out.inputs == graph.inputs
    return out


def assert_close(a, b):
    """After optimize, a reduction may read a view where it read a copy before (a collapsed
    permute pair), and numpy sums views in another order: allow float rounding, no more."""
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(a).max(initial=0))))


def the(graph, op):
    (n,) = [n for n in live(graph) if n.op == op]
    return n


# ---------------------------------------------------------------- simplify


def _expand_same(x):
    return bind("expand", x, shape=x.shape).sin()


def _slice_full(x):
    return bind("slice", x, starts=(0, 0, 0), stops=x.shape, steps=(1, 1, 1)).sin()


def _pad_zero(x):
    return bind("pad", x, pads=((0, 0, 0),) * 3, value=0.0).sin()


SIMPLIFY = [  # name, fn, live ops expected after simplify
    ("x*1", lambda x: (x * 1.0).sin(), {"sin": 1}),
    ("1*x", lambda x: (1.0 * x).sin(), {"sin": 1}),
    ("x+0", lambda x: (x + 0.0).sin(), {"sin": 1}),
    ("0+x", lambda x: (0.0 + x).sin(), {"sin": 1}),
    ("x-0", lambda x: (x - 0.0).sin(), {"sin": 1}),
    ("x/1", lambda x: (x / 1.0).sin(), {"sin": 1}),
    ("--x", lambda x: (-(-x)).sin(), {"sin": 1}),
    ("---x", lambda x: (-(-(-x))).sin(), {"neg": 1, "sin": 1}),
    ("x*1 broadcasting up stays", lambda x: x * flame.ones((5, 2, 3, 4)), {"mul": 1, "expand": 1}),
    ("x*2 stays", lambda x: (x * 2.0).sin(), {"mul": 1, "sin": 1}),
    ("0-x stays", lambda x: (0.0 - x).sin(), {"sub": 1, "sin": 1}),
    ("1/x stays", lambda x: (1.0 / x).sin(), {"div": 1, "sin": 1}),
    ("reshape.reshape", lambda x: x.reshape(6, 4).reshape(3, 8), {"reshape": 1}),
    ("reshape.reshape back", lambda x: x.reshape(6, 4).reshape(2, 3, 4).sin(), {"sin": 1}),
    ("permute.permute identity", lambda x: x.permute(2, 0, 1).permute(1, 2, 0).sin(), {"sin": 1}),
    ("permute.permute composed", lambda x: x.permute(2, 0, 1).permute(0, 2, 1), {"permute": 1}),
    ("expand same shape", _expand_same, {"sin": 1}),
    ("expand.expand", lambda x: x[:, :1].expand(5, 2, 1, 4).expand(3, 5, 2, 6, 4), {"slice": 1, "expand": 1}),
    ("slice whole", _slice_full, {"sin": 1}),
    ("pad nothing", _pad_zero, {"sin": 1}),
    ("sum over size-1 axes", lambda x: x[:, :1].sum(1, keepdim=True).sin(), {"slice": 1, "sin": 1}),
    ("sum that reduces stays", lambda x: x.sum(1, keepdim=True).sin(), {"sum": 1, "sin": 1}),
    ("detach", lambda x: x.detach().sin(), {"sin": 1}),
    ("f32->f64->f32", lambda x: x.cast("f64").cast("f32").sin(), {"sin": 1}),
    ("f16->f32->f16", lambda x: x.cast("f16").cast("f32").cast("f16"), {"cast": 1}),
    ("f32->f16->f32 stays (rounds)", lambda x: x.cast("f16").cast("f32"), {"cast": 2}),
    ("f16->bf16->f16 stays (rounds)", lambda x: x.cast("f16").cast("bf16").cast("f16"), {"cast": 3}),
    ("bf16->f16->bf16 stays (range)", lambda x: (x * 1e5).cast("bf16").cast("f16").cast("bf16"), {"mul": 1, "cast": 3}),
]


@pytest.mark.parametrize("name, fn, expect", SIMPLIFY, ids=[c[0] for c in SIMPLIFY])
def test_simplify_rewrites(name, fn, expect):
    g = flame.trace(fn, X)
    out = check_pass(g, P.simplify)
    assert live_ops(out) == Counter(expect), flame.dump(out)


def test_collapsed_movement_keeps_the_outer_nodes_scope_and_line():
    def f(x):
        with scope("inner"):
            a = x.reshape(6, 4).permute(1, 0)
        with scope("outer"):
            b = a.permute(1, 0).reshape(3, 8)
        return b
    g = flame.trace(f, X)
    outer = [n for n in g.nodes if n.scope == "outer"]
    out = check_pass(g, P.simplify)
    (r,) = live(out)   # reshape(reshape(x)) with the permute pair gone
    assert r.op == "reshape" and r.inputs[0].op == "input" and r.shape == (3, 8)
    assert (r.scope, r.loc) == (outer[-1].scope, outer[-1].loc)


def test_collapsed_backward_movement_keeps_its_rule():
    # the backward of reshape(reshape(x)) is reshape(reshape(g)): collapsed, still [reshape.x]
    g = flame.trace(flame.value_and_grad(lambda x: x.reshape(6, 4).reshape(3, 8).sin().sum()), X)
    out = check_pass(g, P.simplify)
    gx = out.outputs[1]
    assert gx.op == "reshape" and gx.rule == "reshape.x" and gx.inputs[0].rule == "sin.x"


def test_permute_composition_order():
    # a non-square shape, so a composition in the wrong order fails the shape check too
    g = flame.trace(lambda x: x.permute(1, 2, 0).permute(2, 0, 1).permute(0, 2, 1), X)
    out = check_pass(g, P.simplify)
    assert the(out, "permute").attrs["perm"] == (0, 2, 1)


# ---------------------------------------------------------------- common subexpressions


def test_cse_merges_duplicates_and_keeps_the_first():
    def f(x):
        with scope("first"):
            a = (x * 2.0).exp()
        with scope("second"):
            b = (x * 2.0).exp()   # same ops, same constant: merged
        return a + b, x.sum(0) + x.sum(1).sum()   # different attrs: kept apart
    g = flame.trace(f, X)
    out = check_pass(g, P.cse)
    assert live_ops(out) == Counter({"mul": 1, "exp": 1, "add": 2, "sum": 3})
    assert the(out, "exp").scope == "first"
    assert sum(n.op == "const" for n in live(out)) == 1   # the two 2.0 literals
    add = out.outputs[0]
    assert add.inputs[0] is add.inputs[1]


def test_cse_keeps_distinct_constants_and_random_draws():
    def f(x):
        r1 = flame.rand_uniform(x.shape, seed=7)
        r2 = flame.rand_uniform(x.shape, seed=7)   # a second stream: different numbers
        return x * 2.0 + x * 3.0 + r1 - r2
    g = flame.trace(f, X)
    out = check_pass(g, P.cse)
    assert live_ops(out) == live_ops(g)
    assert live_ops(out)["rand_uniform"] == 2


# ---------------------------------------------------------------- dead code


def test_dce_drops_unused_nodes_only():
    def f(x):
        unused = (x.exp() * 3.0).sum()   # noqa: F841
        return x.sin() + 1.0
    g = flame.trace(f, X)
    out = check_pass(g, P.dce)
    assert [n.id for n in out.nodes] == [n.id for n in live(g)]
    assert Counter(n.op for n in out.nodes) == Counter({"sin": 1, "const": 1, "add": 1})


# ---------------------------------------------------------------- constant folding


def test_constant_fold_evaluates_constant_subgraphs():
    c = rng.standard_normal((3, 4)).astype(np.float32)

    def f(x):
        with scope("table"):
            k = (flame.const(c).exp() * 2.0).sum(0)   # all constant: folds to one literal
        return x + k
    g = flame.trace(f, X)
    summed = [n for n in g.nodes if n.op == "sum"][0]
    out = check_pass(g, P.constant_fold)
    assert live_ops(out) == Counter({"add": 1})
    lit = the(out, "add").inputs[1]
    assert lit.op == "const" and lit.shape == (4,)
    assert (lit.scope, lit.loc, lit.rule) == (summed.scope, summed.loc, summed.rule)
    np.testing.assert_allclose(lit.attrs["value"], (np.exp(c) * 2).sum(0), rtol=1e-6)


def test_constant_fold_leaves_growth_random_and_big_results_alone():
    big = P.FOLD_LIMIT + 1

    def f(x):
        grown = flame.const(np.float32(2.0)).expand(x.shape)         # would only make a bigger literal
        r = flame.rand_normal((1,), seed=3)   # draws stay ops, even from a constant seed
        huge = flame.const(np.ones(big, np.float32)).exp().sum()     # exp result over the limit
        return x * grown + r + huge
    g = flame.trace(f, X)
    out = check_pass(g, P.constant_fold)
    assert live_ops(out) == live_ops(g)


# ---------------------------------------------------------------- optimize and backward graphs


# ---------------------------------------------------------------- centred sums


def _centred(x, axes=2):
    return x - x.mean(axes, keepdim=True)


CENTRED = [  # name, fn, live sums before and after zero_centred_sums (+ dce)
    ("c * (x - mean) over its axes", lambda x: (_centred(x) * x.amax(2, keepdim=True)).sum(2), 2, 0),
    ("-(d + d') over two axes", lambda x: (-(_centred(x, (1, 2)) + _centred(x, (1, 2)))).sum((1, 2)), 3, 0),
    ("the other terms stay", lambda x: (x.exp() - _centred(x) * 2.0 + x * x).sum(2), 2, 1),
    ("summed over other axes stays", lambda x: _centred(x).sum(1), 2, 2),
    ("a coefficient varying along the axes stays", lambda x: (_centred(x) * x).sum(2), 2, 2),
    ("x minus its sum stays", lambda x: (x - x.sum(2, keepdim=True)).sum(2), 2, 2),
]


@pytest.mark.parametrize("name, fn, before, after", CENTRED, ids=[c[0] for c in CENTRED])
def test_sums_of_centred_values_are_zero(name, fn, before, after):
    g = flame.trace(fn, X)
    out = P.dce(P.zero_centred_sums(g))
    assert live_ops(g)["sum"] == before and live_ops(out)["sum"] == after, flame.dump(out)
    f = feeds(g)
    for a, b in zip(run_graph(g, f), run_graph(out, f)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)   # a's centred sums: ~1e-7, not 0
    assert all(n.loc for n in out.nodes)


@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
def test_norm_backward_loses_the_variance_gradient_through_the_mean(norm):
    """The gradient equals the one computed with that zero sum, and the backward's row
    kernel makes one pass over its rows less (3 stages of reductions, not 4)."""
    import flame.nn.functional as F
    from flame.codegen.kernel import row_steps
    shape = (64, 768) if norm == "layer_norm" else (2, 64, 16, 16)   # rows the loss sum joins
    w = rng.standard_normal(shape).astype(np.float32)
    f = (lambda x: F.layer_norm(x, (768,))) if norm == "layer_norm" else (lambda x: F.group_norm(x, 32))
    fn = flame.value_and_grad(lambda x: (f(x) * flame.const(w)).sum())
    g = flame.trace(fn, flame.spec(shape))
    others = [p for p in P.DEFAULT_PASSES if p is not P.zero_centred_sums]
    feed = feeds(g)
    for a, b in zip(run_graph(P.optimize(g, others), feed), run_graph(P.optimize(g), feed)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)

    def stages(passes):
        s = flame.plan(fn, flame.spec(shape), backend="cuda", passes=passes)
        return max(sum(isinstance(st, list) for st in row_steps(d)) for d in s.descs.values())
    assert (stages(others), stages(None)) == (4, 3)


def test_optimize_runs_each_pass_in_order():
    seen = []
    g = flame.trace(lambda x: (x * 1.0).reshape(6, 4).reshape(24), X)
    out = P.optimize(g, after_each=lambda name, gr: seen.append((name, len(gr.nodes))))
    assert [s[0] for s in seen] == [p.__name__ for p in P.DEFAULT_PASSES]
    assert seen[-1][1] == len(out.nodes) == 1


class _Tiny(flame.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = flame.nn.Linear(4, 4)
        self.norm = flame.nn.LayerNorm(4)

    def forward(self, x):
        h = self.norm(self.fc(x))
        return (h.reshape(8, 2).reshape(2, 8) * 1.0).permute(1, 0).permute(1, 0)


def test_optimize_keeps_backward_rules_and_values_of_a_joint_graph():
    flame.manual_seed(int(rng.integers(1 << 30)))
    model = _Tiny()
    # weighted: mean(layer_norm(.)**2) is nearly constant, so its gradient would be rounding noise
    w = rng.standard_normal((2, 8)).astype(np.float32)
    fn = flame.value_and_grad(lambda x: (model(x) ** 2 * flame.const(w)).mean(), params=model)
    g = flame.trace(fn, flame.spec((4, 4)))
    f = {n.attrs["name"]: v for n, v in zip(g.inputs, [rng.standard_normal((4, 4)).astype(np.float32)])}
    f.update({k: p.data for k, p in g.params.items()})
    out = P.optimize(g)
    for a, b in zip(run_graph(g, f), run_graph(out, f)):
        assert_close(a, b)
    assert_origins(g, out)
    assert all(n.loc for n in out.nodes)
    assert {n.scope for n in out.nodes if n.rule is None} >= {"fc", "norm"}
    assert {n.scope for n in out.nodes if n.rule is not None} >= {"fc", "norm"}
    # the gradients are still computed by backward nodes, each tagged with its rule
    assert all(o.rule for o in out.outputs[1:])
    assert len(out.nodes) < len(g.nodes)


def test_saved_for_backward_of_exp_times_y():
    # d/dx sum(exp(x) * y) = y * exp(x): backward reads exp(x) (48 B) and y (16 B), not x*y
    def loss(x, y):
        return (x.exp() * y).sum()
    g = flame.trace(flame.value_and_grad(loss), flame.spec((3, 4)), flame.spec((4,)))
    for graph in (g, P.optimize(g)):
        saved = P.saved_for_backward(graph)
        got = [(n.op, n.attrs.get("name"), n.shape, b) for n, b in saved]
        assert got == [("exp", None, (3, 4), 48), ("input", "y", (4,), 16)]


def test_saved_for_backward_counts_dtype_bytes_and_skips_constants():
    # d/dx sum(sin(x) * 3) in f64: the cos rule reads x itself; the literal 3 is not saved
    g = flame.trace(flame.value_and_grad(lambda x: (x.sin() * 3.0).sum()), flame.spec((5,), "f64"))
    got = [(n.op, n.attrs.get("name"), b) for n, b in P.saved_for_backward(g)]
    assert got == [("input", "x", 40)]


# ---------------------------------------------------------------- property: optimize is exact

BLOCKS = [  # (x, earlier value) -> value of x's shape [2,3,4]
    lambda x, y: x * 1.0,
    lambda x, y: 0.0 + x,
    lambda x, y: -(-x),
    lambda x, y: x.tanh(),
    lambda x, y: x.sin() * y.sin(),          # sin(y) may repeat: CSE
    lambda x, y: x + y,
    lambda x, y: x.reshape(6, 4).reshape(2, 3, 4),
    lambda x, y: x.permute(2, 0, 1).permute(1, 2, 0),
    lambda x, y: x.permute(1, 0, 2).reshape(3, 8).reshape(3, 2, 4).permute(1, 0, 2),
    lambda x, y: x.cast("f64").cast("f32"),
    lambda x, y: x.cast("f16").cast("f32"),
    lambda x, y: x + (flame.const(np.linspace(-1, 1, 12, dtype=np.float32)).reshape(3, 4) * 2.0).exp(),
    lambda x, y: x.sum(-1, keepdim=True).expand(2, 3, 4) * 0.25,
    lambda x, y: x.detach() + y,
    lambda x, y: bind("expand", x, shape=x.shape),
    lambda x, y: x.transpose(0, 1).contiguous().transpose(0, 1) - 0.0,
]


def _composition(steps, with_grad):
    def f(x):
        vals = [x]
        for b, r in steps:
            vals.append(BLOCKS[b](vals[-1], vals[r % len(vals)]))
        return vals[-1], vals[len(vals) // 2]
    if not with_grad:
        return f
    # f traced twice: the second copy is for CSE to merge
    return flame.value_and_grad(lambda x: (f(x)[0] * f(x)[1]).sum())


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, len(BLOCKS) - 1), st.integers(0, 100)), min_size=1, max_size=6),
       with_grad=st.booleans())
def test_optimize_preserves_values_of_random_compositions(steps, with_grad):
    g = flame.trace(_composition(steps, with_grad), X)
    out = P.optimize(g)
    f = feeds(g)
    for a, b in zip(run_graph(g, f), run_graph(out, f)):
        assert_close(a, b)
    assert_origins(g, out)
    assert len(live(out)) <= len(live(g))
    assert len(out.nodes) == len(live(out))   # dce ran last
