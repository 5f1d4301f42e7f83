"""split_reductions: a Graph -> Graph pass run before fusion on the compiled backends.

A reduction with few output rows and a long inner extent leaves most of a GPU idle (one
block per row) or one CPU core busy. Two shapes are split into a partial reduction with many
rows and a short final one, keeping memory order so the loads stay coalesced:
- trailing axes reduced (softmax-like rows, whole-tensor sums): over the tensor's own last
  axes where they make rows of a useful length (_axis_rows), else [outer, s, n/s] over the
  last axis, then over s;
- leading axes reduced (bias gradients, unbroadcast sums): [s, n/s, outer] over axis 1, then
  over axis 0.
The rewrite changes only the summation order (within float tolerance of the interpreter)."""
from __future__ import annotations

import math

from ..ir.graph import Graph
from ..ir.passes import _rewrite, dce
from .fusion import is_pointwise

MIN_INNER = 1 << 15      # shorter rows are cheap enough whole
ROW_BLOCKS = 528         # 4 blocks per SM on a 132-SM H100: enough rows to fill the chip
COLUMN_THREADS = 1 << 15
AXIS_ROW = 32            # shortest trailing-axes row a split may keep as its partial rows
# A row one GPU block holds in registers (kernel.LONG_ROW_THREADS * LONG_ROW_SLOTS elements)
# stays whole when there are at least LONG_ROW_MIN_ROWS rows: one kernel reads it once for
# every pass its statistics take (SD 1.5's group_norm groups: 64 rows of 40960 at batch 2).
LONG_ROW = 1024 * 48
LONG_ROW_MIN_ROWS = 32


def _divisor(n: int, at_most: int, min_rest: int) -> int:
    """Largest s <= at_most dividing n with n / s >= min_rest (1 if none)."""
    best = 1
    for s in range(2, min(at_most, n) + 1):
        if n % s == 0 and n // s >= min_rest:
            best = s
    return best


def _axis_rows(shape: tuple, axes: tuple, min_rows: int):
    """For a reduction over several trailing axes: k to sum first over the reduced axes from
    the k-th on, the shortest such rows of at least AXIS_ROW elements (longer ones would leave
    fewer rows), when they leave at least min_rows of them; else None. Splitting where the
    tensor's own axes split keeps the partial sums over the rows its producer computes (a
    softmax's or layer_norm's rows), so multi_output can join them into that row kernel."""
    rs = [shape[d] for d in axes]
    for k in range(len(rs) - 1, 0, -1):
        row = math.prod(rs[k:])
        if row >= AXIS_ROW:
            return k if math.prod(rs[:k]) >= min_rows and row <= MIN_INNER else None
    return None


def _producer_rows(x, inner: int, outer: int):
    """(S, j, k): x's elements viewed in shape S, where its reduced ones are S's axes from j on
    and rows of S's axes from k on (j <= k) are those of a row kernel that computes x: a
    value broadcast along them reaches x elementwise (through reshapes), as a group_norm's
    statistics reach its output. Partial sums over those rows join that kernel (split
    loss sums of group_norm's [N, G, C/G, HW] view). None if there is no such value."""
    stack, seen = [x], set()
    while stack and len(seen) < 64:
        n = stack.pop()
        if n.id in seen or n.size != x.size or not (n.op == "reshape" or is_pointwise(n)):
            continue
        seen.add(n.id)
        stack.extend(n.inputs)
        S = n.shape
        for i in n.inputs:
            if i.size == n.size or len(i.shape) != len(S):
                continue
            k = len(S)
            while k and i.shape[k - 1] == 1 and S[k - 1] != 1:
                k -= 1
            if k == len(S) or tuple(i.shape[:k]) != tuple(S[:k]):
                continue
            j = next((j for j in range(k + 1) if math.prod(S[j:]) == inner), None)
            if j is not None and math.prod(S[:j]) == outer:
                return tuple(S), j, k
    return None


