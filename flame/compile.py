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
    objects at every call, so updating `p.data` between calls needs no recompilation (the
    CUDA backend uploads a parameter again only when its data changed).

    With param_updates=True the function returns (result, {param name: new value}); a call
    returns only result and writes the new values into the parameters — on the GPU, device
    to device inside the captured step, so they stay resident between steps."""

    def __init__(self, graph, backend, options=None, param_updates=False):
        self.graph = graph
        self.backend = backend
        self.param_updates = {}
        if param_updates:
            self.param_updates = self._update_outputs(graph)
        options = dict(options or {})
        if backend == "cuda":
            options["updates"] = {i: graph.input_by_name(n).id for i, n in self.param_updates.items()}
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
            # the CUDA runner takes the Parameter itself and uploads only what changed
            feeds[name] = p if self.backend == "cuda" else p.data
        for n in self.graph.inputs:
            if n.attrs["kind"] == "rng":
                feeds[n.attrs["name"]] = np.asarray(seed, np.int64)
        return feeds

    def _update_outputs(self, graph) -> dict:
        """flat output index -> parameter name, from the (result, {name: value}) return."""
        kind, sub = graph.out_tree
        if kind is not tuple or len(sub) != 2 or sub[1][0] is not dict:
            raise TypeError(f"{graph.name}: with param_updates=True the function must return "
                            "(result, {parameter name: new value})")
        self._n_result = tree.count_leaves(sub[0])
        out = {}
        for j, (name, d) in enumerate(sub[1][1]):
            if name not in graph.params or tree.count_leaves(d) != 1:
                raise KeyError(f"{graph.name}: update for {name!r}, which is not a parameter of "
                               f"this step (parameters: {', '.join(graph.params)})")
            out[self._n_result + j] = name
        return out

    def __call__(self, *args, seed=0):
        outs = self._run(self.feeds(args, seed))
        if not self.param_updates:
            return tree.unflatten(self.graph.out_tree, outs)
        for i, name in self.param_updates.items():
            p = self.graph.params[name]
            if self.backend == "cuda":
                self.runner.adopt_param(p, self.graph.input_by_name(name).id)
            else:
                p.data = np.asarray(outs[i]).astype(p.data.dtype, copy=False)
        return tree.unflatten(self.graph.out_tree[1][0], outs[:self._n_result])


def compile(fn, *args, backend="interp", passes=None, options=None, param_updates=False):
    """Trace fn on args (arrays or flame.spec) and return a Compiled callable.
    options: backend settings (cuda: block, tf32, use_graph). param_updates: see Compiled."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    graph = optimize(trace(fn, *args), passes)
    return Compiled(graph, backend, options, param_updates)


def plan(fn, *args, backend="cpu", passes=None, options=None):
    """What compile(fn, *args, backend=...) would run, without generating or compiling any
    kernel: the Schedule (its fused kernels, and .plan with the arena's peak bytes) that the
    backend's runner builds from the same traced and optimised graph. For dry runs."""
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"plan: backend must be 'cpu' or 'cuda', not {backend!r}")
    from .codegen.schedule import make_schedule
    from .runtime import cpu, cuda
    graph = optimize(trace(fn, *args), passes)
    block = int((options or {}).get("block", cuda.BLOCK)) if backend == "cuda" else cpu.BLOCK
    return make_schedule(graph, backend, block)
