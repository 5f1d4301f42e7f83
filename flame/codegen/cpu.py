"""Render a kernel description as Numba CPU source (`njit`, `prange` over rows when big)."""
from __future__ import annotations

from ..ir import dtypes as dt
from .kernel import Described, drop_unused, row_steps, unravel
from .prelude import CPU_PRELUDE as PRELUDE   # the helpers, shared with the CUDA renderer

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

    for step in row_steps(desc):
        if isinstance(step, list):   # one stage: reductions sharing one loop
            reds = [desc.reductions[i] for i in step]
            out += [ind + f"{acc} = {_acc_init(op, dtype)}" for acc, op, dtype, _, _, _ in reds]
            out += inner_loop(reds[0][3], [_acc_update(op, acc, val) for acc, op, _, _, val, _ in reds])
            out += [ind + f"{res} = " + (f"_bf16_round({acc})" if dtype is dt.bf16 else acc)
                    for acc, _, dtype, _, _, res in reds]
        else:
            out.append(ind + step)
    store = lambda d, v: f"_bf16_bits({v})" if d is dt.bf16 else v   # noqa: E731
    for param, idx, val, d in desc.row_stores:
        out.append(ind + f"{param}[{idx}] = {store(d, val)}")
    if desc.full_store is not None:
        body, idx, vals = desc.full_store
        out += inner_loop(body, [f"{param}[{idx}] = {store(d, val)}" for param, val, d in vals])
    return "\n".join(drop_unused(out)) + "\n"


def module_source(desc: Described, name: str) -> str:
    return PRELUDE + "\n" + render(desc, name)
