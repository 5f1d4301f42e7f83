"""multi_output: merge kernels over the same rows into one kernel that stores several values.

fuse() absorbs a producer only when all its users are in the kernel, so a value that a later
kernel also needs (softmax's exp, which the backward reads; a row sum that both the forward
and the backward use) ends a kernel. This pass joins such a producer kernel P to a consumer
kernel C when they run over the same iteration space, and the joined kernel computes P's
values inline and still stores those that something outside it reads. A softmax, layer_norm
or group_norm backward then runs its row reductions and its normalisation as one kernel.

Two kernels join when (each refusal is logged on C with its reason):
- both are generated (not library calls, not reshape renames);
- their spaces match: the same rows (iteration space and reduced axes), or an elementwise
  kernel over the row kernel's full space or over its per-row shape;
- no third kernel lies between them (P -> X -> C would become a cycle);
- every value derived from a reduction is used only pointwise over the rows (at the full
  or per-row shape, through broadcasts and unit-axis reshapes), as the row kernel reads it;
- the joined kernel stays small (MAX_NODES computing nodes, MAX_OUTPUTS stored values).
An elementwise kernel over a row kernel's full space reads what the row kernel reads, so it
costs the row kernel only its stores (on the GPU the row's elements are already in registers).

Siblings, kernels over the same space where neither reads what the other writes, join too when
they read the same tensor (two sums over the same rows of x read x once) or are both small
(the final stages of split sums: one launch instead of two).
"""
from __future__ import annotations

import math

from ..ir.graph import Graph
from .fusion import MOVEMENT_OPS, REDUCE_OPS, RULES, Kernel, is_literal, is_pointwise
from .kernel import unit_axes_apart

MAX_NODES = 64       # computing (non-movement) nodes in a joined kernel: Numba compile time grows with it
MAX_OUTPUTS = 4
SMALL_SIBLINGS = 1 << 16   # elements: independent kernels this small join even without a shared read


def _red(full, raxes):
    return tuple(1 if d in raxes else s for d, s in enumerate(full))


def _squeezed(full, raxes):
    return tuple(s for d, s in enumerate(full) if d not in raxes)


def unit_reshape(n) -> bool:
    """A reshape that only adds or removes axes of size 1."""
    return n.op == "reshape" and unit_axes_apart(n.shape, n.inputs[0].shape)


def _space(P: Kernel, C: Kernel):
    """(kind, full, raxes) of P and C joined, or a reason they do not share one."""
    # a rule switched off stays off: joining must not redo what it would have fused
    if P.kind == "E" and C.kind == "E" and not RULES["elementwise_chain"]:
        return None, "elementwise_chain is off"
    if "R" in (P.kind, C.kind) and not RULES["row_reduction"]:
        return None, "row_reduction is off"
    if P.kind == "E" and C.kind == "R" and not RULES["reduce_prologue"]:
        return None, "reduce_prologue is off"
    if P.kind == "R" and C.kind == "R":
        if (P.full, P.raxes) != (C.full, C.raxes):
            return None, "it runs over other rows"
        return ("R", C.full, C.raxes), None
    if P.kind == "E" and C.kind == "E":
        return (("E", C.full, ()), None) if P.full == C.full else (None, "it has another shape")
    R, E = (P, C) if P.kind == "R" else (C, P)
    if E.full not in (R.full, _red(R.full, R.raxes), _squeezed(R.full, R.raxes)) and \
            not _other_view(E.full, R.full, R.raxes):
        return None, "the elementwise kernel is not shaped like the row kernel's rows"
    return ("R", R.full, R.raxes), None


def _other_view(shape, full, raxes) -> bool:
    """Whether `shape` holds the same elements as a row kernel's iteration space `full`, in
    another view (each computed at the kernel's own element). Rows of one element are left
    out: there the per-row shape is itself the whole space, and the two cannot be told apart."""
    return math.prod(shape) == math.prod(full) > math.prod(_red(full, raxes))


