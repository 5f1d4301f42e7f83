"""Tracing: run the user's Python once on symbolic Tensors and record a Graph.

Every op goes through `bind`, which checks the primitive's shape rule, and stamps the new node
with the current module scope and the user's source line (the first stack frame outside
flame's own package). A shape error is re-raised naming that line.
"""
from __future__ import annotations

import inspect
import os
import sys
from contextlib import contextmanager

import numpy as np

from . import dtypes as dt
from . import tree
from .errors import ShapeError, TraceError
from .graph import Graph, Node
from .primitives import PRIMS

_FLAME_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# flame's own code that a dump should not point at; the example models (flame/examples) and
# the command lines (flame/cli, e.g. flame-compile's --loss reduction) count as user code
_USER_SUBDIRS = tuple(os.path.join(_FLAME_DIR, d) + os.sep for d in ("examples", "cli"))


def _is_internal(filename: str) -> bool:
    fn = os.path.abspath(filename)
    return filename.startswith("<frozen") or \
        (fn.startswith(_FLAME_DIR + os.sep) and not fn.startswith(_USER_SUBDIRS))


class Spec:
    """A symbolic argument: a shape and a dtype, no data."""

    def __init__(self, shape, dtype="f32"):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dt.as_dtype(dtype)

    def __repr__(self):
        return f"spec({self.dtype.name}[{','.join(map(str, self.shape))}])"


def spec(shape, dtype="f32") -> Spec:
    return Spec(shape, dtype)


def spec_of(x) -> Spec:
    if isinstance(x, Spec):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return Spec(x.shape, dt.as_dtype(x.dtype))
    if isinstance(x, bool):
        return Spec((), dt.boolean)
    if isinstance(x, int):
        return Spec((), dt.i64)
    if isinstance(x, float):
        return Spec((), dt.f32)
    raise TypeError(f"cannot trace an argument of type {type(x).__name__}: pass a numpy array or flame.spec(shape, dtype)")


def user_location() -> str:
    """'path/to/file.py:LINE' of the innermost frame outside flame's internals."""
    f = sys._getframe(1)
    while f is not None:
        if not _is_internal(f.f_code.co_filename):
            fn = os.path.abspath(f.f_code.co_filename)
            try:
                # flame's own files read flame/examples/mlp.py wherever flame is installed
                rel = os.path.relpath(fn, os.path.dirname(_FLAME_DIR) if fn.startswith(_USER_SUBDIRS) else None)
                if not rel.startswith(".."):
                    fn = rel
            except ValueError:
                pass
            return f"{fn}:{f.f_lineno}"
        f = f.f_back
    return ""


class TraceContext:
    def __init__(self, name: str):
        self.name = name
        self.inputs: list[Node] = []
        self.nodes: list[Node] = []
        self.scope: list[str] = []
        self.rule: str | None = None
        self.rule_loc: str | None = None
        self.rule_scope: str | None = None
        self.params: dict[int, Node] = {}     # id(Parameter) -> input node
        self.param_objs: dict[int, object] = {}
        self.param_names: dict[int, str] = {}  # id(Parameter) -> state-dict name
        self.module_paths: dict[int, str] = {}  # id(Module) -> path from the called root
        self.rng_seed: Node | None = None
        self.rng_streams = 0

    # ---- inputs
    def add_input(self, name: str, s: Spec, kind: str = "arg") -> Node:
        if any(n.attrs["name"] == name for n in self.inputs):
            raise TraceError(f"two graph inputs are named {name!r}")
        n = Node("input", (), {"name": name, "kind": kind}, s.shape, s.dtype, "", "")
        self.inputs.append(n)
        return n

    def name_params(self, module, prefix: str = ""):
        for name, p in module.named_parameters():
            if id(p) not in self.param_names:
                full = f"{prefix}.{name}" if prefix else name
                self.param_names[id(p)] = full

    def param_node(self, p) -> Node:
        n = self.params.get(id(p))
        if n is None:
            name = self.param_names.get(id(p)) or f"param{len(self.params)}"
            taken = {i.attrs["name"] for i in self.inputs}
            base, k = name, 1
            while name in taken:
                k += 1
                name = f"{base}#{k}"
            n = self.add_input(name, Spec(p.shape, p.dtype), kind="param")
            self.params[id(p)] = n
            self.param_objs[id(p)] = p
        return n

    def seed_node(self) -> Node:
        if self.rng_seed is None:
            self.rng_seed = self.add_input("rng_seed", Spec((), dt.i64), kind="rng")
        return self.rng_seed

    @contextmanager
    def backward_rule(self, rule: str, scope: str, loc: str):
        saved = self.rule, self.rule_scope, self.rule_loc
        self.rule, self.rule_scope, self.rule_loc = rule, scope, loc
        try:
            yield
        finally:
            self.rule, self.rule_scope, self.rule_loc = saved


