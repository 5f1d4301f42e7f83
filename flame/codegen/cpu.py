"""Render a kernel description as Numba CPU source (`njit`, `prange` over rows when big)."""
from __future__ import annotations

from ..ir import dtypes as dt
from .kernel import Described, unravel

PRELUDE = '''import math
import numpy as np
import numba

_U = np.uint64
_M = np.uint64(0xFFFFFFFF)


@numba.njit(cache=True, error_model="numpy")
def _mix32(x):
    x = x ^ (x >> _U(16))
    x = (x * _U(0x7FEB352D)) & _M
    x = x ^ (x >> _U(15))
    x = (x * _U(0x846CA68B)) & _M
    return x ^ (x >> _U(16))


@numba.njit(cache=True, error_model="numpy")
def _bits(seed, stream, i):
    k = _mix32(_U(seed & 0xFFFFFFFF) ^ _mix32(_U((stream + 0x9E3779B9) & 0xFFFFFFFF)))
    return _mix32((_mix32(_U(i) ^ k) + k) & _M)


@numba.njit(cache=True, error_model="numpy")
def _uniform(seed, stream, i):
    return np.float32(_bits(seed, stream, i) >> _U(8)) * np.float32(5.9604644775390625e-08)


@numba.njit(cache=True, error_model="numpy")
def _normal(seed, stream, i):
    h1 = _bits(seed, stream, _U(2) * _U(i))
    h2 = _bits(seed, stream, _U(2) * _U(i) + _U(1))
    u1 = (np.float32(h1 >> _U(8)) + np.float32(1.0)) * np.float32(5.9604644775390625e-08)
    u2 = np.float32(h2 >> _U(8)) * np.float32(5.9604644775390625e-08)
    return math.sqrt(np.float32(-2.0) * math.log(u1)) * math.cos(np.float32(6.2831854820251465) * u2)


@numba.njit(cache=True, error_model="numpy")
def _bf16_load(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@numba.njit(cache=True, error_model="numpy")
def _bf16_bits(v):
    u = np.float32(v).view(np.uint32)
    if (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (u & np.uint32(0x7FFFFF)) != np.uint32(0):
        return np.uint16(0x7FC0)
    return np.uint16(np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(cache=True, error_model="numpy")
def _bf16_round(v):
    return _bf16_load(_bf16_bits(v))

'''

PARALLEL_MIN = 1 << 15   # elements: below this, threads cost more than they save


def _acc_init(op, dtype):
    from .kernel import literal
    if op == "sum":
        return literal(0, dtype)
    return literal(float("-inf"), dtype) if dtype.is_float else f"np.iinfo({literal(0, dtype).split('(')[0]}).min"


def _acc_update(op, acc, val):
    # max: a NaN wins and stays (val != val), as in numpy
    return f"{acc} = {acc} + {val}" if op == "sum" else f"{acc} = {val} if {val} > {acc} or {val} != {val} else {acc}"


def render(desc: Described, name: str) -> str:
    k = desc.kernel
    total = desc.n_outer * desc.n_inner
    par = total >= PARALLEL_MIN and desc.n_outer > 1
    params = ", ".join(p[0] for p in desc.params)
    out = [f'@numba.njit(parallel={par}, cache=True, error_model="numpy")',
           f"def {name}({params}):",
           f"    for o in {'numba.prange' if par else 'range'}({desc.n_outer}):"]
    ind = "        "
    onames = {d: f"o{d}" for d in desc.outer_dims}
    inames = {d: f"ri{d}" for d in desc.inner_dims}
    out += [ind + l for l in unravel("o", desc.outer_dims, k.full, onames)]

    def inner_loop(body, tail):
        lines = [ind + f"for r in range({desc.n_inner}):"]
        lines += [ind + "    " + l for l in unravel("r", desc.inner_dims, k.full, inames)]
        lines += [ind + "    " + l for l in body.lines]
        lines += [ind + "    " + t for t in tail]
        return lines

    for line in desc.row.lines:
        if isinstance(line, tuple):
            acc, op, dtype, body, val, res = desc.reductions[line[1]]
            out.append(ind + f"{acc} = {_acc_init(op, dtype)}")
            out += inner_loop(body, [_acc_update(op, acc, val)])
            out.append(ind + f"{res} = " + (f"_bf16_round({acc})" if dtype is dt.bf16 else acc))
        else:
            out.append(ind + line)
    store = (lambda v: f"_bf16_bits({v})") if k.store.dtype is dt.bf16 else (lambda v: v)
    if desc.store[0] == "row":
        _, idx, val = desc.store
        out.append(ind + f"out[{idx}] = {store(val)}")
    else:
        _, body, idx, val = desc.store
        out += inner_loop(body, [f"out[{idx}] = {store(val)}"])
    return "\n".join(out) + "\n"


def module_source(desc: Described, name: str) -> str:
    return PRELUDE + "\n" + render(desc, name)
