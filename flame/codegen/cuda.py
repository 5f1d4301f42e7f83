"""Render a kernel description as Numba CUDA source.

Elementwise kernels: one thread per element. Row kernels: one block per row; each thread
strides over the row, partial results meet in shared memory through a tree (no warp
shuffles, so the Numba CUDA simulator runs them too). Every float constant is typed
(np.float32(...)), so float32 kernels compile to float32 PTX."""
from __future__ import annotations

from ..ir import dtypes as dt
from .kernel import Described, literal, unravel

PRELUDE = '''import math
import numpy as np
import numba
from numba import cuda
from numba.cuda import libdevice

_U = np.uint64
_M = np.uint64(0xFFFFFFFF)


@cuda.jit(device=True, inline=True)
def _mix32(x):
    x = x ^ (x >> _U(16))
    x = (x * _U(0x7FEB352D)) & _M
    x = x ^ (x >> _U(15))
    x = (x * _U(0x846CA68B)) & _M
    return x ^ (x >> _U(16))


@cuda.jit(device=True, inline=True)
def _bits(seed, stream, i):
    k = _mix32(_U(seed & 0xFFFFFFFF) ^ _mix32(_U((stream + 0x9E3779B9) & 0xFFFFFFFF)))
    return _mix32((_mix32(_U(i) ^ k) + k) & _M)


@cuda.jit(device=True, inline=True)
def _uniform(seed, stream, i):
    return np.float32(_bits(seed, stream, i) >> _U(8)) * np.float32(5.9604644775390625e-08)


@cuda.jit(device=True, inline=True)
def _normal(seed, stream, i):
    h1 = _bits(seed, stream, _U(2) * _U(i))
    h2 = _bits(seed, stream, _U(2) * _U(i) + _U(1))
    u1 = (np.float32(h1 >> _U(8)) + np.float32(1.0)) * np.float32(5.9604644775390625e-08)
    u2 = np.float32(h2 >> _U(8)) * np.float32(5.9604644775390625e-08)
    return math.sqrt(np.float32(-2.0) * math.log(u1)) * math.cos(np.float32(6.2831854820251465) * u2)


if numba.config.ENABLE_CUDASIM:   # the simulator has no libdevice bit casts: numpy's
    _as_float = lambda i: np.uint32(i).view(np.float32)
    _as_int = lambda f: np.float32(f).view(np.uint32)
else:
    _as_float, _as_int = libdevice.int_as_float, libdevice.float_as_int


@cuda.jit(device=True, inline=True)
def _bf16_load(h):
    return _as_float(np.int32(np.uint32(h) << np.uint32(16)))


@cuda.jit(device=True, inline=True)
def _bf16_bits(v):
    u = np.uint32(_as_int(v))
    if (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (u & np.uint32(0x7FFFFF)) != np.uint32(0):
        return np.uint16(0x7FC0)
    return np.uint16(np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@cuda.jit(device=True, inline=True)
def _bf16_round(v):
    return _bf16_load(_bf16_bits(v))

'''
BF16_HELPERS = '''if numba.config.ENABLE_CUDASIM:   # the simulator has no libdevice bit casts: numpy's
    _as_float = lambda i: np.uint32(i).view(np.float32)
    _as_int = lambda f: np.float32(f).view(np.uint32)
else:
    _as_float, _as_int = libdevice.int_as_float, libdevice.float_as_int


@cuda.jit(device=True, inline=True)
def _bf16_load(h):
    return _as_float(np.int32(np.uint32(h) << np.uint32(16)))


@cuda.jit(device=True, inline=True)
def _bf16_bits(v):
    u = np.uint32(_as_int(v))
    if (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (u & np.uint32(0x7FFFFF)) != np.uint32(0):
        return np.uint16(0x7FC0)
    return np.uint16(np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@cuda.jit(device=True, inline=True)
def _bf16_round(v):
    return _bf16_load(_bf16_bits(v))
'''

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
    store = {dt.boolean: lambda v: f"np.uint8(1) if {v} else np.uint8(0)",
             dt.bf16: lambda v: f"_bf16_bits({v})"}.get(k.store.dtype, lambda v: v)
    if desc.store[0] == "row":
        _, idx, val = desc.store
        out.append(ind + ("if tid == 0:\n" + ind + "    " if rows else "") + f"out[{idx}] = {store(val)}")
    else:
        _, body, idx, val = desc.store
        out += strided(body, [f"out[{idx}] = {store(val)}"])
    return "\n".join(out) + "\n"


def module_source(desc: Described, name: str, block: int = 256) -> str:
    return PRELUDE + "\n" + render(desc, name, block)
