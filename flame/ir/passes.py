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


DEFAULT_PASSES = (simplify, constant_fold, cse, simplify, dce)


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
