"""Graph -> Graph passes. Each is a plain function, runnable alone and dumpable after it runs.
Nodes a pass creates in place of others keep the scope, source line and rule of the node
they replace."""
from __future__ import annotations

import numpy as np

from .graph import Graph, Node, clone_node
from .interp import _compute
from .primitives import PRIMS, attrs_key


def _rewrite(graph: Graph, visit) -> Graph:
    """Rebuild the graph node by node. visit(node, emit) returns the node to use instead
    (itself, an earlier node, or one made with emit(op, inputs, attrs, like))."""
    mapping = {}
    out = []

    def emit(op, inputs, attrs, like):
        shape, dtype = PRIMS[op].shape(attrs, *inputs)
        n = Node(op, inputs, attrs, shape, dtype, like.scope, like.loc, like.rule)
        out.append(n)
        return n

    for n in graph.nodes:
        ins = [mapping.get(i.id, i) for i in n.inputs]
        m = n if all(a is b for a, b in zip(ins, n.inputs)) else clone_node(n, ins)
        r = visit(m, emit)
        if r is m:
            out.append(m)
        mapping[n.id] = r
    outputs = [mapping.get(o.id, o) for o in graph.outputs]
    return graph.replace(nodes=out, outputs=outputs)


# ---------------------------------------------------------------- dead code


def dce(graph: Graph) -> Graph:
    """Drop nodes no output depends on."""
    live = {o.id for o in graph.outputs}
    for n in reversed(graph.nodes):
        if n.id in live:
            live.update(i.id for i in n.inputs)
    return graph.replace(nodes=[n for n in graph.nodes if n.id in live])


# ---------------------------------------------------------------- common subexpressions


def cse(graph: Graph) -> Graph:
    """Merge nodes with the same op, inputs and attributes (the first one stays)."""
    seen = {}

    def visit(n, emit):
        key = (n.op, tuple(i.id for i in n.inputs), attrs_key(n.attrs), n.dtype.name, n.shape)
        return seen.setdefault(key, n)
    return _rewrite(graph, visit)


# ---------------------------------------------------------------- constant folding

FOLD_LIMIT = 4096  # elements: bigger results stay as ops (an expand of a scalar stays lazy)


def constant_fold(graph: Graph) -> Graph:
    """Evaluate ops whose inputs are all constants, when the result is small."""
    def visit(n, emit):
        if n.op == "const" or not n.inputs or PRIMS[n.op].kind == "random" or n.size > FOLD_LIMIT:
            return n
        if not all(i.op == "const" for i in n.inputs):
            return n
        if n.size > max(i.size for i in n.inputs):
            return n   # expand/pad/upsample of a constant: a bigger literal helps nobody
        with np.errstate(all="ignore"):
            v = np.asarray(PRIMS[n.op].impl(n.attrs, *[_compute(i.attrs["value"]) for i in n.inputs]))
        v = np.array(v, dtype=n.dtype.np, order="C")
        v.flags.writeable = False
        return emit("const", (), {"value": v, "dtype": n.dtype}, n)
    return _rewrite(graph, visit)


# ---------------------------------------------------------------- algebraic simplification


def _is_const(n: Node, value) -> bool:
    return n.op == "const" and bool(np.all(n.attrs["value"] == value))


def simplify(graph: Graph) -> Graph:
    """Identities (x+0, x*1, x/1, --x), no-op movement and casts, and chains of
    reshape / permute / expand collapsed into one."""
    def visit(n, emit):
        op, ins, a = n.op, n.inputs, n.attrs
        same = lambda x: x.shape == n.shape and x.dtype is n.dtype
        if op in ("add", "sub") and _is_const(ins[1], 0) and same(ins[0]):
            return ins[0]
        if op == "add" and _is_const(ins[0], 0) and same(ins[1]):
            return ins[1]
        if op in ("mul", "div") and _is_const(ins[1], 1) and same(ins[0]):
            return ins[0]
        if op == "mul" and _is_const(ins[0], 1) and same(ins[1]):
            return ins[1]
        if op == "neg" and ins[0].op == "neg":
            return ins[0].inputs[0]
        if op == "stop_gradient":
            return ins[0]   # autodiff has run: it is an identity now
        if op in ("reshape", "expand", "permute", "slice", "pad", "cast", "sum") and same(ins[0]) \
                and (op != "sum" or not a["axes"] or all(ins[0].shape[i] == 1 for i in a["axes"])) \
                and (op != "permute" or a["perm"] == tuple(range(n.ndim))):
            return ins[0]
        if op == "reshape" and ins[0].op in ("reshape",):
            src = ins[0].inputs[0]
            return src if src.shape == n.shape else emit("reshape", (src,), a, n)
        if op == "permute" and ins[0].op == "permute":
            inner = ins[0].attrs["perm"]
            perm = tuple(inner[p] for p in a["perm"])
            src = ins[0].inputs[0]
            return src if perm == tuple(range(n.ndim)) else emit("permute", (src,), {"perm": perm}, n)
        if op == "expand" and ins[0].op == "expand":
            return emit("expand", (ins[0].inputs[0],), a, n)
        if op == "cast" and ins[0].op == "cast" and ins[0].inputs[0].dtype is n.dtype \
                and ins[0].dtype.itemsize > n.dtype.itemsize and ins[0].dtype.is_float and n.dtype.is_float:
            return ins[0].inputs[0]   # widening then narrowing back is exact (f16<->bf16 is not)
        return n
    return _rewrite(graph, visit)


