"""Static memory plan: one arena per compiled step, offsets chosen from buffer lifetimes
before the first run, so dead buffers are reused and the peak is known in advance."""
from __future__ import annotations

from dataclasses import dataclass

ALIGN = 256   # bytes: cuBLAS and vector loads want aligned buffers


@dataclass
class Plan:
    offsets: dict      # node id -> byte offset
    sizes: dict        # node id -> bytes
    peak: int          # arena bytes
    naive: int         # bytes if nothing were reused
    aliases: dict = None   # node id -> id of the buffer it shares
    in_place: set = None   # of those, kernels that compute and overwrite (the rest only reshape)
    overwrites: dict = None  # in-place kernel root -> the value it overwrites
    lifetimes: dict = None   # node id -> (first step, last step) inclusive, as placed

    def describe(self) -> str:
        from ..ir.printer import fmt_bytes
        return f"arena {fmt_bytes(self.peak)} (naive {fmt_bytes(self.naive)})"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan(lifetimes: dict, sizes: dict) -> Plan:
    """lifetimes: node id -> (first step, last step), inclusive. Greedy best fit, largest
    buffers first: each goes to the lowest offset free for its whole lifetime."""
    placed = []   # (start, end, offset, size)
    offsets = {}
    for nid in sorted(lifetimes, key=lambda i: (-sizes[i], lifetimes[i])):
        s, e = lifetimes[nid]
        size = _align(max(sizes[nid], 1))
        busy = sorted((o, o + sz) for (ps, pe, o, sz) in placed if not (pe < s or e < ps))
        off = 0
        for lo, hi in busy:
            if off + size <= lo:
                break
            off = max(off, hi)
        offsets[nid] = off
        placed.append((s, e, off, size))
    peak = max((o + sz for _, _, o, sz in placed), default=0)
    naive = sum(_align(max(sizes[i], 1)) for i in lifetimes)
    return Plan(offsets, {i: sizes[i] for i in lifetimes}, peak, naive, lifetimes=dict(lifetimes))


def alias_of(k):
    """A kernel that only reshapes a materialized buffer needs no copy: the id of the buffer
    it renames, else None."""
    if k.kind != "E" or any(n.op != "reshape" for n in k.nodes):
        return None
    src = k.nodes[0].inputs[0]
    return None if src.op == "const" and src.shape == () else src.id


def plan_graph(graph, kernels, in_place=None) -> Plan:
    """Lifetimes of every materialized buffer of a fused schedule, then plan(): graph inputs
    and array constants are written before step 1, each kernel's root at its step, and
    outputs stay alive to the end. Two kinds of kernel output share an existing buffer:
    a pure reshape (see alias_of), and an elementwise result that overwrites a buffer read
    only at the index it writes whose last use is this kernel (in_place: root id ->
    candidate ids, from Described.in_place_candidates) — the GEMM epilogue case."""
    from ..codegen.fusion import is_literal
    lifetimes = {}
    aliases = {}
    renames = set()
    overwrites = {}
    protected = set()
    for n in graph.inputs:
        lifetimes[n.id] = [0, 0]
        protected.add(n.id)
    for n in graph.nodes:
        if n.op == "const" and not is_literal(n):
            lifetimes[n.id] = [0, 0]
            protected.add(n.id)

    def root(i):
        while i in aliases:
            i = aliases[i]
        return i
    for i, k in enumerate(kernels, start=1):
        src = alias_of(k)
        if src is not None and root(src) in lifetimes:
            aliases[k.root.id] = root(src)
            renames.add(k.root.id)
            continue
        for o in k.out_nodes():
            lifetimes[o.id] = [i, i]
        for r in (k.reads() if k.kind != "L" else list(k.root.inputs)):
            if root(r.id) in lifetimes:
                lifetimes[root(r.id)][1] = max(lifetimes[root(r.id)][1], i)
    end = len(kernels) + 1
    for o in graph.outputs:
        if root(o.id) in lifetimes:
            lifetimes[root(o.id)][1] = end
    # parameters and array constants persist between steps (the GPU runner uploads them only
    # when they change, and writes parameter updates back at the end): never reuse their bytes
    for n in graph.inputs:
        if n.attrs["kind"] == "param":
            lifetimes[n.id][1] = end
    for n in graph.nodes:
        if n.op == "const" and n.id in lifetimes:
            lifetimes[n.id][1] = end
    nodes = {n.id: n for n in graph.all_nodes()}
    naive = sum(_align(max(nodes[i].nbytes, 1)) for i in lifetimes)   # before any sharing
    for i, k in enumerate(kernels, start=1):
        r = k.root.id
        if r not in lifetimes:
            continue
        for direct in (in_place or {}).get(r, ()):
            c = root(direct)
            if c in lifetimes and c not in protected and lifetimes[c][1] == i and \
                    nodes[c].nbytes == nodes[r].nbytes and c != r:
                lifetimes[c][1] = lifetimes[r][1]
                del lifetimes[r]
                aliases[r] = c
                overwrites[r] = direct
                break
    p = plan({i: tuple(v) for i, v in lifetimes.items()}, {i: nodes[i].nbytes for i in lifetimes})
    for a in aliases:
        p.offsets[a] = p.offsets[root(a)]
    p.aliases = {a: root(a) for a in aliases}
    p.in_place = set(aliases) - renames
    p.overwrites = overwrites
    p.naive = naive
    return p
