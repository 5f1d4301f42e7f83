"""Fusion: partition a graph's nodes into kernels.

A kernel is a root node plus the producers it computes inline. Producers are absorbed by
small named rules, each of which can be switched off (`RULES[name] = False`), and every
producer that is not absorbed gets a logged reason. The rules:

- elementwise_chain: an elementwise producer whose every user is in the kernel.
- reduce_prologue:   the same, into a kernel that reduces (sum(x*x) is one kernel).
- row_reduction:     a reduction whose broadcast consumers run over the same rows
                     (softmax, layer_norm: the reductions and the normalisation, one kernel).
- movement_fold:     reshape/permute/expand/slice/pad/concat/upsample become index
                     arithmetic in the loads of their consumer, never copies.
- multi_output:      kernels over the same rows join into one that stores several values
                     (codegen/merge.py): a value another kernel also needs no longer ends
                     a kernel, so softmax/layer_norm/group_norm backward are one row kernel.
- gemm_epilogue:     bias/activation/residual after a matmul or conv: the GEMM stays a
                     library call and the whole epilogue is one elementwise kernel that the
                     memory plan runs in place on the GEMM's output (runtime/arena.py).

Library ops (matmul, conv, gather, scatter) run as BLAS/cuBLAS or library calls, one each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.graph import Graph, Node

RULES = {"elementwise_chain": True, "reduce_prologue": True, "row_reduction": True,
         "movement_fold": True, "gemm_epilogue": True, "multi_output": True}

LIBRARY_OPS = {"matmul", "conv2d", "conv2d_input_grad", "conv2d_weight_grad", "gather", "scatter_add"}
MOVEMENT_OPS = {"reshape", "permute", "expand", "slice", "pad", "concat", "upsample_nearest"}
REDUCE_OPS = {"sum", "max"}


def is_literal(n: Node) -> bool:
    return n.op == "const" and n.shape == ()


def is_pointwise(n: Node) -> bool:
    """Computed per element from its inputs at the same (broadcast) position."""
    return n.op not in LIBRARY_OPS and n.op not in MOVEMENT_OPS and n.op not in REDUCE_OPS \
        and n.op not in ("input", "const")


@dataclass
class Kernel:
    root: Node
    nodes: list                    # members in topological order (root last)
    kind: str                      # "E" elementwise, "R" reduce/row, "L" library call
    full: tuple = ()               # iteration space
    raxes: tuple = ()              # reduced axes of the iteration space (R kernels)
    fused: list = field(default_factory=list)     # (node, rule) absorbed
    refused: list = field(default_factory=list)   # (node, reason) not absorbed
    name: str = ""                 # unique in the schedule: base_name plus _1, _2, ... for repeats
    base_name: str = ""            # what it fuses (R_sum_mul_sub)
    store: Node = None             # the node whose values are written (root minus reshapes)
    chain: set = field(default_factory=set)   # ids of those reshapes, root included
    extra: list = field(default_factory=list)  # (root, store, chain) of more values it writes
    merged: list = field(default_factory=list)  # roots of the kernels multi_output joined in

    def out_nodes(self):
        """Every node whose buffer this kernel writes, its root first."""
        return [self.root] + [e[0] for e in self.extra]

    @property
    def member_ids(self):
        return {n.id for n in self.nodes}

    def reads(self):
        """Materialized nodes this kernel loads (inputs, other kernels' roots, big consts)."""
        ids, out = self.member_ids, []
        for n in self.nodes:
            for i in n.inputs:
                if i.id not in ids and not is_literal(i) and i not in out:
                    out.append(i)
        return out


def _red_shape(full, raxes):
    return tuple(1 if d in raxes else s for d, s in enumerate(full))


def _row_safe(k: Kernel, members: set, p: Node, users: dict) -> str | None:
    """A reduction can join a row kernel only if everything downstream of it inside the
    kernel is pointwise at the full or per-row shape (so it is evaluated at row coords)."""
    red = _red_shape(k.full, k.raxes)
    stack, seen = [p], set()
    while stack:
        n = stack.pop()
        for u in users[n.id]:
            if u.id not in members or u.id in seen:
                continue
            seen.add(u.id)
            if u.id in k.chain:      # the reshapes after the stored node: only a rename
                continue
            if u.op in REDUCE_OPS:   # a later reduction over the same rows (already admitted)
                stack.append(u)
                continue
            if not is_pointwise(u) or u.shape not in (k.full, red):
                return f"{u.op} %{u.id} between it and the kernel's output is not pointwise over the rows"
            stack.append(u)
    if k.store.op in REDUCE_OPS:
        return None
    if k.store.shape not in (k.full, red):
        return "the kernel's output is not shaped like its rows"
    return None


def _try_absorb(k: Kernel, members: set, p: Node, users: dict):
    """(rule, None) if producer p can be computed inside kernel k, else (None, reason)."""
    if p.op == "input":
        return None, "graph input"
    if p.op in LIBRARY_OPS:
        if k.kind == "E" and RULES["gemm_epilogue"]:
            return None, (f"{p.op} runs as a library call (cuBLAS/BLAS); this epilogue is one kernel "
                          "after it, in place on its output when that buffer dies here")
        return None, f"{p.op} runs as a library call"
    outside = [u for u in users[p.id] if u.id not in members]
    if outside:
        return None, f"%{p.id} is also used by {outside[0].op} %{outside[0].id} outside this kernel"
    if p.op == "const":
        return None, "array constant (read from memory)"
    if p.op in MOVEMENT_OPS:
        return ("movement_fold", None) if RULES["movement_fold"] else (None, "movement_fold is off")
    if p.op in REDUCE_OPS:
        if not RULES["row_reduction"]:
            return None, "row_reduction is off"
        src = p.inputs[0]
        if not p.attrs["keepdims"]:
            return None, "reduction without keepdims feeding a consumer"
        if k.raxes and (src.shape != k.full or p.attrs["axes"] != k.raxes):
            return None, "reduces over other rows than this kernel"
        if not k.raxes:
            if k.store.shape != src.shape and k.store.shape != p.shape:
                return None, "reduces over other rows than this kernel"
            trial = Kernel(k.root, k.nodes, "R", src.shape, p.attrs["axes"], store=k.store, chain=k.chain)
            why = _row_safe(trial, members, p, users)
        else:
            why = _row_safe(k, members, p, users)
        return (None, why) if why else ("row_reduction", None)
    rule = "reduce_prologue" if k.raxes else "elementwise_chain"
    return (rule, None) if RULES[rule] else (None, f"{rule} is off")


def _name(k: Kernel) -> str:
    if k.kind == "L":
        return f"L_{k.root.op}"
    ops = []
    for n in k.nodes:
        if n.op not in MOVEMENT_OPS and not is_literal(n) and n.op not in ops:
            ops.append(n.op)
    if not ops:
        ops = [k.root.op]
    return f"{k.kind}_" + "_".join(ops[:5]) + ("_etc" if len(ops) > 5 else "")


def fuse(graph: Graph) -> list:
    """Kernels in an order that respects dependencies."""
    users = graph.users()
    assigned = {}
    kernels = []
    outputs = {o.id for o in graph.outputs}
    for n in reversed(graph.nodes):
        if n.id in assigned or n.op == "const":
            continue   # constants are literals in the code or buffers filled before the run
        # a reshape only renames a contiguous buffer: compute its source, store flat
        c = n
        while c.op == "reshape" and c.inputs[0].op not in ("input", "const") and \
                c.inputs[0].op not in LIBRARY_OPS and len(users[c.inputs[0].id]) == 1 and \
                c.inputs[0].id not in outputs and RULES["movement_fold"]:
            c = c.inputs[0]
        if n.op in LIBRARY_OPS:
            k = Kernel(n, [n], "L")
        elif c.op in REDUCE_OPS:
            k = Kernel(n, [n], "R", c.inputs[0].shape, c.attrs["axes"])
        else:
            k = Kernel(n, [n], "E", c.shape, ())
        k.store = c
        members = {n.id}
        m = n
        while m is not c:
            k.chain.add(m.id)
            m = m.inputs[0]
            members.add(m.id)
            k.nodes.append(m)
            k.fused.append((m, "movement_fold"))
        if k.kind != "L":
            changed = True
            while changed:
                changed = False
                for m in list(k.nodes):
                    for p in m.inputs:
                        if p.id in members or p.id in assigned or p.op == "input" or is_literal(p):
                            continue
                        if p.id in outputs and not is_literal(p):
                            continue
                        rule, why = _try_absorb(k, members, p, users)
                        if rule:
                            if rule == "row_reduction" and not k.raxes:
                                k.kind, k.full, k.raxes = "R", p.inputs[0].shape, p.attrs["axes"]
                            members.add(p.id)
                            k.nodes.append(p)
                            k.fused.append((p, rule))
                            changed = True
            order = {x.id: i for i, x in enumerate(graph.nodes)}
            k.nodes.sort(key=lambda x: order[x.id])
            for m in k.nodes:
                for p in m.inputs:
                    if p.id not in members and not is_literal(p) and p.op != "input":
                        _, why = _try_absorb(k, members, p, users)
                        if why and all(p is not q for q, _ in k.refused):
                            k.refused.append((p, why))
        for m in k.nodes:
            assigned[m.id] = k
        kernels.append(k)
    kernels.reverse()
    from ..runtime.arena import alias_of
    from .merge import merge_kernels
    kernels = merge_kernels(graph, kernels, lambda k: alias_of(k) is not None)
    seen = {}
    for k in kernels:   # unique names: the second R_sum is R_sum_1
        base = k.base_name = _name(k)
        k.name = base if base not in seen else f"{base}_{seen[base]}"
        seen[base] = seen.get(base, 0) + 1
    return kernels
