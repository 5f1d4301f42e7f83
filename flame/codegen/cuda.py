"""Render a kernel description as Numba CUDA source.

Elementwise kernels: each thread computes ELEMENTWISE_PER_THREAD elements a block apart (the
loads of all of them in flight at once), adjacent threads adjacent elements. Row kernels
(the last axis reduced): a row is shared by a power of two of threads (row_threads: about
eight elements each, so short rows put several rows in a block); each thread keeps the row
elements it loads in registers, partial results meet through warp shuffles and, across
warps, one shared-memory slot per warp read back into a shuffle butterfly. A row's mean and
its squared deviations from it (a norm's variance) meet in one exchange, by Chan's pairwise
formula (one_pass_moments), not one after the other. Long rows (up to 49152 elements) take
a block of 1024 threads; where there are fewer of them than SMs, a thread block cluster of
several blocks takes each row, each block loading and storing its own part and the blocks'
partial results meeting through each other's shared memory (kernel.LONG_ROW_BLOCKS,
cluster.py). Reductions over leading axes: a thread per output.
Every float constant is typed (np.float32(...)), so float32 kernels compile to float32 PTX."""
from __future__ import annotations

import math
import re

from ..ir import dtypes as dt
from .kernel import _TOK, Described, assigns, drop_unused, literal, needed, row_steps, unravel
from .prelude import CUDA_PRELUDE as PRELUDE   # the helpers, shared with the CPU renderer


NUMBA_TYPE = {dt.f32: "numba.float32", dt.f64: "numba.float64", dt.i32: "numba.int32",
              dt.i64: "numba.int64", dt.boolean: "numba.boolean", dt.bf16: "numba.float32"}
ELEMENTWISE_BLOCK = 256
ELEMENTWISE_PER_THREAD = 4
# tiles (ELEMENTWISE_BLOCK x ELEMENTWISE_PER_THREAD outputs) a block, in turn, the next one's
# loads issued before this one's arithmetic; 1: a tile a block, the fastest on an H100 on
# 2026-12-07 (2, 4, 8 tiles: 2-7% slower on the chain; bench/experiments/elementwise_sweep.py)
ELEMENTWISE_TILES = 1
ONE_PASS_MOMENTS = True   # a row's mean and squared deviations in one exchange (one_pass_moments)


def _init(op, d):
    if op == "sum":
        return literal(0, d)
    return literal(float("-inf"), d) if d.is_float else f"{literal(0, d).split('(')[0]}(-9223372036854775807)"


def _combine(op, a, b):
    return f"{a} + {b}" if op == "sum" else f"{b} if ({b} > {a} or {b} != {b}) else {a}"   # NaN wins, like numpy


def _stage(reds):
    """Lines of one stage of reductions (desc.reductions entries sharing a loop): the
    accumulators' initial values, their updates inside the loop, and the results after it."""
    return ([f"{acc} = {_init(op, d)}" for acc, op, d, *_ in reds],
            [f"{acc} = {_combine(op, acc, val)}" for acc, op, _, _, val, _ in reds],
            [f"{res} = " + (f"_bf16_round({acc})" if d is dt.bf16 else acc) for acc, _, d, _, _, res in reds])


def block_per_row(desc: Described) -> bool:
    """Rows whose last axis is reduced are contiguous: a block strides along each. Otherwise
    (reductions over leading axes) adjacent threads take adjacent outputs and each loops over
    its row alone, so the loads stay coalesced."""
    return bool(desc.inner_dims) and (len(desc.kernel.full) - 1) in desc.inner_dims


