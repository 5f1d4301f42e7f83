"""The helpers every generated kernel module starts with, written once for both targets:
the counter-based RNG (the same hash as flame/ir/rng.py) and bf16 <-> float32 bit
conversions. Only the decorator and the float/int bit casts differ per target."""

CPU_HEADER = '''import math
import numpy as np
import numba

_U = np.uint64
_M = np.uint64(0xFFFFFFFF)


@numba.njit(cache=True, error_model="numpy")
def _as_float(i):
    return np.uint32(i).view(np.float32)


@numba.njit(cache=True, error_model="numpy")
def _as_int(f):
    return np.float32(f).view(np.uint32)
'''

CUDA_HEADER = '''import math
import numpy as np
import numba
from numba import cuda
from numba.cuda import libdevice

_U = np.uint64
_M = np.uint64(0xFFFFFFFF)

if numba.config.ENABLE_CUDASIM:   # the simulator has no libdevice bit casts: numpy's
    _as_float = lambda i: np.uint32(i).view(np.float32)
    _as_int = lambda f: np.float32(f).view(np.uint32)
    _lanes = {}

    def _shfl_xor(v, m):
        """Nor warp shuffles: every thread of the block posts its value and reads its
        partner's between two barriers (the generated kernels shuffle in every thread)."""
        t = cuda.threadIdx.x
        _lanes[t] = v
        cuda.syncthreads()
        w = _lanes[t ^ m]
        cuda.syncthreads()
        return w

    def _loads_issued():
        pass
else:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic
    _as_float, _as_int = libdevice.int_as_float, libdevice.float_as_int

    @cuda.jit(device=True, inline=True)
    def _shfl_xor(v, m):
        return cuda.shfl_xor_sync(0xFFFFFFFF, v, m)

    @_intrinsic
    def _loads_issued(typingctx):
        """The loads above stay above: an empty asm that may touch memory, so NVVM sinks no
        load below it to its use (ptxas hoists no load back over a branch, and a division's
        slow path is one). Nothing is emitted for it."""
        def codegen(context, builder, sig, args):
            builder.asm(_ir.FunctionType(_ir.VoidType(), []), "", "~{memory}", [], side_effect=True)
            return context.get_dummy_value()
        return _types.none(), codegen
'''

HELPERS = '''

{deco}
def _mix32(x):
    x = x ^ (x >> _U(16))
    x = (x * _U(0x7FEB352D)) & _M
    x = x ^ (x >> _U(15))
    x = (x * _U(0x846CA68B)) & _M
    return x ^ (x >> _U(16))


{deco}
def _bits(seed, stream, i):
    k = _mix32(_U(seed & 0xFFFFFFFF) ^ _mix32(_U((stream + 0x9E3779B9) & 0xFFFFFFFF)))
    return _mix32((_mix32(_U(i) ^ k) + k) & _M)


{deco}
def _uniform(seed, stream, i):
    return np.float32(_bits(seed, stream, i) >> _U(8)) * np.float32(5.9604644775390625e-08)


{deco}
def _normal(seed, stream, i):
    h1 = _bits(seed, stream, _U(2) * _U(i))
    h2 = _bits(seed, stream, _U(2) * _U(i) + _U(1))
    u1 = (np.float32(h1 >> _U(8)) + np.float32(1.0)) * np.float32(5.9604644775390625e-08)
    u2 = np.float32(h2 >> _U(8)) * np.float32(5.9604644775390625e-08)
    return math.sqrt(np.float32(-2.0) * math.log(u1)) * math.cos(np.float32(6.2831854820251465) * u2)


{deco}
def _div(a, b):   # a // b for 0 <= a < 2**32, b > 0: unsigned 32-bit, a few instructions on a GPU
    return np.int64(np.uint32(a) // np.uint32(b))


{deco}
def _mod(a, b):
    return np.int64(np.uint32(a) % np.uint32(b))


{deco}
def _bf16_load(h):
    return _as_float(np.int32(np.uint32(h) << np.uint32(16)))


{deco}
def _bf16_bits(v):
    u = np.uint32(_as_int(v))
    if (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (u & np.uint32(0x7FFFFF)) != np.uint32(0):
        return np.uint16(0x7FC0)
    return np.uint16(np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


{deco}
def _bf16_round(v):
    return _bf16_load(_bf16_bits(v))

'''

CPU_PRELUDE = CPU_HEADER + HELPERS.format(deco='@numba.njit(cache=True, error_model="numpy")')
CUDA_PRELUDE = CUDA_HEADER + HELPERS.format(deco="@cuda.jit(device=True, inline=True)")
