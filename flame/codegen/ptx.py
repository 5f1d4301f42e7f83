"""Compile generated CUDA kernels to PTX without a GPU (NVVM only), for CI checks and for
reading what the compiler made of a kernel."""
from __future__ import annotations

import re

from ..ir import dtypes as dt
from .cache import cached_path, cached_text, load
from .cuda import module_source
from .kernel import Described


def kernel_ptx(name: str, src: str, dtypes, cc=(9, 0)) -> str:
    """PTX of kernel `name` in generated module `src`, with raw-pointer arguments of these
    dtypes. Kernels that differ only in their name share one compilation: the cache key is
    the source with the name replaced, the architecture, the signature and numba-cuda's
    version, so PTX compiled on a machine without a GPU serves the GPU machine too."""
    from numba import cuda, types as nt
    import numba_cuda
    ptr = {dt.f32: nt.float32, dt.f64: nt.float64, dt.i32: nt.int32, dt.i64: nt.int64,
           dt.boolean: nt.uint8, dt.bf16: nt.uint16}   # bools are bytes, bf16 its bits
    sig = tuple(nt.CPointer(ptr[d]) for d in dtypes)
    canon = src.replace(f"def {name}(", "def kernel(")
    arch = f"sm_{cc[0]}{cc[1]}"

    bounds = re.search(r"# launch_bounds=(\d+)", src)   # see cuda.jit_line

    def make():
        fn = load("kernel", canon, "cuda", arch)
        return cuda.compile_ptx(fn.py_func, sig, cc=cc,
                                launch_bounds=int(bounds.group(1)) if bounds else None)[0]
    return cached_text([canon, arch, repr(sig), numba_cuda.__version__, _version("nvidia-nvvm")],
                       "kernel", "ptx", make, versioned=False)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "system"


def kernel_cubin(name: str, src: str, dtypes, cc=(9, 0)) -> tuple:
    """(entry name, machine code) of the kernel, linked from its PTX by nvJitLink. A cubin
    runs on any driver of the same CUDA major version, where PTX from a newer compiler is
    refused by an older driver's JIT; so cubins prepared on another machine (even without a
    GPU) can be carried over. Any NVVM's code for the same source will do, so the key is the
    source, architecture, signature and numba-cuda version."""
    from cuda.core import Linker, LinkerOptions, ObjectCode
    arch = f"sm_{cc[0]}{cc[1]}"

    def make():
        ptx = kernel_ptx(name, src, dtypes, cc)
        entry = re.search(r"\.entry\s+([\w$]+)\s*\(", ptx).group(1)
        cubin = Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=arch)).link("cubin").code
        return entry.encode() + b"\0" + bytes(cubin)
    blob = cached_text(_cubin_key(name, src, dtypes, cc), "kernel", "cubin", make, versioned=False)
    entry, _, cubin = blob.partition(b"\0")
    return entry.decode(), cubin


def _cubin_key(name, src, dtypes, cc) -> list:
    import numba_cuda
    canon = src.replace(f"def {name}(", "def kernel(")
    return [canon, f"sm_{cc[0]}{cc[1]}", repr([d.name for d in dtypes]), numba_cuda.__version__]


def _compile_job(job):
    name, src, dtype_names, cc = job
    kernel_cubin(name, src, [dt.by_name(n) for n in dtype_names], cc)


def compile_cubins(jobs, workers: int | None = None) -> int:
    """Compile the kernels of `jobs` ((name, source, dtypes, cc) each) that are not cached
    yet, in parallel worker processes (NVVM compiles one kernel at a time, and a UNet step
    has hundreds); kernel_cubin then reads them from the cache. Returns how many compiled."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    todo, seen = [], set()
    for name, src, dtypes, cc in jobs:
        path = cached_path(_cubin_key(name, src, dtypes, cc), "kernel", "cubin", versioned=False)
        if path not in seen and not os.path.exists(path):
            seen.add(path)
            todo.append((name, src, [d.name for d in dtypes], tuple(cc)))
    workers = min(workers or os.cpu_count() or 1, len(todo))
    if workers < 2:
        return 0
    # spawn, not fork: the parent may hold a CUDA context, which a forked child must not touch
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_compile_job, todo, chunksize=max(1, len(todo) // (4 * workers))))
    return len(todo)


def compile_ptx(desc: Described, name: str, cc=(9, 0), block: int = 256) -> str:
    return kernel_ptx(name, module_source(desc, name, block), [p[1].dtype for p in desc.params], cc)


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
