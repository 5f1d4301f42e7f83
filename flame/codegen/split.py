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
from ..ir.passes import _rewrite

MIN_INNER = 1 << 15      # shorter rows are cheap enough whole
ROW_BLOCKS = 528         # 4 blocks per SM on a 132-SM H100: enough rows to fill the chip
COLUMN_THREADS = 1 << 15
AXIS_ROW = 32            # shortest trailing-axes row a split may keep as its partial rows


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


def split_reductions(graph: Graph) -> Graph:
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
        leading = tuple(range(len(axes))) == axes
        if trailing and outer < ROW_BLOCKS:
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
    return _rewrite(graph, visit)
