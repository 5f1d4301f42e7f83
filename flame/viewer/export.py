"""A Graph (and optionally its Schedule) as plain data for the viewer and the DOT writer.

    model = export(graph)                                  # nodes, edges, scope tree
    model = export(graph, make_schedule(graph, "cuda"))    # + kernels, their source, memory

The model is JSON-ready: nodes (named as flame.dump names them), edges, the scope tree,
kernels with their member node ids and generated source, and the memory timeline: after
each step of the schedule, the bytes of live buffers and the top of the arena in use.
"""
from __future__ import annotations

import re

import numpy as np

from ..codegen.fusion import LIBRARY_OPS, MOVEMENT_OPS, REDUCE_OPS
from ..ir.printer import fmt_attrs, fmt_bytes, is_literal, node_names, _num
from ..runtime.arena import ALIGN

CATEGORIES = ("input", "param", "const", "library", "reduce", "movement", "elementwise")


def category(n) -> str:
    """What kind of work a node is: the viewer colours by it."""
    if n.op == "input":
        return "param" if n.attrs["kind"] == "param" else "input"
    if n.op == "const":
        return "const"
    if n.op in LIBRARY_OPS:
        return "library"
    if n.op in REDUCE_OPS:
        return "reduce"
    if n.op in MOVEMENT_OPS:
        return "movement"
    return "elementwise"


def view_scope(n) -> str:
    """The node's module scope; a parameter (traced with none) goes under the module that
    owns it, so `down_blocks.0.resnets.0.conv1.weight` sits beside that conv's nodes."""
    if n.op == "input" and n.attrs["kind"] == "param" and not n.scope:
        return n.attrs["name"].rpartition(".")[0]
    return n.scope


def _scope_tree(nodes: list) -> dict:
    """path -> {parent, children, nodes (direct members), count (all beneath), fwd, bwd};
    the root is ''. Children are ordered by first appearance in the graph."""
    tree = {"": {"parent": None, "children": [], "nodes": [], "count": 0, "fwd": 0, "bwd": 0}}

    def ensure(path):
        if path in tree:
            return
        parent = path.rpartition(".")[0]
        ensure(parent)
        tree[path] = {"parent": parent, "children": [], "nodes": [], "count": 0, "fwd": 0, "bwd": 0}
        tree[parent]["children"].append(path)
    for n in nodes:
        ensure(n["scope"])
        tree[n["scope"]]["nodes"].append(n["id"])
        path = n["scope"]
        while path is not None:
            t = tree[path]
            t["count"] += 1
            t["bwd" if n["bwd"] else "fwd"] += 1
            path = t["parent"]
    return tree


def _kernels(sched, names: dict, node_kernel: dict) -> list:
    plan = sched.plan
    why_text = lambda w: re.sub(r"%(\d+)", lambda m: names.get(int(m.group(1)), f"#{m.group(1)}"), w)  # noqa: E731
    renames = set(plan.aliases) - set(plan.in_place)
    out = []
    for i, k in enumerate(sched.kernels):
        for n in k.nodes:   # a value recomputed in several kernels belongs to the first
            node_kernel.setdefault(n.id, []).append(i)
        if k.root.id in renames:
            note = f"renames {names.get(k.root.inputs[0].id, '?')} as {names[k.root.id]} (no copy)"
        elif k.kind == "L":
            note = f"library call ({'cuBLAS' if sched.target != 'cpu' else 'BLAS'}): {k.root.op}"
        elif k.root.id in plan.in_place:
            note = f"in place on {names.get(plan.overwrites[k.root.id], '?')}"
        else:
            note = "generated kernel"
        if k.extra:
            note += "; also stores " + ", ".join(names.get(e[0].id, "?") for e in k.extra)
        has_src = k.root.id in sched.descs and sched.runs(k)
        out.append({
            "index": i, "name": k.name, "kind": k.kind, "root": k.root.id, "step": i + 1,
            "nodes": [n.id for n in k.nodes if not is_literal(n)],
            "fused": [[n.id, rule] for n, rule in k.fused],
            "refused": [[n.id, why_text(why)] for n, why in k.refused],
            "note": note, "launch": k.root.id not in renames,
            "source": sched.source(k, with_prelude=False) if has_src else None,
        })
    return out


