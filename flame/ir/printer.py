"""The stable text dump of a Graph: one equation per line (the spec tests compare against).

    def step(x:f32[32,4]; fc1.weight:f32[8,4]@p, ...):
      %0:f32[32,8] = matmul[tb] x, fc1.weight          # examples/mlp.py:14  fc1
      # backward
      gfc1.weight:f32[8,4] = matmul[ta] %7, x          # [matmul.rhs]  fc1
      return (value, gfc1.weight)
    # nodes: ...   # parameters: ...   # saved for backward: ...

Scalar constants print inline as typed literals (`0.5:f32`); forward lines end with the
user's source line and module scope, backward lines with the rule that emitted them.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .dtypes import DType
from .graph import Graph, Node
from .passes import saved_for_backward

EQ_WIDTH = 56


def fmt_bytes(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _num(v) -> str:
    if isinstance(v, (np.floating, np.ndarray)) and np.asarray(v).dtype.itemsize <= 4 \
            and np.asarray(v).dtype.kind == "f" and np.isfinite(v):
        return str(np.float32(v))   # shortest text that reads back as the same float32
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(float(np.float32(v))) if abs(v) < 1e16 else f"{v:g}"
    return str(v)


def _attr_value(v) -> str:
    if isinstance(v, DType):
        return v.name
    if isinstance(v, (tuple, list)):
        if any(isinstance(i, (tuple, list)) for i in v):
            return ",".join("(" + ",".join(map(_num, i)) + ")" for i in v)
        return ",".join(map(_num, v))
    if isinstance(v, np.ndarray):
        if v.size <= 8:
            return "[" + ",".join(_num(x) for x in v.reshape(-1)) + "]"
        return f"<{v.size} values>"
    return _num(v)


def fmt_attrs(n: Node) -> str:
    parts = []
    for k, v in n.attrs.items():
        if n.op == "const" and k == "dtype":
            continue
        if isinstance(v, bool):
            if v:
                parts.append(k)
        else:
            parts.append(f"{k}={_attr_value(v)}")
    return f"[{' '.join(parts)}]" if parts else ""


def is_literal(n: Node) -> bool:
    return n.op == "const" and n.shape == ()


def node_names(graph: Graph) -> dict:
    """node id -> the name the dump prints: inputs by name, named outputs, then %0, %1, ...
    in order (scalar literals get none: they print inline). The graph viewer shows the same."""
    names = {}
    for n in graph.inputs:
        names[n.id] = n.attrs["name"]
    taken = set(names.values())
    for o, nm in zip(graph.outputs, graph.output_names or [None] * len(graph.outputs)):
        if nm and o.id not in names and nm not in taken:
            names[o.id] = nm
            taken.add(nm)
    k = 0
    for n in graph.nodes:
        if n.id not in names and not is_literal(n):
            names[n.id] = f"%{k}"
            k += 1
    return names


def dump(graph: Graph, summary: bool = True, runner=None) -> str:
    """runner: a compiled backend's runner (flame.compile(...).runner); its schedule and
    memory plan are appended, over the graph it actually runs."""
    names = node_names(graph)

    def ref(n: Node) -> str:
        if is_literal(n):
            return f"{_num(n.attrs['value'])}:{n.dtype.name}"
        return names[n.id]

    args = [n for n in graph.inputs if n.attrs["kind"] != "param"]
    params = [n for n in graph.inputs if n.attrs["kind"] == "param"]
    sig = ", ".join(f"{names[n.id]}:{n.type_str}" + ("@rng" if n.attrs["kind"] == "rng" else "") for n in args)
    if params:
        sig += "; " + ", ".join(f"{names[n.id]}:{n.type_str}@p" for n in params)
    lines = [f"def {graph.name}({sig}):"]
    section = "forward"
    for n in graph.nodes:
        if is_literal(n):
            continue
        if n.rule is not None and section == "forward":
            lines.append("  # backward")
            section = "backward"
        elif n.rule is None and section == "backward":
            lines.append("  # after backward")
            section = "after"
        eq = f"  {names[n.id]}:{n.type_str} = {n.op}{fmt_attrs(n)}"
        if n.inputs:
            eq += " " + ", ".join(ref(i) for i in n.inputs)
        where = f"[{n.rule}]" if n.rule else n.loc
        note = "  ".join(s for s in (where, n.scope) if s)
        lines.append(f"{eq.ljust(EQ_WIDTH)} # {note}" if note else eq)
    lines.append("  return (" + ", ".join(ref(o) for o in graph.outputs) + ")")
    if summary:
        lines += summary_lines(graph, names)
    if runner is not None:
        from ..codegen.report import schedule_lines
        lines += schedule_lines(runner, names)
    return "\n".join(lines) + "\n"


def summary_lines(graph: Graph, names: dict | None = None) -> list:
    nodes = [n for n in graph.nodes if not is_literal(n)]
    fwd = sum(1 for n in nodes if n.rule is None)
    by_op = Counter(n.op for n in nodes)
    params = [n for n in graph.inputs if n.attrs["kind"] == "param"]
    psize = sum(n.size for n in params)
    pbytes = sum(n.nbytes for n in params)
    saved = saved_for_backward(graph)
    out = [f"# nodes: {len(nodes)} (forward {fwd}, backward {len(nodes) - fwd})",
           "# ops: " + ", ".join(f"{op} {c}" for op, c in sorted(by_op.items(), key=lambda t: (-t[1], t[0]))),
           f"# parameters: {len(params)} tensors, {psize:,} values, {fmt_bytes(pbytes)}"]
    if any(n.rule is not None for n in graph.nodes):
        total = sum(b for _, b in saved)
        names = names or {n.id: n.attrs["name"] for n in graph.inputs}
        shown = []
        for n, b in saved[:8]:
            shown.append(f"{names.get(n.id, n.op)} {n.type_str} {fmt_bytes(b)}")
        more = f", … {len(saved) - 8} more" if len(saved) > 8 else ""
        out.append(f"# saved for backward: {len(saved)} tensors, {fmt_bytes(total)}"
                   + (": " + ", ".join(shown) + more if shown else ""))
    return out
