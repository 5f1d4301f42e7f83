"""Counter-based random numbers: element i of a draw is a pure function of (seed, stream, i).

Every backend computes the same 32-bit hash, so the same seed gives the same numbers on the
interpreter, the CPU backend and CUDA. The hash is Chris Wellons' `lowbias32` applied twice
around a key made from the seed and the stream (one stream per random op in a graph).
"""
import numpy as np

GOLDEN = 0x9E3779B9
TWO_POW_M24 = 1.0 / (1 << 24)


def mix32(x):
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):   # uint32 wraparound is the hash; 0-d inputs would warn
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        x = x ^ (x >> np.uint32(16))
    return x


def key(seed, stream: int):
    s = np.uint32(int(seed) & 0xFFFFFFFF)
    return mix32(s ^ mix32(np.uint32((stream + GOLDEN) & 0xFFFFFFFF)))


def bits(seed, stream: int, counter):
    k = key(seed, stream)
    with np.errstate(over="ignore"):
        return mix32(mix32(np.asarray(counter, dtype=np.uint32) ^ k) + k)


def uniform(seed, stream: int, n: int, dtype=np.float32):
    """n numbers in [0, 1): the top 24 bits of the hash, exact in float32."""
    h = bits(seed, stream, np.arange(n, dtype=np.uint32))
    return ((h >> np.uint32(8)).astype(np.float64) * TWO_POW_M24).astype(dtype)


def normal(seed, stream: int, n: int, dtype=np.float32):
    """Box-Muller on counters 2i and 2i+1; u1 in (0, 1] so the log is finite."""
    i = np.arange(n, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h1 = bits(seed, stream, i * np.uint32(2))
        h2 = bits(seed, stream, i * np.uint32(2) + np.uint32(1))
    ct = np.float32 if dtype in (np.float16,) else dtype
    u1 = (((h1 >> np.uint32(8)).astype(np.float64) + 1.0) * TWO_POW_M24).astype(ct)
    u2 = ((h2 >> np.uint32(8)).astype(np.float64) * TWO_POW_M24).astype(ct)
    two_pi = np.asarray(2.0 * np.pi, dtype=ct)
    return (np.sqrt(np.asarray(-2.0, ct) * np.log(u1)) * np.cos(two_pi * u2)).astype(dtype)
