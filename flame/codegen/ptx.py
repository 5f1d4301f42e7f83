"""Compile generated CUDA kernels to PTX without a GPU (NVVM only), for CI checks and for
reading what the compiler made of a kernel."""
from __future__ import annotations

from .cache import load
from .cuda import NUMBA_TYPE, module_source
from .kernel import Described


def compile_ptx(desc: Described, name: str, cc=(9, 0), block: int = 256) -> str:
    from numba import cuda
    src = module_source(desc, name, block)
    fn = load(name, src, "cuda", f"sm_{cc[0]}{cc[1]}")
    import numba
    sig = tuple(eval(NUMBA_TYPE[p[1].dtype], {"numba": numba})[::1] for p in desc.params)
    ptx, _ = cuda.compile_ptx(fn.py_func, sig, cc=cc)
    return ptx


# libdevice's sinf/cosf reduce huge arguments (|x| > ~1e5) with one float64 multiply by
# 2^-64·π/2 (Payne-Hanek): that path is inside NVIDIA's library, not flame's arithmetic.
LIBDEVICE_TRIG = ("cvt.rn.f64.s64", "mul.f64 \t%fd2, %fd1, 0d3BF921FB54442D19", "cvt.rn.f32.f64")


def float64_instructions(ptx: str, allow_libdevice_trig: bool = True) -> list:
    """PTX lines doing float64 arithmetic or conversions (none belong in a float32 kernel)."""
    out = []
    for l in ptx.splitlines():
        t = l.strip()
        if ".f64" not in t or t.startswith("//") or t.startswith("."):
            continue
        if allow_libdevice_trig and ("0d3BF921FB54442D19" in t or t.startswith(("cvt.rn.f64.s64", "cvt.rn.f32.f64"))):
            continue
        out.append(t)
    return out