def _rows_safe(nodes: list, ids: set, renames: set, full, raxes, users) -> str | None:
    """Everything computed from a reduction inside the kernel must be evaluated at the row's
    coordinates: pointwise, a broadcast or a unit-axis reshape, at the full or per-row shape."""
    shapes = (full, _red(full, raxes), _squeezed(full, raxes))
    for r in nodes:
        if r.op not in REDUCE_OPS:
            continue
        stack, seen = [r], set()
        while stack:
            n = stack.pop()
            for u in users[n.id]:
                if u.id not in ids or u.id in seen:
                    continue
                seen.add(u.id)
                if u.op in REDUCE_OPS:
                    continue   # a later reduction over the same rows reads it in its loop
                if u.id in renames:   # a reshape after a stored value renames its buffer, but
                    stack.append(u)   # what reads it inside the kernel is checked all the same
                    continue
                ok = u.shape in shapes and (is_pointwise(u) or u.op == "expand" or unit_reshape(u))
                # the same elements in another view, read at the kernel's own element: from a
                # value of every element (a per-row value broadcast in another view would be
                # read at some other row's coordinates)
                ok = ok or (_other_view(u.shape, full, raxes) and math.prod(n.shape) == math.prod(full)
                            and (is_pointwise(u) or u.op == "reshape"))
                if not ok:
                    return f"{u.op} %{u.id} reads a row reduction off its rows"
                stack.append(u)
    return None


def _join(P: Kernel, C: Kernel, space, needed, order: dict) -> Kernel:
    kind, full, raxes = space
    nodes = sorted(_union(P.nodes, C.nodes), key=lambda n: order[n.id])
    ids = {n.id for n in nodes}
    extra = [(r, s, ch) for r, s, ch in [(P.root, P.store, P.chain)] + P.extra + C.extra
             if needed(r, ids, P, C)]
    k = Kernel(C.root, nodes, kind, full, raxes, store=C.store, chain=set(C.chain))
    k.extra = extra
    k.fused = list({(n.id, rule): (n, rule) for n, rule in P.fused + C.fused + [(P.root, "multi_output")]}.values())
    k.refused = list({(n.id, w): (n, w) for n, w in P.refused + C.refused if n.id not in ids}.values())
    k.merged = P.merged + C.merged + [P.root]
    return k


def _union(a: list, b: list) -> list:
    """The nodes of two kernels, once each (both may recompute the same value)."""
    ids = {n.id for n in a}
    return a + [n for n in b if n.id not in ids]


def _computing(nodes) -> int:
    return sum(1 for n in nodes if n.op not in MOVEMENT_OPS and not is_literal(n))