_stack: list[TraceContext] = []


def current() -> TraceContext:
    if not _stack:
        raise TraceError("this operation needs a trace: call it inside flame.trace / flame.compile")
    return _stack[-1]


def tracing() -> bool:
    return bool(_stack)


@contextmanager
def scope(name: str):
    """Module scope for the nodes created inside (Module.__call__ uses it)."""
    if not _stack:
        yield
        return
    ctx = _stack[-1]
    ctx.scope.append(name)
    try:
        yield
    finally:
        ctx.scope.pop()


def bind(op: str, *inputs, **attrs):
    """Create node `op(inputs; attrs)` in the current trace and return its Tensor."""
    from .tensor import Tensor
    ctx = current()
    prim = PRIMS[op]
    nodes = [x.node for x in inputs]
    try:
        shape, dtype = prim.shape(attrs, *nodes)
    except ShapeError as e:
        loc = ctx.rule_loc if ctx.rule else user_location()
        where = f" (backward rule {ctx.rule})" if ctx.rule else ""
        msg = str(e) if str(e).startswith(op) else f"{op}: {e}"   # "matmul of ...", not "matmul: matmul of ..."
        raise ShapeError(f"{loc}: {msg}{where}") from None
    if ctx.rule is not None:
        sc, loc = ctx.rule_scope, ctx.rule_loc
    else:
        sc, loc = ".".join(s for s in ctx.scope if s), user_location()
    n = Node(op, nodes, attrs, shape, dtype, sc, loc, ctx.rule)
    ctx.nodes.append(n)
    return Tensor(n)


def arg_names(fn, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params]
        star = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.VAR_POSITIONAL]
    except (TypeError, ValueError):
        names, star = [], []
    out = []
    for i in range(n):
        out.append(names[i] if i < len(names) else f"{star[0] if star else 'arg'}{i}")
    return out


def trace(fn, *args, name: str | None = None) -> Graph:
    """Trace `fn(*args)`; args are (pytrees of) numpy arrays, flame.spec(...) or scalars."""
    from .tensor import Tensor
    from ..nn.module import Module
    ctx = TraceContext(name or getattr(fn, "__name__", None) or type(fn).__name__)
    if isinstance(fn, Module):
        ctx.name_params(fn)
    names = arg_names(fn.forward if isinstance(fn, Module) else fn, len(args))
    targs = []
    for a, nm in zip(args, names):
        leaves, td, paths = tree.flatten(a)
        ts = [Tensor(ctx.add_input(f"{nm}.{p}" if p else nm, spec_of(v))) for v, p in zip(leaves, paths)]
        targs.append(tree.unflatten(td, ts))
    _stack.append(ctx)
    try:
        out = fn(*targs)
        leaves, td, _ = tree.flatten(out)
        outs, onames = [], []
        for v in leaves:
            if not isinstance(v, Tensor):
                v = Tensor.const(np.asarray(v))
            outs.append(v.node)
            onames.append(v.name_hint)
    finally:
        _stack.pop()
    params = {ctx.params[k].attrs["name"]: ctx.param_objs[k] for k in ctx.params}
    return Graph(ctx.name, ctx.inputs, ctx.nodes, outs, onames, td, params)