# ---------------------------------------------------------------- sums of centred values


def _strip_expand(n: Node) -> Node:
    return n.inputs[0] if n.op == "expand" else n


def mean_sum(m: Node):
    """The sum when m is sum(x, axes, keepdims=True) * (1 / count), a mean as Tensor.mean
    builds it (codegen.kernel.squared_deviations reads it too); else None."""
    if m.op != "mul":
        return None
    for s, c in (m.inputs, m.inputs[::-1]):
        if s.op == "sum" and s.attrs["axes"] and s.attrs["keepdims"] and c.op == "const" and c.size == 1:
            count = int(np.prod([s.inputs[0].shape[a] for a in s.attrs["axes"]]))
            if np.isclose(float(np.asarray(c.attrs["value"]).reshape(())), 1.0 / count, rtol=1e-6, atol=0):
                return s
    return None


def _mean_axes(m: Node, x: Node):
    """The axes when m is mean(x, axes), maybe expanded."""
    s = mean_sum(_strip_expand(m))
    return tuple(s.attrs["axes"]) if s is not None and s.inputs[0] is x else None


def _centred_axes(n: Node):
    """The axes when n is x - mean(x, axes)."""
    return _mean_axes(n.inputs[1], n.inputs[0]) if n.op == "sub" and n.inputs[0].shape == n.shape else None


def _constant_along(n: Node, rank: int, axes: tuple) -> bool:
    """n, broadcast to rank dimensions, has one value along each of `axes`."""
    n = _strip_expand(n)
    shape = (1,) * (rank - n.ndim) + tuple(n.shape)
    return all(shape[a] == 1 for a in axes)


def _linear_in_centred(n: Node, shape: tuple, axes: tuple, memo: dict) -> bool:
    """n is a sum of terms c * (x - mean(x, axes)) with every c constant along axes."""
    if n.id in memo:
        return memo[n.id]
    ok = False
    if n.shape == shape:
        a = n.inputs
        if n.op == "sub" and _centred_axes(n) == axes:
            ok = True
        elif n.op == "neg":
            ok = _linear_in_centred(a[0], shape, axes, memo)
        elif n.op in ("add", "sub"):
            ok = all(_linear_in_centred(i, shape, axes, memo) for i in a)
        elif n.op == "mul":
            ok = any(_linear_in_centred(a[i], shape, axes, memo) and _constant_along(a[1 - i], len(shape), axes)
                     for i in (0, 1))
    memo[n.id] = ok
    return ok


def _terms(n: Node, shape: tuple, sign: int = 1) -> list:
    """n as a signed sum of terms [(node, +1 | -1)], through add, sub and neg of its shape."""
    if n.shape == shape and n.op == "add":
        return _terms(n.inputs[0], shape, sign) + _terms(n.inputs[1], shape, sign)
    if n.shape == shape and n.op == "sub" and _centred_axes(n) is None:
        return _terms(n.inputs[0], shape, sign) + _terms(n.inputs[1], shape, -sign)
    if n.shape == shape and n.op == "neg":
        return _terms(n.inputs[0], shape, -sign)
    return [(n, sign)]


def zero_centred_sums(graph: Graph) -> Graph:
    """sum(c * (x - mean(x, axes)), axes) is zero when c is constant along the axes (the
    centred values sum to zero). A sum over such terms and others keeps only the others:
    the variance's gradient through the mean in layer_norm's and group_norm's backward is
    such a term, and with it gone group_norm's backward makes one pass over its rows less."""
    def visit(n, emit):
        if n.op != "sum" or not n.attrs["axes"] or not n.dtype.is_float:
            return n
        x, axes, memo = n.inputs[0], tuple(n.attrs["axes"]), {}
        terms = _terms(x, x.shape)
        keep = [(t, sign) for t, sign in terms if not _linear_in_centred(t, x.shape, axes, memo)]
        if len(keep) == len(terms):
            return n
        if not keep:
            if n.size <= FOLD_LIMIT:
                return emit("const", (), {"value": np.zeros(n.shape, n.dtype.np), "dtype": n.dtype}, n)
            zero = emit("const", (), {"value": np.zeros((), n.dtype.np), "dtype": n.dtype}, n)
            return emit("expand", (zero,), {"shape": n.shape}, n)
        acc, sign = keep[0]
        for t, s in keep[1:]:
            acc = emit("add" if s == sign else "sub", (acc, t), {}, n)
        if sign < 0:
            acc = emit("neg", (acc,), {}, n)
        return emit("sum", (acc,), n.attrs, n)
    return _rewrite(graph, visit)


DEFAULT_PASSES = (simplify, zero_centred_sums, constant_fold, cse, simplify, dce)


def optimize(graph: Graph, passes=None, after_each=None) -> Graph:
    """Run passes in order; after_each(name, graph) sees the graph after every pass."""
    for p in (DEFAULT_PASSES if passes is None else passes):
        graph = p(graph)
        if after_each is not None:
            after_each(p.__name__, graph)
    return graph


# ---------------------------------------------------------------- reports


def saved_for_backward(graph: Graph) -> list:
    """Forward values (not constants) that backward nodes read: [(node, bytes)], largest first."""
    fwd = {n.id: n for n in graph.all_nodes() if n.rule is None and n.op != "const"}
    saved = {}
    for n in graph.nodes:
        if n.rule is not None:
            for i in n.inputs:
                if i.id in fwd:
                    saved[i.id] = fwd[i.id]
    return sorted(((n, n.nbytes) for n in saved.values()), key=lambda t: -t[1])
