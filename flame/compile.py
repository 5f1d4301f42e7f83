"""flame.compile: trace once, optimise, and return a callable on numpy arrays."""
from __future__ import annotations

import numpy as np

from .ir import tree
from .ir.interp import run_graph
from .ir.passes import optimize
from .ir.tracer import trace

BACKENDS = ("interp", "cpu", "cuda")


class Compiled:
    """Call with the same argument structure as at trace time; returns numpy arrays shaped
    like the traced function's return value. Parameters are read from their Parameter
    objects at every call, so updating `p.data` between calls needs no recompilation."""

    def __init__(self, graph, backend, options=None):
        self.graph = graph
        self.backend = backend
        if backend == "cpu":
            from .runtime.cpu import CpuRunner
            self.runner = CpuRunner(graph)
            self._run = self.runner.run
        elif backend == "cuda":
            from .runtime.cuda import CudaRunner
            self.runner = CudaRunner(graph, **(options or {}))
            self._run = self.runner.run
        else:
            self.runner = None
            self._run = lambda feeds: run_graph(graph, feeds)
        self._arg_inputs = [n for n in graph.inputs if n.attrs["kind"] == "arg"]

    def feeds(self, args, seed=0):
        leaves = []
        for a in args:
            leaves += tree.flatten(a)[0]
        if len(leaves) != len(self._arg_inputs):
            raise TypeError(f"{self.graph.name}: expected {len(self._arg_inputs)} array arguments, got {len(leaves)}")
        feeds = {n.attrs["name"]: v for n, v in zip(self._arg_inputs, leaves)}
        for name, p in self.graph.params.items():
            feeds[name] = p.data
        for n in self.graph.inputs:
            if n.attrs["kind"] == "rng":
                feeds[n.attrs["name"]] = np.asarray(seed, np.int64)
        return feeds

    def __call__(self, *args, seed=0):
        outs = self._run(self.feeds(args, seed))
        return tree.unflatten(self.graph.out_tree, outs)


def compile(fn, *args, backend="interp", passes=None, options=None):
    """Trace fn on args (arrays or flame.spec) and return a Compiled callable.
    options: backend settings (cuda: block, tf32, use_graph)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    graph = optimize(trace(fn, *args), passes)
    return Compiled(graph, backend, options)
