"""Reverse-mode autodiff on the traced graph, from the per-op VJP rules alone.

`backward` walks the nodes between the inputs we differentiate with respect to and the
output, newest first, asks each primitive's rule for its inputs' cotangents, and sums them.
The rules emit ordinary IR into the same trace, tagged with the rule's name (`mul.rhs`) and
the forward node's scope and source line. Broadcasting is undone here, in `unbroadcast`,
and nowhere else.
"""
from __future__ import annotations

import numpy as np

from .errors import ShapeError, TraceError
from .primitives import PRIMS
from .tensor import Tensor
from .tracer import current, tracing, user_location


def unbroadcast(g: Tensor, shape: tuple) -> Tensor:
    """Sum g over the axes that broadcasting added or stretched, giving `shape`."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape)
                                      if s == 1 and g.shape[lead + i] != 1)
    out = g.sum(axes) if axes else g
    return out.reshape(tuple(shape))


def backward(out: Tensor, wrt: list, seed: Tensor | None = None) -> list:
    """Cotangents of `out` with respect to each Tensor in `wrt` (None where none flows)."""
    ctx = current()
    wrt_ids = {w.node.id for w in wrt}
    # forward reach: nodes that depend on something in wrt
    depends = set(wrt_ids)
    for n in ctx.nodes:
        if any(i.id in depends for i in n.inputs):
            depends.add(n.id)
    if out.node.id not in depends:
        return [None] * len(wrt)
    if seed is None:
        if out.shape != ():
            raise ShapeError(f"{user_location()}: gradient of a non-scalar output "
                             f"{out.node.type_str}: reduce it to a scalar first (e.g. .sum() or .mean())")
        if not out.dtype.is_float:
            raise ShapeError(f"{user_location()}: gradient of a {out.dtype.name} output: it must be floating point")
        seed = Tensor.const(np.asarray(1.0, out.dtype.np))
    cts = {out.node.id: seed}
    order = [n for n in ctx.nodes if n.id in depends]
    stop = order.index(out.node) if out.node in order else len(order) - 1
    for node in reversed(order[:stop + 1]):
        g = cts.pop(node.id, None)
        if g is None:
            continue
        prim = PRIMS[node.op]
        xs = [Tensor(i) for i in node.inputs]
        for i, x in enumerate(node.inputs):
            if x.id not in depends or not x.dtype.is_float:
                continue
            rule = prim.vjp if prim.variadic else prim.vjp[i]
            if rule is None:
                continue
            name = prim.rule_name(i)
            with ctx.backward_rule(name, node.scope, node.loc):
                gi = rule(i, g, *xs, Tensor(node), node.attrs) if prim.variadic else \
                    rule(g, *xs, Tensor(node), node.attrs)
                if gi is None:
                    continue
                gi = unbroadcast(gi, x.shape).cast(x.dtype)
                if x.id in cts:
                    with ctx.backward_rule("accumulate", node.scope, node.loc):
                        gi = cts[x.id] + gi
            cts[x.id] = gi
    return [cts.get(w.node.id) for w in wrt]


_ARGNUMS_DEFAULT = object()


def _param_list(params):
    from ..nn.module import Module, Parameter
    if params is None:
        return None, None
    if isinstance(params, Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        return [p for _, p in named], [n for n, _ in named]
    if isinstance(params, Parameter):
        return [params], None
    if isinstance(params, dict):
        return list(params.values()), list(params.keys())
    return list(params), None


def value_and_grad(fn, argnums=_ARGNUMS_DEFAULT, params=None, has_aux=False):
    """JAX-style: returns f(*args) -> (value, grads).

    grads follows argnums (an int gives one gradient, a tuple a tuple). With `params` (a
    Module, a list or dict of Parameters) and no argnums, grads are the parameters'
    gradients (a dict name -> grad for a Module or dict, else a list); with both, grads is
    (arg_grads, param_grads). With has_aux, fn returns (value, aux) and the result is
    ((value, aux), grads). Inside a trace this differentiates inline; outside, it traces,
    runs the reference interpreter and returns numpy arrays."""
    if argnums is _ARGNUMS_DEFAULT:
        argnums = None if params is not None else 0

    def wrapped(*args):
        if not tracing():
            from ..compile import compile as flame_compile
            return flame_compile(wrapped, *args, backend="interp")(*args)
        ctx = current()
        plist, pnames = _param_list(params)
        nums = () if argnums is None else ((argnums,) if isinstance(argnums, int) else tuple(argnums))
        for k in nums:
            if not isinstance(args[k], Tensor):
                raise TraceError(f"value_and_grad: argument {k} is not a Tensor")
        out = fn(*args)
        value, aux = (out[0], out[1]) if has_aux else (out, None)
        if not isinstance(value, Tensor):
            raise TraceError("value_and_grad: the function must return a Tensor"
                             + (" (and aux)" if has_aux else ""))
        wrt = [args[k] for k in nums]
        ptensors = [Tensor(ctx.param_node(p)) for p in (plist or [])]
        grads = backward(value, wrt + ptensors)
        full = []
        for w, gr in zip(wrt + ptensors, grads):
            if gr is None:
                gr = Tensor.const(np.zeros((), w.dtype.np)).expand(w.shape)
            gr.name_hint = "g" + w.node.attrs["name"] if w.node.op == "input" else None
            full.append(gr)
        arg_g, par_g = full[:len(wrt)], full[len(wrt):]
        arg_out = arg_g[0] if isinstance(argnums, int) else tuple(arg_g)
        if pnames is not None:
            par_out = dict(zip(pnames, par_g))
        else:
            par_out = par_g
        if argnums is None:
            g = par_out
        elif params is None:
            g = arg_out
        else:
            g = (arg_out, par_out)
        if value.name_hint is None:
            value.name_hint = "value"
        return ((value, aux) if has_aux else value), g

    wrapped.__name__ = getattr(fn, "__name__", "fn")
    wrapped.__wrapped__ = fn
    return wrapped


def grad(fn, argnums=_ARGNUMS_DEFAULT, params=None):
    vg = value_and_grad(fn, argnums, params)

    def wrapped(*args):
        return vg(*args)[1]
    wrapped.__name__ = getattr(fn, "__name__", "fn")
    return wrapped