def memory_timeline(plan, steps: int) -> dict:
    """Bytes in use at each step 0..steps (0: inputs written, i: after kernel i, last: the
    outputs): `live` sums the aligned sizes of live buffers, `top` is the highest arena byte
    any of them occupies (its maximum is the arena's size, plan.peak)."""
    live = np.zeros(steps + 2, np.int64)
    top = np.zeros(steps + 2, np.int64)
    for nid, (s, e) in plan.lifetimes.items():
        size = (max(plan.sizes[nid], 1) + ALIGN - 1) // ALIGN * ALIGN
        live[s:e + 1] += size
        np.maximum(top[s:e + 1], plan.offsets[nid] + size, out=top[s:e + 1])
    return {"live": live.tolist(), "top": top.tolist(), "peak": int(plan.peak),
            "naive": int(plan.naive), "peak_text": fmt_bytes(plan.peak), "naive_text": fmt_bytes(plan.naive)}


def export(graph, schedule=None) -> dict:
    """The viewer's model of `graph`; with a schedule (flame.codegen.schedule.make_schedule),
    of the graph its kernels compute (schedule.graph, after split_reductions)."""
    g = schedule.graph if schedule is not None else graph
    names = node_names(g)
    outputs = {o.id for o in g.outputs}
    node_kernel = {}
    kernels = _kernels(schedule, names, node_kernel) if schedule is not None else []
    fused_by = {}   # the rule that put a node in its kernel; "recompute" only where no other did
    for k in (schedule.kernels if schedule is not None else []):
        for n, rule in k.fused:
            if fused_by.get(n.id) in (None, "recompute"):
                fused_by[n.id] = rule
    plan = schedule.plan if schedule is not None else None

    def arg(i):
        return f"{_num(i.attrs['value'])}:{i.dtype.name}" if is_literal(i) else names[i.id]
    nodes, edges = [], []
    for n in g.all_nodes():
        if is_literal(n):
            continue   # scalar constants print inline in their users' arguments, as in the dump
        d = {"id": n.id, "name": names[n.id], "op": n.op, "type": n.type_str,
             "attrs": fmt_attrs(n) if n.op != "input" else "",   # an input's attrs are its name and kind
             "shape": list(n.shape), "dtype": n.dtype.name, "scope": view_scope(n), "loc": n.loc,
             "rule": n.rule, "bwd": n.rule is not None, "cat": category(n),
             "args": [arg(i) for i in n.inputs], "output": n.id in outputs,
             "kernel": node_kernel.get(n.id, [None])[0], "fused_by": fused_by.get(n.id), "mem": None,
             "recomputed_in": node_kernel.get(n.id, [])[1:]}
        if n.op == "input":
            d["kind"] = n.attrs["kind"]
        if plan is not None and n.id in plan.offsets:
            buf = plan.aliases.get(n.id, n.id)
            s, e = plan.lifetimes[buf]
            d["mem"] = {"offset": int(plan.offsets[n.id]), "bytes": int(n.nbytes), "first": s, "last": e,
                        "shares": names.get(buf) if buf != n.id else None}
        nodes.append(d)
        seen = set()
        for i in n.inputs:
            if not is_literal(i) and i.id not in seen:
                seen.add(i.id)
                edges.append([i.id, n.id])
    model = {"name": g.name, "target": schedule.target if schedule is not None else None,
             "nodes": nodes, "edges": edges, "scopes": _scope_tree(nodes), "kernels": kernels,
             "categories": list(CATEGORIES),
             "summary": {"nodes": len(nodes), "fwd": sum(not n["bwd"] for n in nodes),
                         "bwd": sum(n["bwd"] for n in nodes), "kernels": len(kernels),
                         "launches": sum(k["launch"] for k in kernels)}}
    if schedule is not None:
        model["prelude"] = schedule.prelude()
        model["memory"] = memory_timeline(plan, len(schedule.kernels))
        model["memory"]["steps"] = ["inputs"] + [k.name for k in schedule.kernels] + ["outputs"]
    return model
