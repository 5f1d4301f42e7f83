"""Experiment: where does group_norm's forward (2x320x64x64, 64 rows of 40960) lose time
against a copy? Hand-written row kernels, launched through flame's CUDA runner exactly like
the generated one (one kernel in a CUDA graph), varying
  R  rows a cluster, interleaved: every block loads its part of all R rows first, then
     reduces and stores them one after another (row a's exchange overlaps the memory traffic
     of row a+1)
  P  blocks a cluster, T threads a block, W floats a load/store instruction (1, 2 or 4)
  X  the cluster exchange straight from the warps' shared slots (no block-level stage)
  K  plain sums of x - k and (x - k)^2, k the row's first element (every thread loads it),
     instead of Chan's combine: what the butterfly's dependent arithmetic costs (float32
     loses precision where |mean - k| is large against the spread: a timing probe only)
    PYTHONPATH=.:bench python bench/experiments/rows_pipeline.py"""
import sys

import numpy as np

import flame
import flame.nn.functional as F
from flame.codegen.prelude import CUDA_PRELUDE as PRELUDE
from flame.codegen.cuda import CLUSTER_IMPORT
import gpu_bench as gb

N, ROWS = 40960, 64
# timed on an H100 on 2026-12-07 (docs/PERFORMANCE.md): W=4 and X no faster than the generated
# kernel; R=2, P=4 (0.0194 ms against 0.0125) slower: the clusters that fit at once are printed
# (clusters of 4 whole-SM blocks may not all fit, which would take a second wave). R=2, P=2
# interleaves on 64 SMs with a cluster of 2.
VARIANTS = [dict(R=1, P=2, T=1024, W=1, K=True), dict(R=2, P=2, T=1024, W=1), dict(R=2, P=4, T=1024, W=1),
            dict(R=1, P=2, T=1024, W=4), dict(R=1, P=2, T=1024, W=1, X=True)]


def chan(lines, ind, s, q, ts, tq, na, nb, plain=False):
    """(s, q) over na elements joined by (ts, tq) over nb: Chan's formula (plain: sums)."""
    if plain:
        lines += [ind + f"{q} = {q} + {tq}", ind + f"{s} = {s} + {ts}"]
        return
    lines += [ind + f"d_ = {s} * np.float32({nb / (na + nb)}) - {ts} * np.float32({na / (na + nb)})",
              ind + f"{q} = ({q} + {tq}) + d_ * d_ * np.float32({(na + nb) / (na * nb)})",
              ind + f"{s} = {s} + {ts}"]


