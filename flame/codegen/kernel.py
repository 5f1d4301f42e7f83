"""One kernel description, shared by the CPU and CUDA renderers.

`describe(kernel)` turns a fused Kernel into Python statement lines that compute its root at
given loop coordinates: loads from materialized buffers (flat, contiguous), pointwise math
with typed constants, movement ops as index arithmetic, reductions as accumulation loops.
The renderers (cpu.py, cuda.py) only wrap those lines in loops: prange on the CPU, a thread
per element or a block per row on the GPU. Both are Numba, so the statements are the same.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..ir import dtypes as dt
from ..ir.graph import Node
from ..ir.passes import mean_sum
from .fusion import MOVEMENT_OPS, REDUCE_OPS, Kernel, is_literal

# bf16 values are stored as their 16 bits and computed in float32, rounded back to bf16
# after every bf16 op (what storing them would do), so fused kernels equal the interpreter
CTOR = {dt.f32: "np.float32", dt.f64: "np.float64", dt.i32: "np.int32", dt.i64: "np.int64",
        dt.boolean: "np.bool_", dt.bf16: "np.float32"}


class UnsupportedDtype(NotImplementedError):
    pass


def ctor(d: dt.DType) -> str:
    if d not in CTOR:
        raise UnsupportedDtype(f"{d.name} is not supported by the generated kernels yet; "
                               "use bf16, f32 or f64")
    return CTOR[d]


def literal(v, d: dt.DType) -> str:
    v = np.asarray(v).item()
    if d is dt.boolean:
        return "True" if v else "False"
    if isinstance(v, float):
        if math.isnan(v):
            return f"{ctor(d)}(np.nan)"
        if math.isinf(v):
            return f"{ctor(d)}({'-' if v < 0 else ''}np.inf)"
        return f"{ctor(d)}({v!r})"
    return f"{ctor(d)}({int(v)})"


def strides_of(shape):
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return tuple(reversed(st))


def lin(coords, shape) -> str:
    terms = []
    for c, st, s in zip(coords, strides_of(shape), shape):
        if c == "0" or s == 1:
            continue
        terms.append(c if st == 1 else f"{c} * {st}")
    return " + ".join(terms) if terms else "0"


_TOK = re.compile(r"[A-Za-z_]\w*")

UNARY = {
    "neg": "(-{0})", "exp": "math.exp({0})", "log": "math.log({0})", "sqrt": "math.sqrt({0})",
    "rsqrt": "({one} / math.sqrt({0}))", "sin": "math.sin({0})", "cos": "math.cos({0})",
    "tanh": "math.tanh({0})", "erf": "math.erf({0})", "abs": "abs({0})",
    "sign": "({one} if {0} > {zero} else (-{one} if {0} < {zero} else {zero}))",
    "reciprocal": "({one} / {0})", "sigmoid": "({one} / ({one} + math.exp(-{0})))",
    "stop_gradient": "{0}", "logical_not": "(not {0})",
}
BINARY = {
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
    "pow": "({0} ** {1})", "maximum": "({0} if {0} >= {1} or {0} != {0} else {1})",
    "minimum": "({0} if {0} <= {1} or {0} != {0} else {1})",   # a NaN wins, as in numpy
    "safe_mul": "({zero} if {0} == {zero} else {0} * {1})",
    "eq": "({0} == {1})", "ne": "({0} != {1})", "lt": "({0} < {1})", "le": "({0} <= {1})",
    "gt": "({0} > {1})", "ge": "({0} >= {1})", "logical_and": "({0} and {1})",
}


class Body:
    """Statement lines of one loop level; inner levels see the outer level's values."""

    def __init__(self, parent=None, loop_vars=()):
        self.parent = parent
        self.lines = []
        self.memo = {}
        self.own = set(loop_vars)  # names that vary in this loop

    def lookup(self, key):
        b = self
        while b is not None:
            if key in b.memo:
                return b.memo[key]
            b = b.parent
        return None

    def varies(self, text: str) -> bool:
        return any(t in self.own for t in _TOK.findall(text))


