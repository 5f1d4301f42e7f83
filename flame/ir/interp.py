"""The reference interpreter: evaluates a Graph node by node with the table's numpy impls.

It is the oracle every other backend is tested against. f16/bf16 nodes are computed in
float32 and rounded to their storage type, as the generated kernels do.
"""
from __future__ import annotations

import numpy as np

from . import dtypes as dt
from .graph import Graph
from .primitives import PRIMS

_LOW = (dt.f16, dt.bf16)


def _compute(a):
    return a.astype(np.float32) if a.dtype in (dt.f16.np, dt.bf16.np) else a


def run_graph(graph: Graph, feeds: dict) -> list:
    """feeds: input name -> numpy array. Returns the output arrays in order."""
    env = {}
    for n in graph.inputs:
        name = n.attrs["name"]
        if name not in feeds:
            raise KeyError(f"no value given for graph input {name!r}")
        v = np.asarray(feeds[name])
        if v.shape != n.shape:
            raise ValueError(f"input {name!r}: expected shape {list(n.shape)}, got {list(v.shape)}")
        env[n.id] = v.astype(n.dtype.np, copy=False)
    with np.errstate(all="ignore"):
        for n in graph.nodes:
            args = [_compute(env[i.id]) for i in n.inputs]
            out = PRIMS[n.op].impl(n.attrs, *args)
            out = np.asarray(out)
            if out.dtype != n.dtype.np:
                out = out.astype(n.dtype.np)
            if out.shape != n.shape:
                raise AssertionError(f"interp: {n.op} produced {out.shape}, rule said {n.shape}")
            env[n.id] = out
    return [env[o.id] for o in graph.outputs]
