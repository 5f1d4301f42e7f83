"""A thin ctypes layer over the NVIDIA cuBLAS wheel's libcublas.

Why ctypes: the GPU stack flame already needs (cuda-core, cuda-bindings, the nvidia-cublas
wheel) ships the library but no Python binding for it; the maintained bindings (CuPy,
nvmath-python) would each bring a second array runtime. flame calls six functions, so a
typed ctypes table of them is the smaller, checkable dependency.

Row-major trick: cuBLAS is column-major, so C = op(A)·op(B) in row-major is computed as
Cᵀ = op(B)ᵀ·op(A)ᵀ, i.e. cuBLAS is called with the operands swapped.
"""
from __future__ import annotations

import ctypes

from ..ir import dtypes as dt

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_64F, CUDA_R_16F, CUDA_R_16BF = 0, 1, 2, 14
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_64F = 68, 77, 70
CUBLAS_GEMM_DEFAULT = -1
DATA_TYPE = {dt.f32: CUDA_R_32F, dt.f64: CUDA_R_64F, dt.f16: CUDA_R_16F, dt.bf16: CUDA_R_16BF}

_lib = None


class CublasError(RuntimeError):
    pass


def lib():
    global _lib
    if _lib is None:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        loaded = load_nvidia_dynamic_lib("cublas")
        _lib = ctypes.CDLL(loaded.abs_path)
        p, i, i64, vp = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p
        _lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
        _lib.cublasSetStream_v2.argtypes = [p, p]
        _lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
        _lib.cublasSetMathMode.argtypes = [p, i]
        _lib.cublasGemmStridedBatchedEx.argtypes = [
            p, i, i, i, i, i, vp, vp, i, i, i64, vp, i, i, i64, vp, vp, i, i, i64, i, i, i]
    return _lib


def check(status: int, what: str):
    if status != 0:
        raise CublasError(f"cuBLAS {what} failed with status {status}")


class Handle:
    """One cuBLAS handle bound to a stream, with a workspace flame owns (so graph capture
    never needs cuBLAS to allocate)."""

    def __init__(self, stream_handle: int, workspace_ptr: int, workspace_bytes: int, tf32: bool = False):
        self.h = ctypes.c_void_p()
        check(lib().cublasCreate_v2(ctypes.byref(self.h)), "create")
        self.set_stream(stream_handle)
        check(lib().cublasSetWorkspace_v2(self.h, ctypes.c_void_p(workspace_ptr), workspace_bytes), "set workspace")
        self.tf32 = tf32

    def set_stream(self, stream_handle: int):
        check(lib().cublasSetStream_v2(self.h, ctypes.c_void_p(stream_handle)), "set stream")

    def gemm(self, a_ptr, b_ptr, c_ptr, m, n, k, ta, tb, batch, stride_a, stride_b, stride_c,
             dtype, beta=0.0):
        """Row-major C[b] (m×n) = op(A[b]) · op(B[b]) for b < batch; A is m×k (k×m if ta)."""
        compute = {dt.f64: CUBLAS_COMPUTE_64F}.get(dtype, CUBLAS_COMPUTE_32F_FAST_TF32 if self.tf32 and dtype is dt.f32 else CUBLAS_COMPUTE_32F)
        scal = ctypes.c_double if dtype is dt.f64 else ctypes.c_float
        alpha_v, beta_v = scal(1.0), scal(beta)
        t = DATA_TYPE[dtype]
        lda = m if ta else k      # leading dims of the row-major operands
        ldb = k if tb else n
        status = lib().cublasGemmStridedBatchedEx(
            self.h, CUBLAS_OP_T if tb else CUBLAS_OP_N, CUBLAS_OP_T if ta else CUBLAS_OP_N,
            n, m, k, ctypes.byref(alpha_v),
            ctypes.c_void_p(b_ptr), t, ldb, stride_b,
            ctypes.c_void_p(a_ptr), t, lda, stride_a,
            ctypes.byref(beta_v), ctypes.c_void_p(c_ptr), t, n, stride_c,
            batch, compute, CUBLAS_GEMM_DEFAULT)
        check(status, f"gemm {m}x{n}x{k} batch {batch}")