def merge_kernels(graph: Graph, kernels: list, is_alias) -> list:
    """kernels in dependency order -> kernels in dependency order, some joined. One pass over
    the consumers; each joins what it can of its producers' kernels."""
    if not RULES["multi_output"]:
        return kernels
    users = graph.users()
    outputs = {o.id for o in graph.outputs}
    order = {n.id: i for i, n in enumerate(graph.nodes)}
    # positions stay a dependency order: a joined kernel takes the consumer's place when every
    # other reader of the producer comes after the consumer, else the producer's place when
    # every other input of the consumer is made before the producer. Either way no third
    # kernel can lie on a path between them, and nothing needs re-sorting.
    pos = {id(k): i for i, k in enumerate(kernels)}
    made_by = {r.id: k for k in kernels for r in k.out_nodes()}

    def producers(k):
        return list({id(made_by[r.id]): made_by[r.id] for r in k.reads() if r.id in made_by}.values())
    readers = {id(k): set() for k in kernels}
    by_id = {id(k): k for k in kernels}
    for k in kernels:
        for p in producers(k):
            readers[id(p)].add(id(k))

    read_ids = {}

    def reads_of(K):
        if id(K) not in read_ids:
            read_ids[id(K)] = {n.id for n in K.reads()}
        return read_ids[id(K)]

    def needed(r, ids, P, C):
        """Whether the joined kernel must still store r: read outside it, a graph output, or
        loaded by a third kernel that recomputes one of its readers (rule recompute: a user
        node of r can be inside several kernels)."""
        return r.id in outputs or any(u.id not in ids for u in users[r.id]) or \
            any(r.id in reads_of(by_id[x]) for x in readers[id(P)] | readers[id(C)] if x not in (id(P), id(C)))

    def limits(P, C, space):
        nodes = _union(P.nodes, C.nodes)
        ids = {n.id for n in nodes}
        outs = 1 + sum(needed(r, ids, P, C) for r in [P.root] + [e[0] for e in P.extra + C.extra])
        if _computing(nodes) > MAX_NODES:
            return f"together they would compute more than {MAX_NODES} values"
        if outs > MAX_OUTPUTS:
            return f"together they would store more than {MAX_OUTPUTS} values"
        renames = set().union(P.chain, C.chain, *(e[2] for e in P.extra + C.extra))
        return _rows_safe(sorted(nodes, key=lambda n: order[n.id]), ids, renames, space[1], space[2], users)

    def refuse(C, P, why):
        # one note per other kernel: the latest reason it was not joined
        C.refused = [(n, w) for n, w in C.refused if not (n is P.root and w.startswith("multi_output:"))]
        C.refused.append((P.root, f"multi_output: not joined with the kernel of %{P.root.id}: {why}"))

    def join(P, C, space, at):
        J = _join(P, C, space, needed, order)
        # P and C leave every reader set, also of a kernel J no longer reads (a value P read
        # that C computes too, rule recompute); J joins those of the kernels it reads
        for rs in readers.values():
            rs.difference_update((id(P), id(C)))
        for Q in producers(J):
            if Q is not P and Q is not C:
                readers[id(Q)].add(id(J))
        readers[id(J)] = (readers.pop(id(P)) | readers.pop(id(C))) - {id(P), id(C)}
        for r in J.out_nodes():
            made_by[r.id] = J
        pos[id(J)] = at
        by_id[id(J)] = J
        for old in (P, C):   # ids of dead kernels may be reused by new objects
            del pos[id(old)], by_id[id(old)]
            read_ids.pop(id(old), None)
        return J

    def place(P, C):
        """Where P joined with C can run: C's place when nothing else reads P before it, else
        P's place when everything else C reads is made before it, else None (a third kernel
        lies between them)."""
        if all(pos[x] > pos[id(C)] for x in readers[id(P)] if x != id(C)):
            return pos[id(C)]
        if all(pos[id(Q)] < pos[id(P)] for Q in producers(C) if Q is not P):
            return pos[id(P)]
        return None

    for C in list(kernels):
        if C.kind == "L" or is_alias(C):
            continue
        tried = set()
        while True:
            cands = [P for P in producers(C) if id(P) not in tried and P.kind != "L" and not is_alias(P)]
            if not cands:
                break
            P = cands[0]
            tried.add(id(P))
            space, why = _space(P, C)
            at = None
            if why is None:
                at = place(P, C)
                if at is None:
                    why = "other kernels run between them that read the first or feed the second"
            why = why or limits(P, C, space)
            if why is not None:
                refuse(C, P, why)
                continue
            C = join(P, C, space, at)
            tried = set()   # the joined kernel's other producers are tried again: a kernel
            # that lay between one of them and C may be inside C now

    # siblings: kernels over the same space that do not depend on each other and read the
    # same tensor (group_norm's two moments read x once) or are both small (their final sums)
    def depends(B, A):
        """Whether B reads, through any chain of kernels, what A writes."""
        stack, seen = [B], set()
        while stack:
            K = stack.pop()
            for Q in producers(K):
                if Q is A:
                    return True
                if id(Q) not in seen and pos[id(Q)] > pos[id(A)]:
                    seen.add(id(Q))
                    stack.append(Q)
        return False

    def shares(A, B):
        small = max(math.prod(A.full), math.prod(B.full)) <= SMALL_SIBLINGS
        return small or not reads_of(A).isdisjoint(reads_of(B))

    groups = {}
    for K in sorted(by_id.values(), key=lambda k: pos[id(k)]):
        if K.kind != "L" and not is_alias(K):
            groups.setdefault((K.kind, K.full, K.raxes), []).append(K)
    for group in groups.values():
        i = 1
        while i < len(group):
            B = group[i]
            for A in group[:i]:
                if not shares(A, B) or depends(B, A):
                    continue
                at = place(A, B)
                if at is None:
                    continue
                space, why = _space(A, B)
                if (why or limits(A, B, space)) is None:
                    group[i] = join(A, B, space, at)
                    group.remove(A)
                    i -= 1
                    break
            i += 1
    joined = sorted(by_id.values(), key=lambda k: pos[id(k)])
    assert _in_dependency_order(joined), "multi_output: the joined kernels are out of dependency order"
    return joined


def _in_dependency_order(kernels: list) -> bool:
    made = set()
    for k in kernels:
        if any(r.id not in made and r.op not in ("input", "const") for r in k.reads()):
            return False
        made.update(r.id for r in k.out_nodes())
    return True
