"""Render a kernel description as Numba CUDA source.

Elementwise kernels: one thread per element. Row kernels: one block per row; each thread
strides over the row, partial results meet in shared memory through a tree (no warp
shuffles, so the Numba CUDA simulator runs them too). Every float constant is typed
(np.float32(...)), so float32 kernels compile to float32 PTX."""
from __future__ import annotations

from ..ir import dtypes as dt
from .kernel import Described, literal, unravel
from .prelude import CUDA_PRELUDE as PRELUDE   # the helpers, shared with the CPU renderer


NUMBA_TYPE = {dt.f32: "numba.float32", dt.f64: "numba.float64", dt.i32: "numba.int32",
              dt.i64: "numba.int64", dt.boolean: "numba.boolean", dt.bf16: "numba.float32"}
ELEMENTWISE_BLOCK = 256


def _init(op, d):
    if op == "sum":
        return literal(0, d)
    return literal(float("-inf"), d) if d.is_float else f"{literal(0, d).split('(')[0]}(-9223372036854775807)"


def _combine(op, a, b):
    return f"{a} + {b}" if op == "sum" else f"{b} if ({b} > {a} or {b} != {b}) else {a}"   # NaN wins, like numpy


def block_per_row(desc: Described) -> bool:
    """Rows whose last axis is reduced are contiguous: a block strides along each. Otherwise
    (reductions over leading axes) adjacent threads take adjacent outputs and each loops over
    its row alone, so the loads stay coalesced."""
    return bool(desc.inner_dims) and (len(desc.kernel.full) - 1) in desc.inner_dims


def launch_dims(desc: Described, block: int):
    """(grid, block) for this kernel."""
    if block_per_row(desc):
        return desc.n_outer, block
    return (desc.n_outer + ELEMENTWISE_BLOCK - 1) // ELEMENTWISE_BLOCK, ELEMENTWISE_BLOCK


def render(desc: Described, name: str, block: int = 256) -> str:
    """block: threads per row in row kernels (a power of two)."""
    k = desc.kernel
    params = ", ".join(p[0] for p in desc.params)
    onames = {d: f"o{d}" for d in desc.outer_dims}
    inames = {d: f"ri{d}" for d in desc.inner_dims}
    out = ["@cuda.jit", f"def {name}({params}):"]
    ind = "    "
    rows = block_per_row(desc)
    if rows:
        out += [ind + "o = cuda.blockIdx.x", ind + "tid = cuda.threadIdx.x"]
    else:
        out += [ind + "o = cuda.grid(1)", ind + f"if o >= {desc.n_outer}:", ind + "    return"]
    out += [ind + l for l in unravel("o", desc.outer_dims, k.full, onames)]
    slots = -(-desc.n_inner // block)
    for name, d in desc.row_cache.items():   # the row's elements this thread holds
        out.append(ind + f"{name} = cuda.local.array({slots}, {NUMBA_TYPE[d]})")

    def strided(body, tail):
        if not rows:
            lines = [ind + f"for r in range({desc.n_inner}):"]
            pre = ind + "    "
        else:   # slot j of this thread is element tid + j*block of the row
            lines = [ind + f"for j in range({slots}):", ind + f"    r = tid + j * {block}",
                     ind + f"    if r < {desc.n_inner}:"]
            pre = ind + "        "
        lines += [pre + l for l in unravel("r", desc.inner_dims, k.full, inames)]
        lines += [pre + l for l in body.lines]
        return lines + [pre + t for t in tail]

    for line in desc.row.lines:
        if not isinstance(line, tuple):
            out.append(ind + line)
            continue
        acc, op, d, body, val, res = desc.reductions[line[1]]
        if not rows:
            out.append(ind + f"{acc} = {_init(op, d)}")
            out += strided(body, [f"{acc} = {_combine(op, acc, val)}"])
            out.append(ind + f"{res} = " + (f"_bf16_round({acc})" if d is dt.bf16 else acc))
            continue
        sm = f"sm_{acc}"
        out.append(ind + f"{sm} = cuda.shared.array({block}, {NUMBA_TYPE[d]})")
        out.append(ind + f"{acc} = {_init(op, d)}")
        out += strided(body, [f"{acc} = {_combine(op, acc, val)}"])
        out += [ind + f"{sm}[tid] = {acc}",
                ind + "cuda.syncthreads()",
                ind + f"s = {block // 2}",
                ind + "while s > 0:",
                ind + "    if tid < s:",
                ind + f"        {sm}[tid] = {_combine(op, f'{sm}[tid]', f'{sm}[tid + s]')}",
                ind + "    cuda.syncthreads()",
                ind + "    s //= 2",
                ind + f"{res} = " + (f"_bf16_round({sm}[0])" if d is dt.bf16 else f"{sm}[0]")]
    def store(d, v):
        if d is dt.boolean:
            return f"np.uint8(1) if {v} else np.uint8(0)"
        return f"_bf16_bits({v})" if d is dt.bf16 else v
    for param, idx, val, d in desc.row_stores:
        out.append(ind + ("if tid == 0:\n" + ind + "    " if rows else "") + f"{param}[{idx}] = {store(d, val)}")
    if desc.full_store is not None:
        body, idx, vals = desc.full_store
        out += strided(body, [f"{param}[{idx}] = {store(d, val)}" for param, val, d in vals])
    return "\n".join(out) + "\n"


def module_source(desc: Described, name: str, block: int = 256) -> str:
    return PRELUDE + "\n" + render(desc, name, block)