def gen(R, P, T, W, X=False, K=False):
    E = N // P
    S = E // T
    V = S // W
    warps = T // 32
    ind = "    "
    L = ["@cuda.jit  # launch_bounds=%d" % T, "def kernel(p0, out):", ind + "tid = cuda.threadIdx.x",
         ind + f"c = cuda.blockIdx.x // {P}", ind + f"part = cuda.blockIdx.x % {P}",
         ind + "lane = tid % 32", ind + "warp = tid // 32"]
    for a in range(R):
        L += [ind + f"base{a} = (c * {R} + {a}) * {N}", ind + f"x{a} = cuda.local.array({S}, numba.float32)"]
    for a in range(R):
        L += [ind + f"for j in range({V}):", ind + f"    i = base{a} + (tid + (part * {V} + j) * {T}) * {W}"]
        if W == 1:
            L += [ind + f"    x{a}[j] = p0[i]"]
        else:
            L += [ind + f"    v = ld{W}(p0, i)"] + [ind + f"    x{a}[j * {W} + {k}] = v[{k}]" for k in range(W)]
    for a in range(R):
        if K:   # sums around the row's first element
            L += [ind + f"k = p0[base{a}]", ind + "s = np.float32(0)", ind + "q = np.float32(0)",
                  ind + f"for j in range({S}):", ind + f"    d = x{a}[j] - k", ind + "    s += d", ind + "    q += d * d"]
        else:
            L += [ind + "s = np.float32(0)", ind + f"for j in range({S}):", ind + f"    s += x{a}[j]",
                  ind + f"m = s * np.float32({1 / S})", ind + "q = np.float32(0)",
                  ind + f"for j in range({S}):", ind + f"    d = x{a}[j] - m", ind + "    q += d * d"]
        n, msk = S, 16
        while msk:
            L += [ind + f"ts = _shfl_xor(s, {msk})", ind + f"tq = _shfl_xor(q, {msk})"]
            chan(L, ind, "s", "q", "ts", "tq", n, n, K)
            n, msk = 2 * n, msk // 2
        L += [ind + f"ss{a} = cuda.shared.array({warps}, numba.float32)",
              ind + f"sq{a} = cuda.shared.array({warps}, numba.float32)",
              ind + "if lane == 0:", ind + f"    ss{a}[warp] = s", ind + f"    sq{a}[warp] = q"]
        if not X:
            L += [ind + "cuda.syncthreads()", ind + f"s = ss{a}[tid % {warps}]", ind + f"q = sq{a}[tid % {warps}]"]
            msk = warps // 2
            while msk:
                L += [ind + f"ts = _shfl_xor(s, {msk})", ind + f"tq = _shfl_xor(q, {msk})"]
                chan(L, ind, "s", "q", "ts", "tq", n, n, K)
                n, msk = 2 * n, msk // 2
            L += [ind + f"cs{a} = cuda.shared.array(1, numba.float32)", ind + f"cq{a} = cuda.shared.array(1, numba.float32)",
                  ind + "if tid == 0:", ind + f"    cs{a}[0] = s", ind + f"    cq{a}[0] = q",
                  ind + "cluster_sync()", ind + f"s = cluster_load(cs{a}, 0, 0)", ind + f"q = cluster_load(cq{a}, 0, 0)"]
            for r in range(1, P):
                L += [ind + f"ts = cluster_load(cs{a}, 0, {r})", ind + f"tq = cluster_load(cq{a}, 0, {r})"]
                chan(L, ind, "s", "q", "ts", "tq", r * n, n, K)
        else:   # each lane reads warp slot (lane % warps) of every block of the cluster
            L += [ind + "cluster_sync()", ind + f"w_ = tid % {warps}",
                  ind + f"s = cluster_load(ss{a}, w_, 0)", ind + f"q = cluster_load(sq{a}, w_, 0)"]
            for r in range(1, P):
                L += [ind + f"ts = cluster_load(ss{a}, w_, {r})", ind + f"tq = cluster_load(sq{a}, w_, {r})"]
                chan(L, ind, "s", "q", "ts", "tq", r * n, n, K)
            n *= P
            msk = warps // 2
            while msk:
                L += [ind + f"ts = _shfl_xor(s, {msk})", ind + f"tq = _shfl_xor(q, {msk})"]
                chan(L, ind, "s", "q", "ts", "tq", n, n, K)
                n, msk = 2 * n, msk // 2
        if a == R - 1:
            L += [ind + "cluster_arrive()"]
        if K:   # mean = k + s / N, variance = q / N - (s / N)^2
            L += [ind + f"ds = s * np.float32({1 / N})", ind + "mean = k + ds",
                  ind + f"rstd = np.float32(1) / math.sqrt(q * np.float32({1 / N}) - ds * ds + np.float32(1e-5))"]
        else:
            L += [ind + f"mean = s * np.float32({1 / N})",
                  ind + f"rstd = np.float32(1) / math.sqrt(q * np.float32({1 / N}) + np.float32(1e-5))"]
        L += [ind + f"for j in range({V}):", ind + f"    i = base{a} + (tid + (part * {V} + j) * {T}) * {W}"]
        if W == 1:
            L += [ind + f"    out[i] = (x{a}[j] - mean) * rstd"]
        else:
            vals = ", ".join(f"(x{a}[j * {W} + {k}] - mean) * rstd" for k in range(W))
            L += [ind + f"    st{W}(out, i, {vals})"]
    L += [ind + "cluster_wait()"]
    head = PRELUDE + CLUSTER_IMPORT + "from vec_ptx import ld2, ld4, st2, st4\n\n"
    return head + "\n".join(L) + "\n", (ROWS // R) * P, T, P


def main():
    sys.path.insert(0, "bench/experiments")
    gb.bench_copy()
    x = gb.rnd(2, 320, 64, 64)
    xr = x.reshape(64, N).astype(np.float64)
    ref = ((xr - xr.mean(1, keepdims=True)) / np.sqrt(xr.var(1, keepdims=True) + 1e-5)).reshape(x.shape)
    fr = gb.flame_runner(lambda x: F.group_norm(x, 32), x)
    ms = gb.median_ms_flame(fr, reps=200)
    gb.row("exp: generated group_norm fwd", ms, float("nan"), bytes_=8 * x.size, note=gb.roofline(8 * x.size, ms))
    (kname,) = [k for k in fr.sources]
    d = [fr.descs[k.root.id] for k in fr.kernels if fr.schedule.runs(k)][0]
    ptrs = [fr.ptr(p[1].id) for p in d.params]
    for v in VARIANTS:
        src, grid, block, cluster = gen(**v)
        try:
            kern = fr._compile(f"exp_{len(gb.ROWS)}", src, [p[1].dtype for p in d.params])
            if cluster > 1:
                from cuda.core import LaunchConfig
                fits = kern.occupancy.max_active_clusters(
                    LaunchConfig(grid=grid // cluster, cluster=cluster, block=block), stream=fr.stream)
                print(f"{v}: {grid // cluster} clusters of {cluster}, {fits} fit at once", flush=True)
            fr.steps = [(fr._launcher(kern, grid, block, ptrs, cluster), 1)]
            fr.exec = None
            ms = gb.median_ms_flame(fr, reps=200)
            got = fr._d2h(d.params[-1][1].id)
            fr.sync()
            err = float(np.abs(got - ref).max())
            gb.row(f"exp: {v}", ms, float("nan"), bytes_=8 * x.size, note=f"{gb.roofline(8 * x.size, ms)} err {err:.1e}")
        except Exception as e:
            print("FAILED", v, type(e).__name__, str(e)[:400], flush=True)
    for r in gb.ROWS:
        print(f"| {r['bench']} | {r.get('flame_ms', r.get('torch_ms'))} | {r.get('note', '')} |")
    print(f"timing: {gb.timing.MODE}")


if __name__ == "__main__":
    main()
