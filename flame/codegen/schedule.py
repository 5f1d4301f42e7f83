"""From an optimised graph to what a backend runs: split long reductions, fuse, describe each
kernel and plan the arena. Both runners start here, and `flame-compile --schedule/--kernels`
shows it without running anything (no GPU needed to read the CUDA kernels)."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from ..runtime import arena
from .fusion import fuse
from . import kernel as kernel_desc
from .kernel import describe
from .split import split_reductions


@dataclass
class Schedule:
    graph: Graph          # the graph the kernels compute (after split_reductions)
    kernels: list
    descs: dict           # kernel root id -> Described (generated kernels only)
    plan: arena.Plan
    target: str           # "cpu" | "cuda" | "cuda-sim"
    block: int

    def runs(self, k) -> bool:
        """False for a kernel that only renames a buffer (a reshape): nothing to launch."""
        return k.root.id not in self.plan.aliases or k.root.id in self.plan.in_place

    def source(self, k, with_prelude: bool = True) -> str:
        """The kernel's generated module (with_prelude) or just its function."""
        from . import cpu, cuda
        d = self.descs[k.root.id]
        if self.target == "cpu":
            return cpu.module_source(d, k.name) if with_prelude else cpu.render(d, k.name)
        return cuda.module_source(d, k.name, self.block) if with_prelude else cuda.render(d, k.name, self.block)

    def prelude(self) -> str:
        from . import cpu, cuda
        return cpu.PRELUDE if self.target == "cpu" else cuda.PRELUDE


def make_schedule(graph: Graph, target: str = "cpu", block: int = 256, clusters: bool = True) -> Schedule:
    """clusters: the GPU runs thread block clusters (sm_90 and newer), so a few long rows may
    each take several blocks (kernel.LONG_ROW_PARTS). Never in the simulator, which runs one
    block at a time."""
    graph = split_reductions(graph, long_rows=target != "cpu")
    kernels = fuse(graph)
    row_block = block if target != "cpu" else 0
    parts = kernel_desc.LONG_ROW_PARTS if target == "cuda" and clusters else 1
    descs = {k.root.id: describe(k, row_block, parts) for k in kernels
             if k.kind != "L" and arena.alias_of(k) is None}
    plan = arena.plan_graph(graph, kernels, {r: d.in_place_candidates() for r, d in descs.items()})
    return Schedule(graph, kernels, descs, plan, target, block)