@dataclass
class Described:
    kernel: Kernel
    params: list            # (name, node, role) role in read|write
    outer_dims: tuple
    inner_dims: tuple
    n_outer: int
    n_inner: int
    row: Body = None
    reductions: list = field(default_factory=list)   # (acc, op, dtype, Body, value_var, result_var)
    row_stores: list = field(default_factory=list)    # (param, index_expr, value, dtype) once per row
    full_store: object = None   # (Body, index_expr, [(param, value, dtype)]) over the row's elements
    lines: list = field(default_factory=list)         # row-level statements in order
    loads: dict = field(default_factory=dict)         # node id -> index expressions read
    row_cache: dict = field(default_factory=dict)     # rc_* local array -> dtype (GPU rows)
    cache_slots: int = 0
    row_threads: int = 0    # GPU threads that share one row (0: not a block-per-row kernel)
    row_parts: int = 1      # GPU blocks per row, one thread block cluster (see LONG_ROW_BLOCKS)
    # index of a reduction summing squared deviations from another's mean -> that one's index
    # (see squared_deviations): the GPU renderer may take both in one pass over the row
    deviations: dict = field(default_factory=dict)

    def in_place_candidates(self) -> list:
        """Buffers this kernel reads only at the index it writes: the output may overwrite
        them (each element is read before it is written, by the same thread)."""
        if self.kernel.extra:
            return []    # several outputs: keep it simple, none written in place
        # (a row on several blocks qualifies too: each block reads only its own part of it)
        idx = self.row_stores[0][1] if self.row_stores else self.full_store[1]
        out = self.kernel.root
        return [nid for nid, exprs in self.loads.items()
                if exprs == {idx} and nid != out.id]


