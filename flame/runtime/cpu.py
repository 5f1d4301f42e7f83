"""The CPU backend: fused kernels rendered as Numba CPU source, numpy's BLAS for matmul and
conv (via the reference implementations), all buffers views into one planned arena.

With target="cuda-sim" the same runner renders the CUDA source instead and launches it on
the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1 must be set before numba.cuda is first
imported): that is how CI runs every fusion class's CUDA code without a GPU."""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from ..codegen.cache import load
from ..codegen.fusion import is_literal
from ..codegen.schedule import make_schedule
from ..ir import dtypes as dt
from ..ir.graph import Graph
from ..ir.primitives import PRIMS


def _library(node):
    """numpy implementation writing into `out` (a view of the arena). bf16 operands are
    computed in float32 and rounded once into the bf16 output, as cuBLAS does."""
    op, a = node.op, node.attrs
    if any(i.dtype is dt.bf16 for i in node.inputs) and op != "gather":
        impl = PRIMS[op].impl

        def run(out, *xs):
            out[...] = impl(a, *[x.astype(np.float32) if x.dtype == dt.bf16.np else x for x in xs])
        return run
    if op == "matmul":
        def run(out, x, y):
            np.matmul(np.swapaxes(x, -1, -2) if a["ta"] else x,
                      np.swapaxes(y, -1, -2) if a["tb"] else y, out=out)
    elif op == "gather":
        def run(out, t, i):
            np.take(t, i, axis=0, out=out)
    else:   # conv2d and its gradients, scatter_add: the reference implementation (BLAS inside)
        impl = PRIMS[op].impl

        def run(out, *xs):
            out[...] = impl(a, *xs)
    return run


BLOCK = 64   # threads per row block of the cuda-sim target (the cpu target's loops ignore it)


class CpuRunner:
    def __init__(self, graph: Graph, target: str = "cpu", block: int = BLOCK):
        sched = make_schedule(graph, target, block)
        self.schedule = sched
        self.graph, self.kernels, self.plan = sched.graph, sched.kernels, sched.plan
        self.target = target
        self.block = block
        self.steps = []
        self.sources = {}
        self.nodes = {n.id: n for n in self.graph.all_nodes()}
        for k in self.kernels:
            if not sched.runs(k):
                continue    # a reshape of a buffer: same bytes, nothing to run
            if k.kind == "L":
                self.steps.append((k, _library(k.root), [i.id for i in k.root.inputs], [k.root.id]))
            else:
                d = sched.descs[k.root.id]
                src = sched.source(k)
                # kernels that differ only in their unique suffix (R_sum_7 and R_sum_12) share
                # one module and one Numba compilation: a UNet step has ~1800 kernels but only
                # ~300 distinct ones
                base = k.base_name
                canon = src.replace(f"def {k.name}(", f"def {base}(")
                if target == "cpu":
                    fn = load(base, canon, "cpu")
                else:
                    from ..codegen import cuda as cuda_render
                    grid, blk = cuda_render.launch_dims(d, block)
                    fn = load(base, canon, "cuda-sim")[grid, blk]
                self.sources[k.name] = src
                self.steps.append((k, fn, [p[1].id for p in d.params if p[2] == "read"],
                                   [p[1].id for p in d.params if p[2] == "write"]))
        self.arena = np.empty(max(self.plan.peak, 1), np.uint8)

    def view(self, nid, flat=False):
        n = self.nodes[nid]
        off = self.plan.offsets[nid]
        v = self.arena[off: off + n.nbytes].view(n.dtype.np)
        if flat and n.dtype is dt.bf16:
            return v.view(np.uint16)   # kernels see bf16 as its bits
        return v if flat else v.reshape(n.shape)

    def run(self, feeds: dict) -> list:
        g = self.graph
        for n in g.inputs:
            v = np.asarray(feeds[n.attrs["name"]])
            if v.shape != n.shape:
                raise ValueError(f"input {n.attrs['name']!r}: expected shape {list(n.shape)}, got {list(v.shape)}")
            self.view(n.id)[...] = v
        for n in g.nodes:
            if n.op == "const" and n.id in self.plan.offsets:
                self.view(n.id)[...] = n.attrs["value"]
        # BLAS's own threads spin between calls and fight the parallel Numba kernels that run
        # in between for the same cores (measured on 2 cores: a 41 us kernel took 6.7 ms, the
        # quickstart step 2.4x slower), so library calls run single-threaded here.
        with threadpool_limits(1, user_api="blas"):
            for k, fn, reads, out in self.steps:
                if k.kind == "L":
                    fn(self.view(out[0]), *[self.view(r) for r in reads])
                else:
                    fn(*[self.view(r, flat=True) for r in reads], *[self.view(o, flat=True) for o in out])
        outs = []
        for o in g.outputs:
            if is_literal(o) or (o.op == "const" and o.id not in self.plan.offsets):
                outs.append(np.array(o.attrs["value"]))
            else:
                outs.append(self.view(o.id).copy())
        return outs
