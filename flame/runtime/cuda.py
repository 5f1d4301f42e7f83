"""The CUDA backend: generated kernels compiled to PTX by Numba with raw-pointer arguments,
launched through cuda.core (about 6 µs a launch instead of the dispatcher's 30-60), cuBLAS
for matmul and the GEMMs of conv2d, every buffer an offset into one planned device arena,
and the whole step captured once as a CUDA graph and replayed."""
from __future__ import annotations

import math

import numpy as np

from ..codegen import cuda as cuda_render
from ..codegen import library_cuda as lib
from ..codegen.ptx import compile_cubins
from ..codegen.schedule import make_schedule
from ..ir.graph import Graph
from . import arena
from .cublas import Handle

WORKSPACE = 32 << 20


def _ck(res):
    """cuda.bindings calls return (CUresult, values...): raise on an error, return values."""
    err, *vals = res if isinstance(res, tuple) else (res,)
    if int(err) != 0:
        from cuda.bindings import driver
        name = driver.cuGetErrorName(err)[1]
        raise RuntimeError(f"CUDA driver error {int(err)} ({name.decode() if isinstance(name, bytes) else name})")
    return vals[0] if len(vals) == 1 else vals


BLOCK = 256   # threads per block of the generated kernels (option `block`)


class CudaRunner:
    def __init__(self, graph: Graph, block: int = BLOCK, tf32: bool = False, use_graph: bool = True,
                 updates: dict | None = None, compile_only: tuple | None = None):
        """updates: output index -> input node id whose buffer receives that output at the
        end of every step (parameters updated on the device). compile_only=(9, 0): no GPU
        needed; compile every kernel's PTX for that architecture into the cache and stop
        (a machine without a GPU can prepare the cache a GPU machine then loads)."""
        self.updates = dict(updates or {})
        self._uploaded, self._resident, self._param_input = {}, {}, {}
        self._modules = {}
        self.block = block
        self.target = "cuda"
        self.dev = None
        if compile_only:
            self.cc, self.hstream, self.base = tuple(compile_only), 0, 0
        else:
            try:
                from cuda.core import Device
                self.dev = Device(0)
                self.dev.set_current()
            except Exception as e:   # no driver, no device, or cuda-core missing
                raise RuntimeError(f"backend='cuda' needs an NVIDIA GPU with its driver and the cuda "
                                   f"extra (pip install 'flame[cuda]'): {type(e).__name__}: {e}") from None
            self.stream = self.dev.create_stream()
            self.hstream = int(self.stream.handle)
            cc = self.dev.compute_capability
            self.cc = (cc[0], cc[1])
        self.arch = f"sm_{self.cc[0]}{self.cc[1]}"
        # thread block clusters (several blocks a long row) from sm_90 (H100) on
        sched = make_schedule(graph, "cuda", block, clusters=self.cc >= (9, 0))
        self.schedule = sched
        self.graph, self.kernels, self.plan, self.descs = sched.graph, sched.kernels, sched.plan, sched.descs
        self.nodes = {n.id: n for n in self.graph.all_nodes()}
        self.sources = {}
        scratch = max([self._scratch_bytes(k) for k in self.kernels if k.kind == "L"] + [0])
        self.scratch_off = arena._align(self.plan.peak)
        ws_off = self.scratch_off + arena._align(scratch)
        if self.dev is not None:
            self.buf = self.dev.allocate(ws_off + WORKSPACE, stream=self.stream)
            self.base = int(self.buf.handle)
            self.cublas = Handle(self.hstream, self.base + ws_off, WORKSPACE, tf32)
        self._jobs = []   # a first pass only lists the kernels, which compile in parallel
        for k in self.kernels:
            if sched.runs(k):
                self._step(k)
        compile_cubins(self._jobs)
        self._jobs = None
        self.steps = [self._step(k) for k in self.kernels if sched.runs(k)]
        self.launches = sum(n for _, n in self.steps)
        self.exec = None
        self.use_graph = use_graph
        if self.dev is None:
            return
        for n in self.graph.nodes:   # array constants are uploaded once
            if n.op == "const" and n.id in self.plan.offsets:
                self._h2d(n.id, n.attrs["value"])
        self.sync()

    # ---- memory
    def ptr(self, nid) -> int:
        return self.base + self.plan.offsets[nid]

    def _h2d(self, nid, arr):
        from cuda.bindings import driver
        n = self.nodes[nid]
        a = np.ascontiguousarray(np.asarray(arr, dtype=n.dtype.np))
        if a.shape != n.shape and a.size != n.size:
            raise ValueError(f"expected shape {list(n.shape)}, got {list(a.shape)}")
        _ck(driver.cuMemcpyHtoDAsync(self.ptr(nid), a.ctypes.data, a.nbytes, self.hstream))
        self._keep = getattr(self, "_keep", []) + [a]   # alive until the copy is done

    def _d2h(self, nid) -> np.ndarray:
        from cuda.bindings import driver
        n = self.nodes[nid]
        out = np.empty(n.shape, n.dtype.np)
        _ck(driver.cuMemcpyDtoHAsync(out.ctypes.data, self.ptr(nid), out.nbytes, self.hstream))
        return out

    def sync(self):
        from cuda.bindings import driver
        _ck(driver.cuStreamSynchronize(self.hstream))
        self._keep = []

    # ---- compilation
    def _compile(self, name, src, dtypes):
        if self._jobs is not None:
            self._jobs.append((name, src, dtypes, self.cc))
            return None
        from cuda.core import ObjectCode
        from ..codegen.ptx import kernel_cubin
        entry, cubin = kernel_cubin(name, src, dtypes, self.cc)
        self.sources[name] = src
        if self.dev is None:
            return None
        if cubin not in self._modules:   # kernels with the same code share one loaded module
            self._modules[cubin] = ObjectCode.from_cubin(cubin).get_kernel(entry)
        return self._modules[cubin]

    def _launcher(self, kern, grid, block, ptrs, cluster=1):
        """grid: blocks; cluster > 1: launched as grid // cluster clusters of that many blocks
        (cuda.core counts a clustered grid in clusters). None without a device (compile_only:
        a cluster's LaunchConfig already asks the driver)."""
        if self.dev is None:
            return None
        from cuda.core import LaunchConfig, launch
        if cluster > 1:
            cfg = LaunchConfig(grid=grid // cluster, cluster=cluster, block=block)
        else:
            cfg = LaunchConfig(grid=grid, block=block)
        args = [np.uint64(p) for p in ptrs]

        def run(stream):
            launch(stream, cfg, kern, *args)
        return run

    def _scratch_bytes(self, k):
        n = k.root
        if n.op == "conv2d":
            g = lib.conv_geometry(n.inputs[0].shape, n.inputs[1].shape, n.attrs)
        elif n.op == "conv2d_weight_grad":
            g = lib.conv_geometry(n.inputs[0].shape, n.shape, n.attrs)
        elif n.op == "conv2d_input_grad":
            g = lib.conv_geometry(n.shape, n.inputs[1].shape, n.attrs)
        else:
            return 0
        return g["N"] * g["C"] * g["KH"] * g["KW"] * g["L"] * n.dtype.itemsize

    # ---- one kernel of the schedule -> (callable(stream), launches)
    def _step(self, k):
        if k.kind != "L":
            d = self.descs[k.root.id]
            src = self.schedule.source(k)
            kern = self._compile(k.name, src, [p[1].dtype for p in d.params])
            grid, blk = cuda_render.launch_dims(d, self.block)
            return self._launcher(kern, grid, blk, [self.ptr(p[1].id) for p in d.params],
                                  cuda_render.cluster_blocks(d)), 1
        n = k.root
        if n.op == "matmul":
            return self._matmul(n)
        if n.op in ("conv2d", "conv2d_input_grad", "conv2d_weight_grad"):
            return self._conv(n)
        if n.op == "gather":
            t, idx = n.inputs
            width = math.prod(t.shape[1:])
            name = f"L_gather_{idx.size}x{width}"
            src, grid, blk = lib.gather(name, idx.size, t.shape[0], width)
            kern = self._compile(name, src, [t.dtype, idx.dtype, n.dtype])
            return self._launcher(kern, grid, blk, [self.ptr(t.id), self.ptr(idx.id), self.ptr(n.id)]), 1
        if n.op == "scatter_add":
            src_, idx = n.inputs
            width = math.prod(n.shape[1:])
            name = f"L_scatter_add_{idx.size}x{n.shape[0]}x{width}"
            code, grid, blk = lib.scatter_add(name, idx.size, n.shape[0], width, n.dtype)
            kern = self._compile(name, code, [src_.dtype, idx.dtype, n.dtype])
            return self._launcher(kern, grid, blk, [self.ptr(src_.id), self.ptr(idx.id), self.ptr(n.id)]), 1
        raise NotImplementedError(f"{n.op} has no CUDA implementation; node %{n.id} at {n.loc}")

    def _matmul(self, n):
        x, y = n.inputs
        ta, tb = n.attrs["ta"], n.attrs["tb"]
        m, nn = n.shape[-2:]
        k = x.shape[-2] if ta else x.shape[-1]
        bo = n.shape[:-2]
        isz = n.dtype.itemsize
        bx, by = x.shape[:-2], y.shape[:-2]
        mats = []   # (x offset, y offset, out offset) per output batch, in elements

        def off(idx, bshape, size):
            lead = len(bo) - len(bshape)
            flat = 0
            for d, s in enumerate(bshape):
                flat = flat * s + (idx[d + lead] if s != 1 else 0)
            return flat * size
        for b, idx in enumerate(np.ndindex(*bo) if bo else [()]):
            mats.append((off(idx, bx, m * k), off(idx, by, k * nn), b * m * nn))
        px, py, po = self.ptr(x.id), self.ptr(y.id), self.ptr(n.id)
        batch = len(mats)
        sx = mats[1][0] - mats[0][0] if batch > 1 else 0
        sy = mats[1][1] - mats[0][1] if batch > 1 else 0
        uniform = all(a == (i * sx, i * sy, i * m * nn) for i, a in enumerate(mats))
        calls = [(0, 0, 0, batch)] if uniform else [(a, b_, c, 1) for a, b_, c in mats]

        def run(stream):
            self.cublas.set_stream(int(stream.handle) if hasattr(stream, "handle") else stream)
            for ox, oy, oo, cnt in calls:
                self.cublas.gemm(px + ox * isz, py + oy * isz, po + oo * isz, m, nn, k, ta, tb, cnt,
                                 sx, sy, m * nn, n.dtype)
        return run, len(calls)

    def _conv(self, n):
        a, d, isz = n.attrs, n.dtype, n.dtype.itemsize
        col = self.base + self.scratch_off
        if n.op == "conv2d":
            x, w = n.inputs
            g = lib.conv_geometry(x.shape, w.shape, a)
        elif n.op == "conv2d_input_grad":
            gy, w = n.inputs
            g = lib.conv_geometry(n.shape, w.shape, a)
        else:
            x, gy = n.inputs
            g = lib.conv_geometry(x.shape, n.shape, a)
        G, K, L, N = g["G"], g["K"], g["L"], g["N"]
        og = g["O"] // G
        tag = "_".join(str(g[s]) for s in ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW"))
        launches = []
        if n.op in ("conv2d", "conv2d_weight_grad"):
            name = f"L_im2col_{tag}"
            src, grid, blk = lib.im2col(name, g, d)
            launches.append(self._launcher(self._compile(name, src, [d, d]), grid, blk, [self.ptr(x.id), col]))
        gemms = []   # (a, b, c, m, n, k, ta, tb, batch, sa, sb, sc, beta)
        if n.op == "conv2d":      # out[n, g] (og×L) = W[g] (og×K) · col[n, g] (K×L)
            for gi in range(G):
                gemms.append((self.ptr(w.id) + gi * og * K * isz, col + gi * K * L * isz,
                              self.ptr(n.id) + gi * og * L * isz, og, L, K, False, False, N,
                              0, G * K * L, g["O"] * L, 0.0))
        elif n.op == "conv2d_input_grad":   # dcol[n, g] (K×L) = W[g]ᵀ (K×og) · gy[n, g] (og×L)
            for gi in range(G):
                gemms.append((self.ptr(w.id) + gi * og * K * isz, self.ptr(gy.id) + gi * og * L * isz,
                              col + gi * K * L * isz, K, L, og, True, False, N,
                              0, g["O"] * L, G * K * L, 0.0))
        else:                     # dW[g] (og×K) = Σ_n gy[n, g] (og×L) · col[n, g]ᵀ (L×K)
            for gi in range(G):
                for b in range(N):
                    gemms.append((self.ptr(gy.id) + (b * g["O"] + gi * og) * L * isz,
                                  col + (b * G + gi) * K * L * isz,
                                  self.ptr(n.id) + gi * og * K * isz, og, K, L, False, True, 1,
                                  0, 0, 0, 0.0 if b == 0 else 1.0))
        tail = []
        if n.op == "conv2d_input_grad":
            name = f"L_col2im_{tag}"
            src, grid, blk = lib.col2im(name, g, d)
            tail.append(self._launcher(self._compile(name, src, [d, d]), grid, blk, [col, self.ptr(n.id)]))

        def run(stream):
            for l in launches:
                l(stream)
            self.cublas.set_stream(int(stream.handle) if hasattr(stream, "handle") else stream)
            for (pa, pb, pc, m, nn, k, ta, tb, bt, sa, sb, sc, beta) in gemms:
                self.cublas.gemm(pa, pb, pc, m, nn, k, ta, tb, bt, sa, sb, sc, d, beta)
            for l in tail:
                l(stream)
        return run, len(launches) + len(gemms) + len(tail)

    # ---- running
    def capture(self):
        """Record every step once into a CUDA graph (cuBLAS calls included)."""
        from cuda.bindings import driver
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        _ck(driver.cuStreamBeginCapture(self.hstream, mode))
        try:
            for run, _ in self.steps:
                run(self.stream)
            self._copy_updates(self.stream)
        finally:
            graph = _ck(driver.cuStreamEndCapture(self.hstream))
        self.exec = _ck(driver.cuGraphInstantiate(graph, 0))
        self.cublas.set_stream(self.hstream)

    def replay(self):
        """Launch the step on the device (no host copies)."""
        if not self.use_graph:
            for run, _ in self.steps:
                run(self.stream)
            self._copy_updates(self.stream)
            return
        if self.exec is None:
            self.capture()
        from cuda.bindings import driver
        _ck(driver.cuGraphLaunch(self.exec, self.hstream))

    def upload(self, feeds: dict):
        """Copy inputs to the device. A Parameter (rather than an array) is copied only when
        its data changed since the last upload, or not at all while this runner holds its
        newest values (see adopt_param): parameters stay on the device between steps."""
        for n in self.graph.inputs:
            v = feeds[n.attrs["name"]]
            if getattr(v, "_flame_param", False):
                if v.__dict__.get("_device_owner") is self and self._resident.get(n.id) is v:
                    continue
                if self._uploaded.get(n.id) == (id(v), v.__dict__.get("version")):
                    continue
                self._h2d(n.id, v.data)
                self._uploaded[n.id] = (id(v), v.__dict__.get("version"))
            else:
                self._h2d(n.id, v)

    def adopt_param(self, p, input_id: int):
        """After a step that wrote p's new values into its input buffer: the device copy is
        the newest; p.data downloads it when the host asks."""
        p.__dict__["_device_owner"] = self
        self._resident[input_id] = p
        self._param_input[id(p)] = input_id
        # the values changed: a new version, which only this runner's buffer holds (another
        # graph sharing p — another bucket's step, a sampler — must upload it before it runs)
        p.__dict__["version"] = p.__dict__.get("version", 0) + 1
        self._uploaded[input_id] = (id(p), p.__dict__["version"])

    def download_param(self, p) -> np.ndarray:
        out = self._d2h(self._param_input[id(p)])
        self.sync()
        self._uploaded[self._param_input[id(p)]] = (id(p), p.__dict__.get("version"))
        return out

    def _copy_updates(self, stream):
        from cuda.bindings import driver
        for out_index, input_id in self.updates.items():
            o = self.graph.outputs[out_index]
            _ck(driver.cuMemcpyDtoDAsync(self.ptr(input_id), self.ptr(o.id), self.nodes[input_id].nbytes,
                                         int(stream.handle) if hasattr(stream, "handle") else stream))

    def run(self, feeds: dict) -> list:
        for n in self.graph.inputs:
            v = feeds[n.attrs["name"]]
            shape = tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
            if shape != n.shape:
                raise ValueError(f"input {n.attrs['name']!r}: expected shape {list(n.shape)}, got {list(shape)}")
        self.upload(feeds)
        self.replay()
        outs = []
        for i, o in enumerate(self.graph.outputs):
            if i in self.updates:
                outs.append(None)     # written into the parameter's buffer on the device
            elif o.op == "const" and o.id not in self.plan.offsets:
                outs.append(np.array(o.attrs["value"]))
            else:
                outs.append(self._d2h(o.id))
        self.sync()
        return outs