def rows_per_block(desc: Described, block: int) -> int:
    return max(1, block // desc.row_threads)


def per_thread(desc: Described) -> int:
    """Elements per thread of a kernel without reductions (a thread per output otherwise)."""
    return 1 if desc.reductions else ELEMENTWISE_PER_THREAD


def threads_per_block(desc: Described, block: int) -> int:
    return launch_dims(desc, block)[1]


def launch_dims(desc: Described, block: int):
    """(grid, block) for this kernel."""
    if block_per_row(desc):
        rpb = rows_per_block(desc, block)
        return -(-desc.n_outer // rpb) * desc.row_parts, rpb * desc.row_threads
    per = per_thread(desc)
    tiles = -(-desc.n_outer // (ELEMENTWISE_BLOCK * per))
    return (-(-tiles // ELEMENTWISE_TILES) if per > 1 else tiles), ELEMENTWISE_BLOCK


def _store(d, v):
    if d is dt.boolean:
        return f"np.uint8(1) if {v} else np.uint8(0)"
    return f"_bf16_bits({v})" if d is dt.bf16 else v


def cluster_blocks(desc: Described) -> int:
    """Blocks per thread block cluster this kernel is launched with (1: no cluster)."""
    return desc.row_parts if block_per_row(desc) else 1


def jit_line(desc: Described, block: int) -> str:
    """The decorator line, noting the threads each block is launched with: ptx.kernel_ptx
    compiles with those launch bounds, so a 1024-thread block's kernel fits its registers
    (the simulator's jit takes no launch bounds, hence a comment)."""
    return f"@cuda.jit  # launch_bounds={threads_per_block(desc, block)}"


def render(desc: Described, name: str, block: int = 256) -> str:
    """block: threads per block of row kernels (a power of two)."""
    if block_per_row(desc):
        return _render_rows(desc, name, block)
    k = desc.kernel
    inames = {d: f"ri{d}" for d in desc.inner_dims}
    out = [jit_line(desc, block), f"def {name}({', '.join(p[0] for p in desc.params)}):"]
    per = per_thread(desc)
    if per > 1:
        return "\n".join(drop_unused(out + _elementwise_tiles(desc, per))) + "\n"
    ind = "    "
    out += [ind + "o = cuda.grid(1)", ind + f"if o >= {desc.n_outer}:", ind + "    return"]
    out += [ind + l for l in _coords(desc)]

    def inner_loop(body, tail):   # this thread's output alone, over its reduced axes
        lines = unravel("r", desc.inner_dims, k.full, inames) + body.lines + tail
        return [ind + f"for r in range({desc.n_inner}):"] + [ind + "    " + l for l in lines]

    for step in row_steps(desc):
        if not isinstance(step, list):
            out.append(ind + step)
            continue
        reds = [desc.reductions[i] for i in step]   # one stage: one loop, several accumulators
        inits, updates, results = _stage(reds)
        out += [ind + l for l in inits] + inner_loop(reds[0][3], updates) + [ind + l for l in results]
    for param, idx, val, d in desc.row_stores:
        out.append(ind + f"{param}[{idx}] = {_store(d, val)}")
    if desc.full_store is not None:   # values over the reduced axes too, after the reductions
        body, idx, vals = desc.full_store
        out += inner_loop(body, [f"{param}[{idx}] = {_store(d, val)}" for param, val, d in vals])
    return "\n".join(drop_unused(out)) + "\n"


STORED_TYPE = {dt.boolean: "numba.uint8", dt.bf16: "numba.uint16"}   # what _store writes
_LOAD = re.compile(r"\b(p\d+)\[([^\[\]]+)\]")   # a read of kernel parameter p<k>


def _stored_type(d) -> str:
    return STORED_TYPE.get(d, NUMBA_TYPE[d])


def _elementwise_tiles(desc: Described, per: int) -> list:
    """A thread's `per` outputs, ELEMENTWISE_BLOCK apart: a tile of ELEMENTWISE_BLOCK * per
    outputs a block, ELEMENTWISE_TILES tiles a block one after another. In a whole tile every
    load is issued first, into local arrays, then the arithmetic, then the stores, so a thread
    has all its loads in flight at once (one at a time does not fill HBM's pipe):
    - a store may alias a later load, so a load written after a store stays behind it;
    - NVVM sinks each load to its use, and ptxas hoists no load back over a branch, which
      arithmetic such as a division has (its slow path): the empty asm barrier after the
      loads (prelude's _loads_issued) keeps them first. On the H100 it took the tanh/sigmoid
      chain from 83% of a copy's rate to 100%.
    With several tiles a block, the next tile's loads are issued before this tile's
    arithmetic, so a thread has loads in flight while it computes. The last, partial tile
    (if any) guards each output and keeps the plain order."""
    tile, T = ELEMENTWISE_BLOCK * per, ELEMENTWISE_TILES
    whole = desc.n_outer // tile
    loads = sorted({m.group(0) for line in row_steps(desc) for m in _LOAD.finditer(line)})
    index_lines = needed(_coords(desc) + row_steps(desc), loads)   # what the loads' indices read
    hoist = bool(loads) and _indices_need_no_values(index_lines)   # the loads can go first
    ahead = hoist and T > 1
    out = [f"t0 = cuda.blockIdx.x * {T}" if T > 1 else "t0 = cuda.blockIdx.x",
           f"base = t0 * {tile} + cuda.threadIdx.x"]
    out += [f"k{i}_ = cuda.local.array({per}, {_stored_type(d)})" for i, (*_, d) in enumerate(desc.row_stores)]
    if whole and ahead:
        out += _tiles_loading_ahead(desc, per, loads, index_lines, whole)
    elif whole and hoist:
        out += _load_arrays(desc, per, loads, "now")
        out += [f"if t0 < {whole}:"] + _indent(_fetch("now", "base", per, loads, index_lines) +
                                               _whole_tile(desc, per, _loaded("now", loads)), 1)
    elif whole:
        out += [f"if t0 < {whole}:"] + _indent(_whole_tile(desc, per), 1)
    if desc.n_outer % tile:   # the block whose tiles reach past the whole ones takes the partial tile
        out += [f"if t0 <= {whole} < t0 + {T}:" if T > 1 else f"if t0 == {whole}:",
                f"    base = {whole * tile} + cuda.threadIdx.x"] + _indent(_partial_tile(desc, per), 1)
    return _indent(out, 1)


def _indent(lines: list, levels: int) -> list:
    return ["    " * levels + line for line in lines]


def _coords(desc: Described) -> list:
    return unravel("o", desc.outer_dims, desc.kernel.full, {d: f"o{d}" for d in desc.outer_dims})


def _whole_tile(desc: Described, per: int, loaded: dict | None = None) -> list:
    """The tile at `base`: every output's value into k<i>_, then the stores. loaded: each
    load's local array (read at [u]) where the loads were issued already."""
    B, stores = ELEMENTWISE_BLOCK, desc.row_stores
    values = row_steps(desc)   # no reductions (per_thread is 1 with them): statements only
    if loaded:
        values = [_LOAD.sub(lambda m: f"{loaded[m.group(0)]}[u]", line) for line in values]
    body = needed(_coords(desc) + values, [val for _, _, val, _ in stores])
    lines = [f"for u in range({per}):"] + ([f"    o = base + u * {B}"] if "o" in _TOK.findall(" ".join(body)) else [])
    lines += _indent(body, 1) + [f"    k{i}_[u] = {_store(d, val)}" for i, (_, _, val, d) in enumerate(stores)]
    lines += [f"for u in range({per}):", f"    o = base + u * {B}"]
    lines += _indent(needed(_coords(desc), [idx for _, idx, _, _ in stores]), 1)
    return lines + [f"    {param}[{idx}] = k{i}_[u]" for i, (param, idx, _, _) in enumerate(stores)]


def _tiles_loading_ahead(desc: Described, per: int, loads: list, index_lines: list, whole: int) -> list:
    """The block's whole tiles, each tile's loads into now<j>_ arrays issued one tile ahead
    (into next<j>_ while the tile before computes)."""
    T, tile = ELEMENTWISE_TILES, ELEMENTWISE_BLOCK * per
    lines = _load_arrays(desc, per, loads, "now") + _load_arrays(desc, per, loads, "next")
    has_next = f"t < {T - 1} and t0 + t + 1 < {whole}"   # the block's own next tile, if whole
    step = ([f"if {has_next}:"] + _indent(_fetch("next", f"base + {tile}", per, loads, index_lines), 1) +
            _whole_tile(desc, per, _loaded("now", loads)) +
            [f"if {has_next}:", f"    for u in range({per}):"] +
            [f"        now{j}_[u] = next{j}_[u]" for j in range(len(loads))] + [f"base += {tile}"])
    lines += [f"if t0 < {whole}:"] + _indent(_fetch("now", "base", per, loads, index_lines), 1)
    return lines + [f"for t in range({T}):", f"    if t0 + t < {whole}:"] + _indent(step, 2)


def _load_arrays(desc: Described, per: int, loads: list, prefix: str) -> list:
    """A local array <prefix><j>_ of `per` elements for each load, of what the load reads."""
    dtypes = {p[0]: p[1].dtype for p in desc.params}
    return [f"{prefix}{j}_ = cuda.local.array({per}, {_stored_type(dtypes[_LOAD.match(ld).group(1)])})"
            for j, ld in enumerate(loads)]


def _fetch(prefix: str, at: str, per: int, loads: list, index_lines: list) -> list:
    """The loads of the tile at `at`, issued together into the <prefix><j>_ arrays, before
    anything after them (prelude's _loads_issued)."""
    return ([f"for u in range({per}):", f"    o = {at} + u * {ELEMENTWISE_BLOCK}"] + _indent(index_lines, 1) +
            [f"    {prefix}{j}_[u] = {ld}" for j, ld in enumerate(loads)] + ["_loads_issued()"])


def _loaded(prefix: str, loads: list) -> dict:
    """Each load's value, read from its <prefix><j>_ array (what _whole_tile takes)."""
    return {ld: f"{prefix}{j}_" for j, ld in enumerate(loads)}


def _partial_tile(desc: Described, per: int) -> list:
    B, n = ELEMENTWISE_BLOCK, desc.n_outer
    lines = [f"for u in range({per}):", f"    o = base + u * {B}", f"    if o < {n}:"]
    lines += _indent(_coords(desc) + row_steps(desc), 2)
    return lines + [f"        {param}[{idx}] = {_store(d, val)}" for param, idx, val, d in desc.row_stores]


def _indices_need_no_values(index_lines: list) -> bool:
    """Whether the loads' indices come from coordinates and index arithmetic alone (no
    loaded or computed value), so a tile's loads can be issued before the tile before it
    has computed."""
    return all((name := assigns(line)) and name[0] in "oi" and not _LOAD.search(line) for line in index_lines)


def _render_rows(desc: Described, name: str, block: int) -> str:
    k = desc.kernel
    T, n, n_out = desc.row_threads, desc.n_inner, desc.n_outer
    if not T:
        raise ValueError(f"{name} was described for the CPU; describe(kernel, block) for the GPU")
    rpb = rows_per_block(desc, block)
    P, slots = desc.row_parts, block_slots(desc)
    inames = {d: f"ri{d}" for d in desc.inner_dims}
    ind = "    "
    out = [jit_line(desc, block), f"def {name}({', '.join(p[0] for p in desc.params)}):",
           ind + "tid = cuda.threadIdx.x"]
    if P > 1:   # a cluster of P blocks a row (rpb is 1), block `part` its slots from part * slots
        out += [ind + f"o = cuda.blockIdx.x // {P}", ind + f"part = cuda.blockIdx.x % {P}", ind + "lane = tid"]
    elif rpb == 1:
        out += [ind + "o = cuda.blockIdx.x", ind + "lane = tid"]
    elif T == 1:
        out += [ind + f"o = cuda.blockIdx.x * {rpb} + tid", ind + "lane = 0"]
    else:
        out += [ind + f"o = cuda.blockIdx.x * {rpb} + tid // {T}", ind + f"lane = tid % {T}"]
    ragged = n_out % rpb != 0
    if ragged:   # the last block's spare rows redo the last row (they must join its shuffles) but store nothing
        out += [ind + f"valid = o < {n_out}", ind + "if not valid:", ind + f"    o = {n_out - 1}"]
    out += [ind + l for l in _coords(desc)]
    for arr, d in desc.row_cache.items():   # the row's elements this thread holds
        out.append(ind + f"{arr} = cuda.local.array({slots}, {NUMBA_TYPE[d]})")

    def strided(body, tail, guard=""):
        first = f"(part * {slots} + j)" if P > 1 else "j"
        lines = [ind + f"for j in range({slots}):", ind + f"    r = lane + {first} * {T}"]
        cond = " and ".join(c for c in ([f"r < {n}"] if n != P * slots * T else []) + ([guard] if guard else []))
        pre = ind + "    "
        if cond:
            lines.append(pre + f"if {cond}:")
            pre += "    "
        lines += [pre + l for l in unravel("r", desc.inner_dims, k.full, inames)]
        lines += [pre + l for l in body.lines]
        return lines + [pre + t for t in tail]

    steps = row_steps(desc)
    stages = [s for s in steps if isinstance(s, list)]
    merged = one_pass_moments(desc, steps)
    skip = set()
    for at, step in enumerate(steps):
        if at in skip:
            continue
        if not isinstance(step, list):
            out.append(ind + step)
            continue
        reds = [desc.reductions[i] for i in step]   # one stage: one loop, one barrier
        inits, updates, results = _stage(reds)
        out += [ind + l for l in inits] + strided(reds[0][3], updates)
        pairs, last = {}, step is stages[-1]
        if at in merged:
            # the next stage sums squared deviations from this one's mean: each thread takes
            # them from its own elements' mean (the sum's result scaled so that the lines
            # between compute it), and the partial (sum, deviations) combine by Chan's formula
            b, i, q = merged[at]
            between = steps[at + 1:b]
            qred = desc.reductions[q]
            q_inits, q_updates, q_results = _stage([qred])
            s_acc, s_res, d = desc.reductions[i][0], desc.reductions[i][5], desc.reductions[i][2]
            out += [ind + l for l in [f"{s_res} = {s_acc} * {literal(P * T, d)}"] + between + q_inits]
            out += strided(qred[3], q_updates)
            reds, pairs, last = reds + [qred], {qred[0]: s_acc}, steps[b] is stages[-1]
            results, skip = results + between + q_results, set(range(at + 1, b + 1))
        out += [ind + l for l in _combine_row(reds, pairs, T, rpb, P, slots)]
        if P > 1:
            out += _cluster_combine(reds, pairs, P, T * slots, last)
        out += [ind + l for l in results]
    ok = "valid" if ragged else ""
    for param, idx, val, d in desc.row_stores:
        cond = "lane == 0" + (" and valid" if ragged else "") + (" and part == 0" if P > 1 else "")
        out += [ind + f"if {cond}:", ind + f"    {param}[{idx}] = {_store(d, val)}"]
    if desc.full_store is not None:
        body, idx, vals = desc.full_store
        out += strided(body, [f"{param}[{idx}] = {_store(d, val)}" for param, val, d in vals], ok)
    if P > 1 and stages:   # no block leaves while another may still read its shared memory
        out.append(ind + "cluster_wait()")
    return "\n".join(drop_unused(out)) + "\n"


def block_slots(desc: Described) -> int:
    """Elements of a row each thread takes (at most): the row's slots split among its P blocks."""
    return -(-(-(-desc.n_inner // desc.row_threads)) // desc.row_parts)


def one_pass_moments(desc: Described, steps) -> dict:
    """{index in steps of a stage: (index of the next stage, sum's reduction, deviations')}
    where the next stage is one reduction summing squared deviations from a sum's mean in
    this stage (desc.deviations), and nothing between reads any other result: both then take
    one pass and one exchange. Only where every thread holds as many of the row's elements
    as every other (Chan's formula with constant counts); otherwise two passes."""
    out = {}
    if not ONE_PASS_MOMENTS or desc.n_inner != desc.row_threads * desc.row_parts * block_slots(desc):
        return out
    where = {i: at for at, st in enumerate(steps) if isinstance(st, list) for i in st}
    for q, i in desc.deviations.items():
        a, b = where[i], where[q]
        if steps[b] == [q] and b > a and not any(isinstance(st, list) for st in steps[a + 1:b]) and \
                a not in out:
            out[a] = (b, i, q)
    return out


def row_exchanges(desc: Described) -> int:
    """Times the threads of a row (the blocks of its cluster) exchange partial results."""
    steps = row_steps(desc)
    return sum(isinstance(st, list) for st in steps) - len(one_pass_moments(desc, steps))


def _join(reds, pairs, partner, na, nb):
    """Lines combining each accumulator with partner(acc), the same accumulator over another
    nb elements (this one covers na). pairs: deviations acc -> its sum's acc, combined by
    Chan's formula: q = qa + qb + (sa nb - sb na)^2 / (na nb (na + nb)). With na == nb the
    two sides compute the same bits (a butterfly's lanes agree)."""
    g = math.gcd(na, nb)
    lines = [f"t_{acc} = {partner(acc)}" for acc, *_ in reds]
    for acc, _, d, *_ in reds:   # before the sums move on: the deviations read both sides' sums
        if acc in pairs:
            sa, ra, rb = pairs[acc], nb // g, na // g
            diff = (sa if ra == 1 else f"{sa} * {literal(ra, d)}") + " - " + \
                   (f"t_{sa}" if rb == 1 else f"t_{sa} * {literal(rb, d)}")
            k = literal(g * g / (na * nb * (na + nb)), d)
            lines += [f"dq_{acc} = {diff}", f"{acc} = ({acc} + t_{acc}) + dq_{acc} * dq_{acc} * {k}"]
    return lines + [f"{acc} = {_combine(op, acc, f't_{acc}')}" for acc, op, *_ in reds if acc not in pairs]


def _combine_row(reds, pairs, T, rpb, P, slots):
    """Lines after a stage's loop that leave every thread of a row (of its block's part) with
    the row's results: a butterfly of warp shuffles, and where a row spans several warps,
    one shared slot per warp and a butterfly over those."""
    out, lanes, m = [], min(T, 32), min(T, 32) // 2
    while m:   # each side of this step covers `slots` elements of (lanes / 2m) threads
        side = slots * lanes // (2 * m)
        out += _join(reds, pairs, lambda a: f"_shfl_xor({a}, {m})", side, side)
        m //= 2
    if T > 32:
        warps = T // 32
        first = "" if rpb == 1 else f"(tid // {T}) * {warps} + "
        for acc, _, d, *_ in reds:
            out += [f"sm_{acc} = cuda.shared.array({rpb * warps}, {NUMBA_TYPE[d]})"]
        out += ["if tid % 32 == 0:"] + [f"    sm_{acc}[tid // 32] = {acc}" for acc, *_ in reds]
        out += ["cuda.syncthreads()", f"w0 = {first}tid % {warps}"]
        out += [f"{acc} = sm_{acc}[w0]" for acc, *_ in reds]
        m = warps // 2
        while m:
            side = 32 * slots * warps // (2 * m)
            out += _join(reds, pairs, lambda a: f"_shfl_xor({a}, {m})", side, side)
            m //= 2
    return out


def _cluster_combine(reds, pairs, P, part_elems, last):
    """Lines after a stage's block reduction of a row on P blocks: thread 0 of each block
    posts its partial results in shared memory; after the cluster barrier every thread reads
    all P of them in block order, so every block combines the same values in the same order
    (the same bits). Each stage posts to arrays of its own, and a block passes the next
    stage's barrier only when every block has read this stage's: only leaving needs a
    barrier again. So after the last stage's reads a thread arrives, and waits at the
    kernel's end (cluster_wait), storing its part meanwhile."""
    ind = "    "
    out = [ind + f"cx_{acc} = cuda.shared.array(1, {NUMBA_TYPE[d]})" for acc, _, d, *_ in reds]
    out += [ind + "if tid == 0:"] + [ind + f"    cx_{acc}[0] = {acc}" for acc, *_ in reds]
    out.append(ind + "cluster_sync()")
    out += [ind + f"{acc} = cluster_load(cx_{acc}, 0, 0)" for acc, *_ in reds]
    for q in range(1, P):   # the first q parts' results, joined by part q's
        joined = _join(reds, pairs, lambda a: f"cluster_load(cx_{a}, 0, {q})", q * part_elems, part_elems)
        out += [ind + l for l in joined]
    return out + ([ind + "cluster_arrive()"] if last else [])


CLUSTER_IMPORT = "from flame.codegen.cluster import cluster_arrive, cluster_load, cluster_sync, cluster_wait\n"


def module_source(desc: Described, name: str, block: int = 256) -> str:
    extra = CLUSTER_IMPORT if cluster_blocks(desc) > 1 else ""
    return PRELUDE + extra + "\n" + render(desc, name, block)
