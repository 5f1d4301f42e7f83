"""The schedule part of the dump: what fused into which kernel, what did not and why, the
launch count and the memory plan."""
from __future__ import annotations

import re

from ..ir.printer import fmt_bytes


def schedule_lines(runner, names: dict) -> list:
    """runner: a Schedule or a runner holding one (.kernels, .plan, .target)."""
    plan = runner.plan
    ref = lambda n: names.get(n.id, f"#{n.id}")
    # fusion writes reasons with raw node ids (%123); show them under the dump's names
    why_text = lambda w: re.sub(r"%(\d+)", lambda m: names.get(int(m.group(1)), f"#{m.group(1)}"), w)
    lines = []
    lib = sum(1 for k in runner.kernels if k.kind == "L")
    renames = set(plan.aliases) - set(plan.in_place)
    gen = sum(1 for k in runner.kernels if k.kind != "L" and k.root.id not in renames)
    graph = " -> 1 CUDA graph" if getattr(runner, "target", "") == "cuda" else ""
    lines.append(f"# schedule: {lib + gen} launches ({lib} library, {gen} generated){graph}")
    for i, k in enumerate(runner.kernels):
        tag = f"#   K{i} {k.name}"
        if k.root.id in renames:
            lines.append(f"{tag}  renames {ref(k.root.inputs[0])} as {ref(k.root)} (no copy)")
            continue
        inner = [ref(n) for n in k.nodes if n is not k.root]
        what = f"fuses {' '.join(inner)} -> {ref(k.root)}" if inner else f"computes {ref(k.root)}"
        if k.extra:
            what += ", also stores " + " ".join(ref(e[0]) for e in k.extra)
        if k.root.id in plan.in_place:
            what += f", in place on {names.get(plan.overwrites[k.root.id], '?')}"
        lines.append(f"{tag}  {what}")
        for p, why in k.refused:
            lines.append(f"#   K{i} not fused with {ref(p)}: {why_text(why)}")
    lines.append(f"# memory: arena {fmt_bytes(plan.peak)} (naive {fmt_bytes(plan.naive)})")
    return lines
