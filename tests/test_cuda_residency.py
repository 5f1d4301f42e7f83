"""The CUDA runner's parameter bookkeeping — which of several compiled steps holds a
parameter's newest values on the device, and when to upload — checked without a GPU: the
runner's own upload / adopt_param / download_param over host arrays standing in for device
buffers. Several graphs update the same parameters in training (one per bucket shape, plus
the sampler's graphs that read them)."""
from types import SimpleNamespace

import numpy as np

from flame.nn import Parameter
from flame.runtime.cuda import CudaRunner


class HostBufferRunner(CudaRunner):
    def __init__(self):                    # no device: only the bookkeeping's state
        self._uploaded, self._resident, self._param_input = {}, {}, {}
        self.buffers = {}
        self.graph = SimpleNamespace(inputs=[SimpleNamespace(id=7, attrs={"name": "p"})])

    def _h2d(self, nid, arr):
        self.buffers[nid] = np.array(arr)

    def _d2h(self, nid):
        return self.buffers[nid].copy()

    def sync(self):
        pass

    def train_step(self, p):
        """What Compiled does with param_updates: upload, run (here: p + 1 on the device), adopt."""
        self.upload({"p": p})
        seen = self.buffers[7].copy()
        self.buffers[7] = seen + 1
        self.adopt_param(p, 7)
        return seen

    def read_step(self, p):
        self.upload({"p": p})
        return self.buffers[7].copy()


def test_every_graph_sees_the_newest_parameter():
    rng = np.random.default_rng()
    start = rng.integers(-1000, 1000, 4).astype(np.float32)      # integers: the sums are exact
    p = Parameter(start.copy())
    runners = [HostBufferRunner() for _ in range(3)]
    sampler = HostBufferRunner()
    done = 0
    for i in range(40):
        r = runners[int(rng.integers(len(runners)))]
        np.testing.assert_array_equal(r.train_step(p), start + done, err_msg=f"step {i}")
        done += 1
        what = rng.integers(4)
        if what == 0:                       # the host reads the weights (a save)
            np.testing.assert_array_equal(p.data, start + done)
        elif what == 1:                     # a sampler graph reads them
            np.testing.assert_array_equal(sampler.read_step(p), start + done)
        elif what == 2 and i % 7 == 0:      # the host sets them (resume)
            start, done = rng.integers(-1000, 1000, 4).astype(np.float32), 0
            p.data = start.copy()
    np.testing.assert_array_equal(p.data, start + done)