class Describer:
    def __init__(self, kernel: Kernel, row_block: int = 0, prefetch: dict = None, long_row_parts: int = 1):
        """row_block: at most this many GPU threads share a row (0: the CPU renderer); see
        row_threads. long_row_parts: at most this many blocks (a cluster) share a long row.
        When each thread has at most ROW_CACHE_SLOTS elements of its row, it keeps those it
        loads in registers (rc_* local arrays), so later passes over the row (variance after
        mean, normalise after both) do not read memory again.
        prefetch: node id -> node, of row elements to load into registers in the first
        pass although a later pass reads them first (see describe())."""
        self.k = kernel
        self.prefetch = prefetch or {}
        self.first_stage = None
        self.late_loads = {}   # cached node id -> node, first loaded after the first pass
        self.members = kernel.member_ids
        self.params = {}
        self.param_list = []
        self.red_vars = {}
        self.loads = {}      # materialized node id -> index expressions it is read at
        self.n = 0
        full, raxes = kernel.full, kernel.raxes
        self.outer_dims = tuple(d for d in range(len(full)) if d not in raxes)
        self.inner_dims = tuple(raxes)
        self.ocoord = {d: (f"o{d}" if full[d] != 1 else "0") for d in self.outer_dims}
        self.icoord = {d: (f"ri{d}" if full[d] != 1 else "0") for d in self.inner_dims}
        n_inner = math.prod(full[d] for d in self.inner_dims)
        rows = bool(raxes) and (len(full) - 1) in raxes
        self.row_threads = row_threads(n_inner, row_block) if rows and row_block else 0
        slots = -(-n_inner // self.row_threads) if self.row_threads else 0
        most, self.cache_arrays, self.row_parts = ROW_CACHE_SLOTS, 1 << 30, 1
        n_outer = math.prod(full[d] for d in self.outer_dims)
        parts = max(1, min(long_row_parts, LONG_ROW_BLOCKS // n_outer))
        part_slots = -(-(-(-n_inner // LONG_ROW_THREADS)) // parts)   # a block's, of a long row
        if slots > ROW_CACHE_SLOTS and part_slots <= LONG_ROW_SLOTS:
            # a long row (a group_norm group) is held by one block of the most threads, or by
            # a cluster of `parts` of them, each holding its part
            self.row_threads, most, self.row_parts = LONG_ROW_THREADS, LONG_ROW_SLOTS, parts
            slots = part_slots
            # within its 64 registers a thread holds LONG_ROW_SLOTS elements
            self.cache_arrays = LONG_ROW_SLOTS // slots
        self.cache_slots = slots if 1 <= slots <= most else 0   # a thread's, in its block's part
        self.cached = {}     # node id -> (local array name, dtype)
        # (coords, shape) -> a simpler expression of lin(coords, shape): the loop's own flat
        # index where the coordinates are the iteration space's, and the flat index a
        # reshape started from (a reshape keeps every element's flat index)
        self.flat = {}
        fc = self.full_coords()
        if not raxes:
            self.flat[(fc, full)] = "o"
        elif self.inner_dims == tuple(range(len(self.outer_dims), len(full))):
            self.flat[(fc, full)] = f"o * {n_inner} + r" if n_inner < math.prod(full) else "r"
        elif self.outer_dims == tuple(range(len(self.inner_dims), len(full))):
            self.flat[(fc, full)] = f"r * {math.prod(full) // n_inner} + o" if n_inner < math.prod(full) else "r"
        # the flat index of this thread's own element of the iteration space
        self.own_flat = self.linear(fc, full)

    def linear(self, coords, shape) -> str:
        """The flat index of `coords` in a contiguous array of `shape`."""
        coords = tuple("0" if s == 1 else c for c, s in zip(coords, shape))
        return self.flat.get((coords, tuple(shape))) or lin(coords, shape)

    def fresh(self, prefix="v"):
        self.n += 1
        return f"{prefix}{self.n}"

    def param(self, node: Node, role="read") -> str:
        if node.id not in self.params:
            writes = sum(1 for p in self.param_list if p[2] == "write")
            name = f"p{len(self.param_list)}" if role == "read" else f"out{writes or ''}"
            self.params[node.id] = name
            self.param_list.append((name, node, role))
        return self.params[node.id]

    # coordinates ---------------------------------------------------------
    def full_coords(self):
        return tuple(self.ocoord.get(d) or self.icoord[d] for d in range(len(self.k.full)))

    def red_coords(self):
        return tuple(self.ocoord.get(d, "0") for d in range(len(self.k.full)))

    def assign(self, body: Body, expr: str, prefix="v") -> str:
        if _TOK.fullmatch(expr) or expr.lstrip("-").isdigit():
            return expr
        while body.parent is not None and not body.varies(expr):
            body = body.parent
        hit = body.lookup(("expr", expr))   # the same expression already has a name here
        if hit is not None:
            return hit
        v = self.fresh(prefix)
        body.memo[("expr", expr)] = v
        body.lines.append(f"{v} = {expr}")
        if body.parent is not None:
            body.own.add(v)
        return v

    # values --------------------------------------------------------------
    def emit(self, body: Body, node: Node, coords: tuple) -> str:
        coords = tuple("0" if s == 1 else c for c, s in zip(coords, node.shape))
        key = (node.id, coords)
        hit = body.lookup(key)
        if hit is not None:
            return hit
        v = self._emit(body, node, coords)
        # remember where the value lives: the outermost body it does not vary in
        b = body
        while b.parent is not None and not b.varies(v):
            b = b.parent
        b.memo[key] = v
        return v

    def _emit(self, body, node, coords):
        if is_literal(node):
            return literal(node.attrs["value"], node.dtype)
        if node.id not in self.members:
            ctor(node.dtype)
            at = self.linear(coords, node.shape)
            self.loads.setdefault(node.id, set()).add(at)
            # this thread's own element of the row (also through a reshape): kept in registers
            cache = self.cache_slots and body.parent is not None and \
                at == self.own_flat and \
                (node.id in self.cached or len(self.cached) < self.cache_arrays)
            if cache and node.id in self.cached:
                return self.assign(body, f"{self.cached[node.id][0]}[j]")
            if cache:
                v = self._load(body, node, coords)
                name = f"rc_{self.param(node)}"
                body.lines.append(f"{name}[j] = {v}")
                self.cached[node.id] = (name, node.dtype)
                if body is not self.first_stage:
                    self.late_loads[node.id] = node
                return v
            return self._load(body, node, coords)
        if node.op in REDUCE_OPS:
            if node.id not in self.red_vars or coords != self._row_coords(node.shape):
                raise AssertionError(f"reduction %{node.id} read off its rows in {self.k.name}")
            return self.red_vars[node.id]
        if node.op in MOVEMENT_OPS:
            return self._movement(body, node, coords)
        v = self._pointwise(body, node, coords)
        return self.assign(body, f"_bf16_round({v})") if node.dtype is dt.bf16 else v

    def _view_coords(self, body, flat: str, shape) -> tuple:
        """Coordinates, in `shape`, of the element at the kernel's own flat index `flat`: the
        iteration space's own coordinates, or (a view of the same elements in another shape,
        such as the [N, C, H, W] silu after a group_norm's [N, G, C/G, HW] rows) split from it."""
        if tuple(shape) == tuple(self.k.full):
            return self.full_coords()
        if flat == self.own_flat and unit_axes_apart(shape, self.k.full):
            # only size-1 axes added or removed: the own coordinates carry over as they are
            sub = carry_over_unit_axes(self.full_coords(), self.k.full, shape)
            self.flat[(sub, tuple(shape))] = flat
            return sub
        i = self.assign(body, flat, "i")
        sub = tuple(self.assign(body, e, "i") for e in split_flat(i, tuple(shape)))
        self.flat[(sub, tuple(shape))] = flat
        return sub

    def _load(self, body, node, coords):
        idx = self.assign(body, self.linear(coords, node.shape), "i")
        if node.dtype is dt.boolean:   # bools live in memory as one byte, 0 or 1
            return self.assign(body, f"({self.param(node)}[{idx}] != 0)")
        if node.dtype is dt.bf16:
            return self.assign(body, f"_bf16_load({self.param(node)}[{idx}])")
        return self.assign(body, f"{self.param(node)}[{idx}]")

    def _bcast(self, coords, out_shape, in_shape):
        lead = len(out_shape) - len(in_shape)
        return tuple("0" if s == 1 else coords[d + lead] for d, s in enumerate(in_shape))

    def _pointwise(self, body, node, coords):
        op, a = node.op, node.attrs
        d = node.dtype if node.dtype.is_float else (node.inputs[0].dtype if node.inputs else node.dtype)
        consts = {}
        if d.is_float:
            consts = {"one": literal(1.0, d), "zero": literal(0.0, d)}
        elif d is not dt.boolean and node.inputs:
            consts = {"one": literal(1, d), "zero": literal(0, d)}
        if op in ("rand_uniform", "rand_normal"):
            seed = self.emit(body, node.inputs[0], ())
            idx = self.assign(body, self.linear(coords, node.shape), "i")
            fn = "_uniform" if op == "rand_uniform" else "_normal"
            return self.assign(body, f"{ctor(node.dtype)}({fn}({seed}, {a['stream']}, {idx}))")
        if op == "const":
            raise AssertionError("array constants are read from memory")
        args = [self.emit(body, i, self._bcast(coords, node.shape, i.shape)) for i in node.inputs]
        if op in UNARY:
            return self.assign(body, UNARY[op].format(*args, **consts))
        if op in BINARY:
            if op in ("eq", "ne", "lt", "le", "gt", "ge", "logical_and"):
                consts = {}
            return self.assign(body, BINARY[op].format(*args, **consts))
        if op == "where":
            return self.assign(body, f"({args[1]} if {args[0]} else {args[2]})")
        if op == "cast":
            to = a["dtype"]
            if to is dt.boolean:
                return self.assign(body, f"({args[0]} != 0)")
            return self.assign(body, f"{ctor(to)}({args[0]})")
        raise NotImplementedError(f"no kernel rule for {op}")

    def _movement(self, body, node, coords):
        op, a, x = node.op, node.attrs, node.inputs[0]
        if op == "reshape":
            if x.shape == node.shape:
                return self.emit(body, x, coords)
            at = self.linear(coords, node.shape)
            if tuple(x.shape) == tuple(self.k.full) and at == self.own_flat:
                # back to the iteration space at the kernel's own element: its own coordinates
                # (row reductions are read there)
                return self.emit(body, x, self.full_coords())
            if unit_axes_apart(x.shape, node.shape):
                # only size-1 axes added or removed: the other coordinates carry over as they
                # are (so a row reduction reshaped is still read at its row's coordinates),
                # and so does the flat index they are known to stand for
                sub = carry_over_unit_axes(coords, node.shape, x.shape)
                if (coords, tuple(node.shape)) in self.flat:
                    self.flat.setdefault((sub, tuple(x.shape)), at)
                return self.emit(body, x, sub)
            flat = self.assign(body, at, "i")
            sub = tuple(self.assign(body, e, "i") for e in split_flat(flat, x.shape))
            self.flat[(sub, x.shape)] = at
            return self.emit(body, x, sub)
        if op == "permute":
            sub = [None] * x.ndim
            for k, p in enumerate(a["perm"]):
                sub[p] = coords[k]
            return self.emit(body, x, tuple(sub))
        if op == "expand":
            return self.emit(body, x, self._bcast(coords, node.shape, x.shape))
        if op == "slice":
            sub = []
            for c, b, st in zip(coords, a["starts"], a["steps"]):
                if c == "0":
                    sub.append(str(b))
                    continue
                e = c if st == 1 else f"{c} * {st}"
                e = f"{e} + {b}" if b else e
                sub.append(c if e == c else self.assign(body, e, "i"))
            return self.emit(body, x, tuple(sub))
        if op == "upsample_nearest":
            sh, sw = a["scale"]
            sub = list(coords[:-2]) + [self.assign(body, f"({coords[-2]} // {sh})", "i"),
                                       self.assign(body, f"({coords[-1]} // {sw})", "i")]
            return self.emit(body, x, tuple(sub))
        if op == "pad":
            conds, sub = [], []
            for c, s, (lo, hi, it) in zip(coords, x.shape, a["pads"]):
                if (lo, hi, it) == (0, 0, 0):
                    sub.append(c)
                    continue
                u = self.assign(body, f"({c} - {lo})", "i")
                q = u if it == 0 else self.assign(body, f"({u} // {it + 1})", "i")
                conds.append(f"{u} >= 0 and {q} < {s}" + (f" and {u} % {it + 1} == 0" if it else ""))
                sub.append(self.assign(body, f"min(max({q}, 0), {s - 1})", "i"))
            val = self.emit(body, x, tuple(sub))
            cond = self.assign(body, "(" + " and ".join(conds) + ")", "c")
            return self.assign(body, f"({val} if {cond} else {literal(a['value'], node.dtype)})")
        if op == "concat":
            ax = a["axis"]
            c = coords[ax]
            vals, offs, off = [], [], 0
            for inp in node.inputs:
                s = inp.shape[ax]
                sub = list(coords)
                sub[ax] = self.assign(body, f"min(max({c} - {off}, 0), {s - 1})", "i")
                vals.append(self.emit(body, inp, tuple(sub)))
                off += s
                offs.append(off)
            expr = vals[-1]
            for v, end in zip(reversed(vals[:-1]), reversed(offs[:-1])):
                expr = f"({v} if {c} < {end} else {expr})"
            return self.assign(body, expr)
        raise NotImplementedError(op)

    # the whole kernel ----------------------------------------------------
    def _row_coords(self, shape) -> tuple:
        """Where a per-row value of `shape` (reduced axes kept as 1, or dropped) is read."""
        if len(shape) == len(self.k.full):
            at = self.red_coords()
        else:
            at = tuple(self.ocoord[d] for d in self.outer_dims)
        return tuple("0" if s == 1 else c for c, s in zip(at, shape))

    def _row_index(self) -> str:
        return "o"   # the loops' row index: unravel() splits it over the outer dims in order

    def _reads_any(self, node: Node, ids: set) -> bool:
        """Whether node, computed in this kernel, depends on any of the nodes `ids`."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n.id in ids:
                return True
            if n.id in seen or n.id not in self.members:
                continue
            seen.add(n.id)
            stack.extend(n.inputs)
        return False

    def describe(self) -> Described:
        k = self.k
        n_outer = math.prod(k.full[d] for d in self.outer_dims)
        n_inner = math.prod(k.full[d] for d in self.inner_dims)
        row = Body(None, [v for v in self.ocoord.values() if v != "0"] + ["o"])
        desc = Described(k, [], self.outer_dims, self.inner_dims, n_outer, n_inner, row)
        inner_vars = [v for v in self.icoord.values() if v != "0"] + ["r", "j"]
        # reductions that do not read each other's results share one pass over the row (a
        # stage: one loop, and on the GPU one barrier): a softmax backward's two sums, a loss's
        # partial sum beside them. Values the stage's loop reads from the row level go before it.
        stage, stage_reds, stage_at = None, set(), 0
        red_nodes = []
        for n in k.nodes:
            if n.op in REDUCE_OPS:
                join = stage is not None and not self._reads_any(n.inputs[0], stage_reds)
                if not join:
                    stage, stage_reds = Body(row, inner_vars), set()
                    if self.first_stage is None:
                        self.first_stage = stage
                        own = self.linear(self.full_coords(), self.k.full)
                        for node in self.prefetch.values():   # read at this thread's own element
                            self.emit(stage, node, self._view_coords(stage, own, node.shape))
                before = len(row.lines)
                val = self.emit(stage, n.inputs[0], self.full_coords())
                if join:
                    hoisted = row.lines[before:]
                    del row.lines[before:]
                    row.lines[stage_at:stage_at] = hoisted
                    stage_at += len(hoisted)
                acc = self.fresh("acc")
                res = self.fresh("red")
                self.red_vars[n.id] = res
                desc.reductions.append((acc, n.op, n.dtype, stage, val, res))
                red_nodes.append(n)
                if not join:
                    stage_at = len(row.lines)
                row.lines.append(("reduce", len(desc.reductions) - 1))
                stage_reds.add(n.id)
        full_vals = []
        for r, store, _ in [(k.root, k.store, k.chain)] + k.extra:
            out = self.param(r, "write")    # reshapes after `store` only rename the buffer
            if k.raxes and n_inner > 1 and store.size == math.prod(k.full) and store.op not in REDUCE_OPS:
                full_vals.append((out, store))   # also in another view of the same elements
            elif store.op in REDUCE_OPS:
                desc.row_stores.append((out, self._row_index(), self.red_vars[store.id], store.dtype))
            else:
                at = self._row_coords(store.shape) if k.raxes else self.full_coords()
                val = self.emit(row, store, at)
                desc.row_stores.append((out, self._row_index(), val, store.dtype))
        if full_vals:
            body = Body(row, inner_vars)
            own = self.linear(self.full_coords(), k.full)
            vals = [(out, self.emit(body, store, self._view_coords(body, own, store.shape)), store.dtype)
                    for out, store in full_vals]
            desc.full_store = (body, own, vals)
        desc.deviations = {i: j for i, n in enumerate(red_nodes) for j, m in enumerate(red_nodes)
                           if squared_deviations(n, m)}
        desc.loads = self.loads
        desc.row_cache = dict(self.cached.values())
        desc.cache_slots = self.cache_slots
        desc.row_threads = self.row_threads
        desc.row_parts = self.row_parts
        # outputs last: reads in order of first use, then the written buffer
        desc.params = [p for p in self.param_list if p[2] == "read"] + \
                      [p for p in self.param_list if p[2] == "write"]
        return desc


def squared_deviations(q: Node, s: Node) -> bool:
    """Whether reduction q sums (e - mean)**2 where mean is s * (1 / count) and s sums e over
    the same axes, kept (passes.mean_sum; so each row reads its own): q is the sum of squared
    deviations of e from its mean (a variance's numerator). A kernel computes them one after
    the other (two passes: the mean first); Chan's pairwise formula combines partial (sum,
    squared deviations) of the row's parts in one (cuda._render_rows)."""
    if q.op != "sum" or s.op != "sum" or q.attrs.get("axes") != s.attrs.get("axes") or \
            q.dtype not in (dt.f32, dt.f64):
        return False
    sq = q.inputs[0]   # d * d or d ** 2
    squared = (sq.op == "mul" and sq.inputs[0] is sq.inputs[1]) or \
        (sq.op == "pow" and is_literal(sq.inputs[1]) and float(sq.inputs[1].attrs["value"]) == 2.0)
    if not squared or sq.inputs[0].op != "sub":
        return False
    e, mean = sq.inputs[0].inputs
    return e is s.inputs[0] and e.shape == sq.shape and mean_sum(mean) is s


def row_steps(desc: Described):
    """desc.row.lines with consecutive reductions of one stage (one shared loop body) grouped:
    each item is a statement or a list of indices into desc.reductions."""
    out = []
    for line in desc.row.lines:
        if isinstance(line, tuple):
            if out and isinstance(out[-1], list) and desc.reductions[out[-1][0]][3] is desc.reductions[line[1]][3]:
                out[-1].append(line[1])
            else:
                out.append([line[1]])
        else:
            out.append(line)
    return out


ROW_CACHE_SLOTS = 16
# Rows longer than a block of `row_block` threads holds in ROW_CACHE_SLOTS registers each, up to
# LONG_ROW_THREADS * LONG_ROW_SLOTS elements, take a block of LONG_ROW_THREADS threads that
# keeps the whole row in registers (the kernel's launch bounds cap them at 64 a thread): the
# row is read from memory once however many passes its statistics take (split_reductions
# leaves such rows whole, see split.LONG_ROW).
LONG_ROW_THREADS = 1024
LONG_ROW_SLOTS = 48
# Fewer long rows than an H100's (and H200's) 132 SMs leave SMs idle (64 groups of SD 1.5's
# group_norm at batch 2): up to LONG_ROW_PARTS blocks then take each row, launched as one
# thread block cluster (sm_90). Each reads and stores only its part of the row; the blocks
# combine their partial sums through each other's shared memory (cluster.py).
LONG_ROW_BLOCKS = 132
LONG_ROW_PARTS = 4
ROW_ELEMENTS = 8    # elements of a row per GPU thread to aim for: loads in flight, short reductions


def row_threads(n_inner: int, block: int) -> int:
    """GPU threads sharing one row of n_inner elements: a power of two, about ROW_ELEMENTS
    elements each, at most `block`. Short rows take fewer threads (several rows share a
    block) instead of leaving most of a block idle."""
    t = 1
    while t < block and t * ROW_ELEMENTS < n_inner:
        t *= 2
    return t


ROW_PREFETCH = True


def describe(kernel: Kernel, row_block: int = 0, long_row_parts: int = 1) -> Described:
    """The kernel's description. A GPU row kernel whose later passes first load row elements
    it keeps in registers (a softmax backward's upstream gradient, read after the max and
    the sum) is described again with those loads in the first pass: all of a row's loads are
    then in flight together, not one batch after each barrier. long_row_parts: see
    Describer; a row whose reductions have a type the blocks cannot exchange (booleans) stays
    on one block."""
    d = Describer(kernel, row_block, long_row_parts=long_row_parts)
    desc = d.describe()
    if desc.row_parts > 1 and any(r[2].name not in EXCHANGED for r in desc.reductions):
        return describe(kernel, row_block, 1)
    if ROW_PREFETCH and d.late_loads:
        return Describer(kernel, row_block, prefetch=d.late_loads, long_row_parts=long_row_parts).describe()
    return desc


# accumulator dtypes whose partial results the blocks of a cluster exchange (the types
# cluster.cluster_load reads; bf16 accumulates in float32)
EXCHANGED = ("f32", "f64", "i32", "i64", "bf16")


def div_mod(total: int):
    """Formatters of floor division and remainder for non-negative indices below `total`:
    unsigned 32-bit (_div/_mod in the prelude, a few instructions on the GPU, where signed
    64-bit floor division costs dozens) below 2**31, else Python's own."""
    if total < 2 ** 31:
        return "_div({}, {})".format, "_mod({}, {})".format
    return "({} // {})".format, "({} % {})".format


def unit_axes_apart(a: tuple, b: tuple) -> bool:
    """Whether shapes a and b differ only by axes of size 1."""
    return [s for s in a if s != 1] == [s for s in b if s != 1]


def carry_over_unit_axes(coords: tuple, shape: tuple, to: tuple) -> tuple:
    """`coords` in `shape` as coordinates in `to`, a shape apart from it only by size-1 axes."""
    kept = iter(c for c, s in zip(coords, shape) if s != 1)
    return tuple("0" if s == 1 else next(kept) for s in to)


def split_flat(var: str, shape: tuple) -> list:
    """Expressions of the coordinates of flat index `var` in a contiguous array of `shape`."""
    total = math.prod(shape)
    div, mod = div_mod(total)
    out = []
    for s, k in zip(shape, strides_of(shape)):
        if s == 1:
            out.append("0")
            continue
        e = var if k == 1 else div(var, k)
        out.append(e if k * s == total else mod(e, s))
    return out


def unravel(var: str, dims: tuple, full: tuple, names: dict) -> list:
    """Statements that split flat loop index `var` into the coordinates of `dims`."""
    dims = [d for d in dims if full[d] != 1]
    return [f"{names[d]} = {e}" for d, e in zip(dims, split_flat(var, tuple(full[d] for d in dims)))]


_ASSIGN = re.compile(r"\s*((?:o|ri|i|v|c)\d+) = ")


def needed(lines: list, exprs: list) -> list:
    """The value statements of `lines` that the expressions read, directly or through each
    other, in order; every other kind of line is kept."""
    reads, kept = set(_TOK.findall(" ".join(exprs))), []
    for line in reversed(lines):
        m = _ASSIGN.match(line)
        if m is None or m.group(1) in reads:
            kept.append(line)
            reads.update(_TOK.findall(line[m.end():] if m else line))
    return kept[::-1]


def assigns(line: str):
    """The name a value statement assigns (o3, i1, v7, ...), or None."""
    m = _ASSIGN.match(line)
    return m.group(1) if m else None


def drop_unused(lines: list) -> list:
    """Remove value statements (coordinates, indices, values: all pure) that nothing reads,
    e.g. the coordinates of a kernel that indexes by its flat loop index, so the printed
    kernel shows only what it computes."""
    while True:
        reads = set()
        for l in lines:
            m = _ASSIGN.match(l)
            reads.update(_TOK.findall(l[m.end():] if m else l))
        kept = [l for l in lines if not ((m := _ASSIGN.match(l)) and m.group(1) not in reads)]
        if len(kept) == len(lines):
            return kept
        lines = kept
