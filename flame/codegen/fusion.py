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
- recompute:         a cheap pointwise value that kernels elsewhere also read (a long
                     group_norm's x - row mean, read by the statistics and the
                     normalisation) is computed
                     again inside each reader from what it is made of, instead of being
                     stored and read back: it costs each reader at most the loads of what it
                     is made of (see _recompute_cone for the limits).

Library ops (matmul, conv, gather, scatter) run as BLAS/cuBLAS or library calls, one each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.graph import Graph, Node

RULES = {"elementwise_chain": True, "reduce_prologue": True, "row_reduction": True,
         "movement_fold": True, "gemm_epilogue": True, "multi_output": True, "recompute": True}

RECOMPUTE_MAX_NODES = 8   # computing nodes a recomputed value may cost each of its readers
RECOMPUTE_ANY_SIZE = 1 << 12   # elements: values this small (per-row statistics) are recomputed
                               # whatever they read: their loads stay in cache

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


@dataclass
class _Fusing:
    """What fuse() has decided so far, as the absorption rules need it."""
    users: dict
    outputs: set
    assigned: dict = field(default_factory=dict)   # node id -> the kernel that computes it
    recomputed: set = field(default_factory=set)   # ids of values recomputed inside their readers
    pinned: set = field(default_factory=set)       # ids that recomputed values read: always stored


def _recompute_cone(p: Node, members: set, fz: _Fusing):
    """(nodes, None) to compute p again inside another kernel: p and the pointwise and
    movement values it is made of, down to stored values (inputs, constants, reductions,
    library results); or (None, reason). Limits: at most RECOMPUTE_MAX_NODES computing
    nodes, and (for p larger than RECOMPUTE_ANY_SIZE) at most two stored values read at
    (near) p's size: with one, each reader loads as many bytes as it would load p; with
    two, only while p has at most three readers and is not read by a library call."""
    cone, leaves, stack, seen = [], [], [p], set()
    while stack:
        n = stack.pop()
        if n.id in seen or n.id in members or is_literal(n):
            continue
        seen.add(n.id)
        if n.op in ("input", "const") or n.op in REDUCE_OPS or n.op in LIBRARY_OPS or \
                (n is not p and n.id in fz.outputs):
            leaves.append(n)
            continue
        cone.append(n)
        stack.extend(n.inputs)
    for leaf in leaves:
        k = fz.assigned.get(leaf.id)
        if k is not None and leaf is not k.root:
            return None, f"it reads %{leaf.id}, which another kernel computes without storing"
        if leaf.op in REDUCE_OPS and leaf.attrs["keepdims"]:
            return None, f"it reads the row reduction %{leaf.id}, better computed inside its row kernel"
    computing = [n for n in cone if n.op not in MOVEMENT_OPS]
    if len(computing) > RECOMPUTE_MAX_NODES:
        return None, f"it would recompute {len(computing)} values (at most {RECOMPUTE_MAX_NODES})"
    heavy = [leaf for leaf in leaves if leaf.size * 4 > p.size and p.size > RECOMPUTE_ANY_SIZE]
    readers = fz.users[p.id]
    stored_anyway = any(u.op in LIBRARY_OPS for u in readers)
    if len(heavy) > 2 or (len(heavy) == 2 and (len(readers) > 3 or stored_anyway)):
        return None, (f"each of its {len(readers)} readers would load {len(heavy)} tensors of its size "
                      "instead of one")
    return cone, None


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


def _try_absorb(k: Kernel, members: set, p: Node, fz: _Fusing):
    """(rule, cone) if producer p can be computed inside kernel k (cone: the nodes to add),
    else (None, reason)."""
    users = fz.users
    if p.op == "input":
        return None, "graph input"
    if p.op in LIBRARY_OPS:
        if k.kind == "E" and RULES["gemm_epilogue"]:
            return None, (f"{p.op} runs as a library call (cuBLAS/BLAS); this epilogue is one kernel "
                          "after it, in place on its output when that buffer dies here")
        return None, f"{p.op} runs as a library call"
    if p.id in fz.pinned:
        return None, "a value recomputed in several kernels reads it, so it is stored"
    outside = [u for u in users[p.id] if u.id not in members]
    if outside:
        why = f"%{p.id} is also used by {outside[0].op} %{outside[0].id} outside this kernel"
        if not is_pointwise(p) and p.op not in MOVEMENT_OPS:
            return None, why
        base = "reduce_prologue" if k.raxes else "elementwise_chain"
        if not RULES["recompute"] or not RULES[base]:
            return None, why + f" ({'recompute' if not RULES['recompute'] else base} is off)"
        cone, no = _recompute_cone(p, members, fz)
        return ("recompute", cone) if cone else (None, f"{why}; not recomputed: {no}")
    if p.op == "const":
        return None, "array constant (read from memory)"
    if p.op in MOVEMENT_OPS:
        return ("movement_fold", [p]) if RULES["movement_fold"] else (None, "movement_fold is off")
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
        return (None, why) if why else ("row_reduction", [p])
    rule = "reduce_prologue" if k.raxes else "elementwise_chain"
    return (rule, [p]) if RULES[rule] else (None, f"{rule} is off")


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
    outputs = {o.id for o in graph.outputs}
    fz = _Fusing(users, outputs)
    assigned, members_of = fz.assigned, {}
    kernels = []
    order = {x.id: i for i, x in enumerate(graph.nodes)}
    for n in reversed(graph.nodes):
        if n.id in assigned or n.op == "const":
            continue   # constants are literals in the code or buffers filled before the run
        if n.id in fz.recomputed and n.id not in outputs and all(
                u.id in fz.recomputed if u.id not in assigned else n.id in members_of[id(assigned[u.id])]
                for u in users[n.id]):
            continue   # every reader computes it again: nothing stores it
        # a reshape only renames a contiguous buffer: compute its source, store flat
        c = n
        while c.op == "reshape" and c.inputs[0].op not in ("input", "const") and \
                c.inputs[0].op not in LIBRARY_OPS and len(users[c.inputs[0].id]) == 1 and \
                c.inputs[0].id not in outputs and c.inputs[0].id not in fz.pinned and RULES["movement_fold"]:
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
                        rule, new_nodes = _try_absorb(k, members, p, fz)
                        if rule:
                            if rule == "row_reduction" and not k.raxes:
                                k.kind, k.full, k.raxes = "R", p.inputs[0].shape, p.attrs["axes"]
                            for q in new_nodes:
                                members.add(q.id)
                                k.nodes.append(q)
                                k.fused.append((q, rule))
                            if rule == "recompute":
                                fz.recomputed.update(q.id for q in new_nodes)
                                fz.pinned.update(i.id for q in new_nodes for i in q.inputs
                                                 if i.id not in members and i.op not in ("input", "const"))
                            changed = True
            k.nodes.sort(key=lambda x: order[x.id])
            for m in k.nodes:
                for p in m.inputs:
                    if p.id not in members and not is_literal(p) and p.op != "input":
                        _, why = _try_absorb(k, members, p, fz)
                        if isinstance(why, str) and all(p is not q for q, _ in k.refused):
                            k.refused.append((p, why))
        recomputed_here = {q.id for q, rule in k.fused if rule == "recompute"}
        for m in k.nodes:
            if m.id not in recomputed_here:
                assigned[m.id] = k
        members_of[id(k)] = members
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
