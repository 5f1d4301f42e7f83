"""Graphviz DOT of a viewer model: one cluster per module scope (nested as the modules are),
nodes coloured by kind of op, backward nodes dashed and paler, labels naming the kernel.

    dot -Tsvg graph.dot -o graph.svg
"""
from __future__ import annotations

from .export import CATEGORIES

COLORS = dict(zip(CATEGORIES, ("#9be39b", "#e6e68a", "#d9d9d9", "#f5a65b", "#c39be3", "#c8c8c8", "#8ec5f0")))
BACKWARD_COLORS = dict(zip(CATEGORIES, ("#d3f3d3", "#f4f4c8", "#eeeeee", "#fad2ab", "#e3cdf2", "#e6e6e6", "#cbe4f8")))


def quote(text: str) -> str:
    """A DOT string: backslashes and quotes escaped, newlines as \\n."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(model: dict) -> str:
    kernels = model["kernels"]
    lines = [f"digraph {quote(model['name'])} {{",
             "  rankdir=TB; compound=true; newrank=true;",
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];',
             '  edge [color="#777777", arrowsize=0.6];']

    def node_line(n, indent):
        label = f"{n['name']}\n{n['op']}{n['attrs']} {n['type']}"
        if n["kernel"] is not None:
            label += f"\nK{n['kernel']} {kernels[n['kernel']]['name']}"
        where = f"[{n['rule']}]" if n["rule"] else n["loc"]
        style = '"rounded,filled,dashed"' if n["bwd"] else '"rounded,filled"'
        fill = (BACKWARD_COLORS if n["bwd"] else COLORS)[n["cat"]]
        return (f"{indent}n{n['id']} [label={quote(label)}, tooltip={quote(where)}, "
                f"style={style}, fillcolor={quote(fill)}];")
    by_id = {n["id"]: n for n in model["nodes"]}
    scopes = model["scopes"]
    counter = [0]

    def emit(path, depth):
        indent = "  " * depth
        t = scopes[path]
        if path:
            counter[0] += 1
            label = f"{path}  ({t['fwd']} forward, {t['bwd']} backward)"
            lines.append(f"{indent}subgraph cluster_{counter[0]} {{")
            lines.append(f"{indent}  label={quote(label)};")
            lines.append(f'{indent}  style="rounded"; color="#8888aa"; fontname="monospace"; fontsize=11;')
            inner = indent + "  "
        else:
            inner = indent
        for nid in t["nodes"]:
            lines.append(node_line(by_id[nid], inner))
        for child in t["children"]:
            emit(child, depth + 1)
        if path:
            lines.append(f"{indent}}}")
    emit("", 1)
    for a, b in model["edges"]:
        style = ' [style=dashed, color="#cc8888"]' if by_id[b]["bwd"] else ""
        lines.append(f"  n{a} -> n{b}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(model: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(to_dot(model))