def _reshaped(x, S: tuple, emit, users: dict):
    """x viewed in shape S. A reshape back to S is its input; an elementwise value only this
    view reads, of full-size inputs, is computed in S from its inputs viewed in S: x read in
    the group view stays in the group view, so its kernel's rows stay the row kernel's."""
    if tuple(x.shape) == S:
        return x
    if x.op == "reshape" and tuple(x.inputs[0].shape) == S:
        return x.inputs[0]
    if is_pointwise(x) and len(users.get(x.id, ())) == 1 and x.inputs and \
            all(i.size == x.size and i.shape == x.shape for i in x.inputs):
        return emit(x.op, tuple(_reshaped(i, S, emit, users) for i in x.inputs), x.attrs, x)
    return emit("reshape", (x,), {"shape": S}, x)


def _whole_rows(rows: int, row: int, outer: int, long_rows: bool) -> bool:
    """Rows a row kernel runs well: short ones, enough to fill the GPU with blocks, or (on the
    GPU) long ones one block holds in registers (LONG_ROW), enough of them."""
    return (row <= MIN_INNER and rows >= ROW_BLOCKS // outer) or \
        (long_rows and row <= LONG_ROW and rows >= LONG_ROW_MIN_ROWS)


def split_reductions(graph: Graph, long_rows: bool = True) -> Graph:
    """long_rows: leave rows one GPU block holds (LONG_ROW) whole; off for the CPU, whose row
    loops sum serially (in two stages a long float32 sum keeps its precision)."""
    users = graph.users()

    def visit(n, emit):
        if n.op not in ("sum", "max"):
            return n
        x, axes = n.inputs[0], n.attrs["axes"]
        nd = x.ndim
        inner = math.prod(x.shape[d] for d in axes)
        outer = x.size // max(inner, 1)
        if inner < MIN_INNER or not axes:
            return n
        trailing = tuple(range(nd - len(axes), nd)) == axes
        if long_rows and trailing and inner <= LONG_ROW and outer >= LONG_ROW_MIN_ROWS:
            return n
        leading = tuple(range(len(axes))) == axes
        if trailing and outer < ROW_BLOCKS:
            rows = _producer_rows(x, inner, outer)
            if rows is not None and rows[1] < rows[2] and \
                    _whole_rows(math.prod(rows[0][:rows[2]]), math.prod(rows[0][rows[2]:]), outer, long_rows):
                S, j, k = rows   # partial sums over the rows of the kernel that computes x
                r = _reshaped(x, S, emit, users)
                part = emit(n.op, (r,), {"axes": tuple(range(k, len(S))), "keepdims": False}, n)
                tot = emit(n.op, (part,), {"axes": tuple(range(j, k)), "keepdims": False}, n)
                return tot if tot.shape == n.shape else emit("reshape", (tot,), {"shape": n.shape}, n)
            k = _axis_rows(x.shape, axes, -(-ROW_BLOCKS // outer))
            if k is not None:   # partial sums over the tensor's own trailing axes (its producer's rows)
                keep = nd - len(axes) + k
                part = emit(n.op, (x,), {"axes": tuple(range(keep, nd)), "keepdims": False}, n)
                tot = emit(n.op, (part,), {"axes": tuple(range(nd - len(axes), keep)), "keepdims": False}, n)
                return tot if tot.shape == n.shape else emit("reshape", (tot,), {"shape": n.shape}, n)
            s = _divisor(inner, -(-ROW_BLOCKS // outer), 1024)
            if s < 4:
                return n
            r = emit("reshape", (x,), {"shape": (outer, s, inner // s)}, n)
            part = emit(n.op, (r,), {"axes": (2,), "keepdims": False}, n)
            tot = emit(n.op, (part,), {"axes": (1,), "keepdims": False}, n)
        elif leading and not trailing and outer < COLUMN_THREADS:
            s = _divisor(inner, -(-COLUMN_THREADS // outer), 16)
            if s < 4:
                return n
            r = emit("reshape", (x,), {"shape": (s, inner // s, outer)}, n)
            part = emit(n.op, (r,), {"axes": (1,), "keepdims": False}, n)
            tot = emit(n.op, (part,), {"axes": (0,), "keepdims": False}, n)
        else:
            return n
        return tot if tot.shape == n.shape else emit("reshape", (tot,), {"shape": n.shape}, n)
    return dce(_rewrite(graph, visit))   # values computed again in another view
