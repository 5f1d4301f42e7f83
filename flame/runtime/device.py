"""Is there a usable NVIDIA GPU? (for backend="auto" choices; never a silent fallback: the
caller prints what it chose and why)."""
from __future__ import annotations


def cuda_available() -> tuple[bool, str]:
    """(usable, why): the CUDA driver initialises and sees a device, and the cuda extra
    (numba-cuda, cuda-core, cuBLAS) imports."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return False, "the cuda extra is not installed (pip install 'flame[cuda]')"
    try:
        if int(driver.cuInit(0)[0]) != 0:
            return False, "the CUDA driver did not initialise (no NVIDIA GPU or driver)"
        err, n = driver.cuDeviceGetCount()
        if int(err) != 0 or n == 0:
            return False, "the CUDA driver sees no GPU"
    except Exception as e:   # a broken driver install: say what it said
        return False, f"the CUDA driver failed: {e}"
    try:
        import numba.cuda  # noqa: F401
        import cuda.core  # noqa: F401
    except Exception as e:
        return False, f"numba-cuda / cuda-core do not import: {e}"
    return True, f"{n} NVIDIA GPU(s)"
