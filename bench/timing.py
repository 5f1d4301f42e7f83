"""Device time of a repeated piece of GPU work, from CUDA events around each repetition.

With events recorded around one launch at a time, the GPU records the first event, then waits
for the host to finish submitting the launch (a CUDA graph launch costs the host microseconds),
and that wait is counted as the kernel's time. For a 10 µs kernel it is a fifth of the figure.
GATED (the default) holds the stream on a word of mapped host memory (cuStreamWaitValue32)
while every repetition and its events are enqueued, then releases it. The events then bracket
the GPU's work only, and back-to-back repetitions leave no host gaps. flame's graph replays and
torch's eager launches are timed the same way. MODE "launch" is the old, ungated timing.
stream_ms is throughput instead: one pair of events around back-to-back repetitions, which
counts the host wherever it is slower than the GPU (a training loop's steps a second).
FLUSH_L2 overwrites a buffer larger than L2 before each repetition, so the inputs come from
HBM and not from the L2 that the repetition before left warm (off by default; a probe)."""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from flame.runtime.cuda import _ck   # raise on a CUDA driver error, else the values

MODE = "gated"            # or "launch": events around each launch as it is submitted
FLUSH_L2 = False
GATE_CHUNK = 10           # repetitions enqueued behind one gate
GATE_TIMEOUT_S = 5.0      # the host enqueues a chunk in milliseconds; longer means it blocked
_FLUSH_BYTES = 256 << 20  # H100/H200 L2: 50/60 MB


_flush = {}


def _flush_buffer():
    from cuda.bindings import driver
    if "ptr" not in _flush:
        _flush["ptr"] = _ck(driver.cuMemAlloc(_FLUSH_BYTES))
    return _flush["ptr"]


def stream_ms(enqueue, hstream: int, reps: int = 50, warmup: int = 3) -> float:
    """Mean milliseconds a repetition over reps launched back to back."""
    from cuda.bindings import driver
    for _ in range(warmup):
        enqueue()
    e0, e1 = _ck(driver.cuEventCreate(0)), _ck(driver.cuEventCreate(0))
    _ck(driver.cuStreamSynchronize(hstream))
    _ck(driver.cuEventRecord(e0, hstream))
    for _ in range(reps):
        enqueue()
    _ck(driver.cuEventRecord(e1, hstream))
    _ck(driver.cuEventSynchronize(e1))
    ms = _ck(driver.cuEventElapsedTime(e0, e1)) / reps
    _ck(driver.cuEventDestroy(e0))
    _ck(driver.cuEventDestroy(e1))
    return ms


def median_ms(enqueue, hstream: int, reps: int = 50, warmup: int = 3) -> float:
    """Median device milliseconds of enqueue() (which submits work to stream hstream)."""
    from cuda.bindings import driver
    for _ in range(warmup):
        enqueue()
    flush = _flush_buffer() if FLUSH_L2 else None   # allocated before any gate holds the stream
    _ck(driver.cuStreamSynchronize(hstream))
    events = [(_ck(driver.cuEventCreate(0)), _ck(driver.cuEventCreate(0))) for _ in range(reps)]
    gated = MODE == "gated"
    # gated in chunks: a launch queue that fills while the stream is held would block the host
    chunk = GATE_CHUNK if gated else reps
    try:
        for c in range(0, reps, chunk):
            gate = _Gate(hstream) if gated else None
            try:
                for e0, e1 in events[c:c + chunk]:
                    if flush is not None:
                        _ck(driver.cuMemsetD32Async(flush, 0, _FLUSH_BYTES // 4, hstream))
                    _ck(driver.cuEventRecord(e0, hstream))
                    enqueue()
                    _ck(driver.cuEventRecord(e1, hstream))
                    if not gated:
                        _ck(driver.cuEventSynchronize(e1))
            finally:
                if gate is not None:
                    gate.release()
        _ck(driver.cuStreamSynchronize(hstream))
        times = [_ck(driver.cuEventElapsedTime(e0, e1)) for e0, e1 in events]
    finally:
        for e0, e1 in events:
            driver.cuEventDestroy(e0)
            driver.cuEventDestroy(e1)
    return float(np.median(times))


class _Gate:
    """The stream waits until a mapped host word becomes 1. A watchdog releases it after
    GATE_TIMEOUT_S, so a host call that waits on the GPU cannot hang the benchmark; the
    figures of such a run would include host time, so release() then raises."""

    def __init__(self, hstream: int):
        from cuda.bindings import driver
        self.host = _ck(driver.cuMemHostAlloc(4, driver.CU_MEMHOSTALLOC_DEVICEMAP))
        self.word = ctypes.c_uint32.from_address(int(self.host))
        self.word.value = 0
        dptr = _ck(driver.cuMemHostGetDevicePointer(self.host, 0))
        _ck(driver.cuStreamWaitValue32(hstream, dptr, 1, driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ))
        self.hstream = hstream
        self.timed_out = False
        self.watchdog = threading.Timer(GATE_TIMEOUT_S, self._expire)
        self.watchdog.start()

    def _expire(self):
        self.timed_out = True
        self.word.value = 1

    def release(self):
        from cuda.bindings import driver
        self.watchdog.cancel()
        self.word.value = 1
        _ck(driver.cuStreamSynchronize(self.hstream))
        _ck(driver.cuMemFreeHost(self.host))
        if self.timed_out:
            raise RuntimeError(f"timing gate: enqueueing the repetitions took over {GATE_TIMEOUT_S}s "
                               "(a host call waited on the GPU); these figures would count host time")
