"""The CUDA code generator without a GPU: every fusion class runs as CUDA source under Numba's
CUDA simulator on tiny shapes (a few blocks of 32 threads) against the interpreter, and every
generated kernel of the test graphs compiles to PTX, float32 kernels without float64 math."""
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import flame
import flame.nn.functional as F
from flame.codegen.fusion import fuse
from flame.codegen.kernel import describe, row_steps
from flame.codegen.split import split_reductions

pytest.importorskip("numba.cuda")

rng = np.random.default_rng()

# each graph exercises one fusion class; the simulator script below traces the same list
GRAPHS = {
    "elementwise_chain": ("lambda x, b: ((x * 1.5 + b).tanh() * x - b).sigmoid()", [(5, 33), (33,)]),
    # tiles of 4 x 32 outputs, two a block: 5 whole tiles (each block's second one loaded
    # while its first computes), then a partial one, on the third block
    "elementwise_whole_and_partial_tiles": ("lambda x, b: ((x * 1.5 + b).tanh() * x - b).sigmoid()", [(21, 33), (33,)],
                                            32, "cr.ELEMENTWISE_BLOCK, cr.ELEMENTWISE_TILES = 32, 2"),
    # no loads: random draws, a whole tile and a partial one
    "random_whole_and_partial_tiles": ("lambda x, b: (flame.rand_uniform((7, 33), seed=3), x + b)", [(5, 33), (33,)],
                                       32, "cr.ELEMENTWISE_BLOCK, cr.ELEMENTWISE_TILES = 32, 2"),
    # loads a tile ahead of a bf16 input (a GEMM's output) and a float32 one: 3 whole tiles
    # and a partial one on 2 blocks of 2 tiles
    "elementwise_bf16_and_f32_inputs_a_tile_ahead": (
        "lambda x, b: (x.cast('bf16') @ x.cast('bf16').T).cast('f32') * b[:20] + x[:, :20]", [(20, 33), (33,)],
        32, "cr.ELEMENTWISE_BLOCK, cr.ELEMENTWISE_TILES = 32, 2"),
    # a tile a block (the default): two whole tiles (288 = 2 x 128 + 32) and a partial one;
    # two outputs, read through a transpose
    "elementwise_two_outputs_a_tile_a_block": ("lambda x, b: (x.T * b, (x.T + b).exp())", [(9, 32), (9,)],
                                               32, "cr.ELEMENTWISE_BLOCK, cr.ELEMENTWISE_TILES = 32, 1"),
    "reduce_prologue": ("lambda x, b: ((x - b) * (x - b)).sum(1)", [(5, 33), (33,)]),
    "row_softmax": ("lambda x, b: F.softmax(x + b, dim=-1)", [(5, 70), (70,)]),
    "row_layer_norm": ("lambda x, b: F.layer_norm(x, (70,), b, b)", [(6, 70), (70,)]),
    "row_group_norm": ("lambda x, b: F.group_norm(x, 2, b, b)", [(2, 4, 5, 5), (4,)]),
    "leading_axis_reduce": ("lambda x, b: (x * b).sum(0)", [(40, 7), (7,)]),
    "movement_fold": ("lambda x, b: (x.permute(1, 0)[::2, 1:] * 2.0).reshape(-1) + b[:1]", [(6, 9), (3,)]),
    "pad_concat_upsample": ("lambda x, b: flame.cat([F.pad(x, (1, 1, 2, 0)), F.interpolate(x[None, None], scale_factor=2)[0, 0][:3, :5]], 0) + b[0]", [(3, 3), (2,)]),
    "random_where": ("lambda x, b: F.dropout(x, 0.3, seed=5) + flame.rand_normal(x.shape, seed=1) * b", [(4, 8), (8,)]),
    "bf16_storage": ("lambda x, b: F.softmax((x.cast('bf16') @ x.cast('bf16').T) * b[:5].cast('bf16'), dim=-1).cast('f32')", [(5, 33), (33,)]),
    # a long group (LONG_GROUP lowered to 16): each channel's mean and centred sum of squares,
    # the group's from those, then the normalisation, x - row mean recomputed in each reader
    "group_norm_channel_rows": ("lambda x, b: F.group_norm(x + 40.0, 2, b, b)", [(1, 4, 4, 4), (4,)]),
    # the silu over [N, C, H, W] inside the [N, G, C/G * H * W] row kernel (another view)
    "other_view_silu_after_group_norm": ("lambda x, b: F.silu(F.group_norm(x, 2, b, b)) * 1.5", [(2, 4, 5, 6), (4,)], 32,
                                         "F.LONG_GROUP = 1 << 30"),
    # views apart only by size-1 axes, and rows over a middle axis seen in another view
    "other_view_unit_axes": ("lambda x, b: F.silu(F.group_norm(x, 1, b, b))", [(3, 6, 1, 4), (6,)], 32,
                             "F.LONG_GROUP = 1 << 30"),
    "other_view_middle_axis_rows": ("lambda x, b: F.softmax(x, dim=1).reshape(4, 35) * b", [(2, 5, 14), (35,)]),
    "multi_output_group_norm_backward": ("flame.value_and_grad(lambda x, w, b: (F.group_norm(x, 2, w, b) * x).sum(), argnums=(0, 1, 2))", [(2, 4, 5, 5), (4,), (4,)]),
    "training_step": ("flame.value_and_grad(lambda x, b: (F.softmax(x * b, dim=-1) * F.layer_norm(x, (12,))).sum(), argnums=(0, 1))", [(4, 12), (12,)]),
    # rows shared by several warps (shuffles, then one shared slot per warp), two rows a
    # block and an odd number of rows (the last block's spare rows must store nothing)
    "rows_across_warps": ("flame.value_and_grad(lambda x, b: (F.softmax(x, dim=-1) * F.layer_norm(x, (300,), b, b)).sum(), argnums=(0, 1))", [(3, 300), (300,)], 128),
    # a row's mean and squared deviations in one pass and one exchange (Chan's formula): rows
    # of two warps, two a block, an odd number of rows; a mean 300 times the spread, spikes
    "one_pass_moments": ("lambda x, b: F.layer_norm(x * 0.5 + 150.0 + (x > 2.0).cast('f32') * 50.0, (512,), b, b)",
                         [(3, 512), (512,)], 128),
    # a group held in registers by one block of LONG_ROW_THREADS (limits scaled down: groups
    # of 128, 64 threads, 2 each), its backward and the loss split along the group rows
    "long_rows_in_registers": ("flame.value_and_grad(lambda x, w, b: (F.group_norm(x, 2, w, b) * x).sum(), argnums=(0, 1, 2))",
                               [(2, 4, 8, 8), (4,), (4,)], 32,
                               "F.LONG_GROUP = 1 << 30; kd.ROW_CACHE_SLOTS, kd.LONG_ROW_THREADS, kd.LONG_ROW_SLOTS = 2, 64, 8; "
                               "sp.LONG_ROW, sp.LONG_ROW_MIN_ROWS = 512, 2"),
}

SIM_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import numpy as np, flame
    import flame.nn.functional as F
    import flame.codegen.split as sp
    import flame.codegen.kernel as kd
    from flame.codegen import cuda as cr
    from flame.runtime.cpu import CpuRunner
    from flame.ir.interp import run_graph
    sp.MIN_INNER, sp.ROW_BLOCKS, sp.COLUMN_THREADS, sp.AXIS_ROW = 16, 4, 32, 8   # split even tiny reductions
    F.LONG_GROUP = 16
    src, shapes, block, seed, setup = json.loads(sys.argv[1])
    exec(setup)
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    g = flame.compile(eval(src), *xs).graph
    feeds = {n.attrs["name"]: x for n, x in zip(g.inputs, xs)}
    r = CpuRunner(g, "cuda-sim", block)
    got, ref = r.run(feeds), run_graph(g, feeds)
    # each output against its own magnitude, or against 1% of the largest output's where it is
    # smaller (a loss summing terms of both signs can come out near zero on some inputs)
    scale = max(float(np.abs(b).max()) for b in ref)
    err = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-2 * scale, 1e-6)) for a, b in zip(got, ref))
    threads = [cr.launch_dims(d, block)[1] for d in r.schedule.descs.values()]
    exchanges = [cr.row_exchanges(d) for d in r.schedule.descs.values() if cr.block_per_row(d)]
    print(json.dumps({"err": err, "kernels": [k.name for k in r.kernels], "threads": threads,
                      "exchanges": exchanges}))
""")


@pytest.mark.parametrize("name", list(GRAPHS))
def test_fusion_class_runs_under_cuda_simulator(name, tmp_path):
    import json
    src, shapes, block, setup = GRAPHS[name] + (32, "")[len(GRAPHS[name]) - 2:]
    env = dict(os.environ, FLAME_CACHE_DIR=str(tmp_path), NUMBA_ENABLE_CUDASIM="1")
    arg = json.dumps([src, shapes, block, int(rng.integers(1 << 30)), setup])
    out = subprocess.run([sys.executable, "-c", SIM_SCRIPT, arg],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["err"] < 1e-4, res
    assert any(k.startswith(("E_", "R_")) for k in res["kernels"]), res
    if name == "group_norm_channel_rows":   # channel statistics, group statistics, normalisation
        assert len(res["kernels"]) == 3, res
    if name == "other_view_silu_after_group_norm":
        assert len(res["kernels"]) == 1, res
    if name == "long_rows_in_registers":    # group rows of 128 on one block of 64 threads
        assert 64 in res["threads"], res
    if name == "one_pass_moments":   # 512 = 64 threads x 8 elements: mean and deviations together
        assert res["exchanges"] == [1] and 128 in res["threads"], res


def _graph(src, shapes):
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return split_reductions(flame.compile(eval(src), *xs).graph)


def test_every_generated_kernel_compiles_to_ptx_without_float64(tmp_path, monkeypatch):
    from flame.codegen.ptx import compile_ptx, float64_instructions
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    count = 0
    for name, (src, shapes, *_) in GRAPHS.items():
        for k in fuse(_graph(src, shapes)):
            if k.kind == "L":
                continue
            ptx = compile_ptx(describe(k, 256), k.name, cc=(9, 0))
            assert ".entry" in ptx
            assert float64_instructions(ptx) == [], f"{name}: {k.name} has float64 math"
            count += 1
    assert count >= len(GRAPHS)


@pytest.mark.parametrize("src, shape, parts", [
    ("lambda x: F.group_norm(x, 32)", (2, 320, 64, 64), 2),
    ("lambda x: F.silu(F.group_norm(x, 32))", (1, 320, 64, 64), 4),
    ("lambda x: F.softmax(x, dim=-1)", (32, 40960), 4),                      # a max stage, then a sum
    ("flame.grad(lambda x: (F.group_norm(x, 32) * x).sum())", (2, 320, 32, 64), 2)])
def test_rows_on_a_cluster_of_blocks_compile_to_ptx_and_cubin(src, shape, parts, tmp_path, monkeypatch):
    """A long row on a thread block cluster: each block loads only its part, thread 0 posts
    the block's partial result, and after the cluster barrier every thread reads all of them
    from the blocks' shared memory (mapa + a generic load); the last barrier is split around
    the stores. No float64, and nvJitLink links it for sm_90."""
    pytest.importorskip("cuda.core")
    from flame.codegen import cuda as cr
    from flame.codegen.ptx import float64_instructions, kernel_cubin, kernel_ptx
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    s = flame.plan(eval(src), flame.spec(shape, "f32"), backend="cuda")
    clustered = [k for k in s.kernels if s.runs(k) and k.kind != "L" and cr.cluster_blocks(s.descs[k.root.id]) > 1]
    assert clustered
    for k in clustered:
        d = s.descs[k.root.id]
        assert d.row_parts == parts
        stages = cr.row_exchanges(d)
        src_k = s.source(k)
        ptx = kernel_ptx(k.name, src_k, [p[1].dtype for p in d.params])
        assert ptx.count("barrier.cluster.arrive.release;") == stages + 1
        assert ptx.count("barrier.cluster.wait.acquire;") == stages + 1
        assert ptx.count("mapa.u64") >= stages * parts and float64_instructions(ptx) == []
        entry, cubin = kernel_cubin(k.name, src_k, [p[1].dtype for p in d.params])
        assert cubin[:4] == b"\x7fELF"


def test_float64_check_catches_float64_math(tmp_path, monkeypatch):
    from flame.codegen.ptx import compile_ptx, float64_instructions
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    x = rng.standard_normal((4, 8)).astype(np.float32)
    g = flame.compile(lambda x: (x.cast("f64") * 2.5).exp().cast("f32"), x).graph
    (k,) = fuse(g)
    assert float64_instructions(compile_ptx(describe(k, 256), k.name)) != []


def test_library_kernels_compile_to_ptx(tmp_path, monkeypatch):
    """im2col, col2im and gather, the data-movement halves of conv and embedding."""
    from numba import cuda, types as nt
    from flame.codegen import library_cuda as lib
    from flame.codegen.cache import load
    from flame.ir import dtypes as dt
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    a = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}
    g = lib.conv_geometry((2, 4, 9, 9), (6, 2, 3, 3), a)
    for make, name in ((lib.im2col, "L_im2col_t"), (lib.col2im, "L_col2im_t")):
        src, grid, block = make(name, g, dt.f32)
        fn = load(name, src, "cuda", "sm_90")
        ptx = cuda.compile_ptx(fn.py_func, (nt.CPointer(nt.float32),) * 2, cc=(9, 0))[0]
        assert ".entry" in ptx and "mul.f64" not in ptx
    src, grid, block = lib.scatter_add("L_scatter_add_t", 6, 5, 3, dt.f32)
    fn = load("L_scatter_add_t", src, "cuda", "sm_90")
    sig = (nt.CPointer(nt.float32), nt.CPointer(nt.int64), nt.CPointer(nt.float32))
    assert ".entry" in cuda.compile_ptx(fn.py_func, sig, cc=(9, 0))[0]


def test_bf16_storage_on_cpu_backend_equals_interpreter():
    """bf16 buffers hold bits; kernels compute in float32 and round after every bf16 op,
    as the interpreter does, so the two agree exactly."""
    import ml_dtypes
    x = rng.standard_normal((6, 40)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((40, 24)).astype(ml_dtypes.bfloat16)

    def loss(x, w):
        h = F.silu(x @ w)
        return (F.layer_norm(h.cast("f32"), (24,)) * h.cast("f32")).sum()
    vg = flame.value_and_grad(loss, argnums=(0, 1))
    got = flame.compile(vg, x, w, backend="cpu")(x, w)
    ref = flame.compile(vg, x, w)(x, w)
    assert got[1][0].dtype == ml_dtypes.bfloat16
    for a, b in zip([got[0], *got[1]], [ref[0], *ref[1]]):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.allclose(a, b, rtol=1e-2, atol=1e-2 * np.abs(b).max()), (a, b)


def test_cubin_links_without_a_gpu_and_is_shared_by_same_code(tmp_path, monkeypatch):
    """nvJitLink turns the PTX into machine code here; two kernels that differ only in
    their name share one cached cubin."""
    pytest.importorskip("cuda.core")
    from flame.codegen.ptx import kernel_cubin
    from flame.ir import dtypes as dt
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    x = rng.standard_normal((4, 40)).astype(np.float32)
    g = split_reductions(flame.compile(lambda x: F.softmax(x, dim=-1), x).graph)
    (k,) = fuse(g)
    from flame.codegen.cuda import module_source
    src = module_source(describe(k, 32), k.name, 32)
    entry, cubin = kernel_cubin(k.name, src, [dt.f32, dt.f32], (9, 0))
    assert cubin[:4] == b"\x7fELF" and entry
    renamed = src.replace(f"def {k.name}(", "def other_name(")
    assert kernel_cubin("other_name", renamed, [dt.f32, dt.f32], (9, 0)) == (entry, cubin)
    assert len(list((tmp_path / "kernels" / "cubin").iterdir())) == 1


def test_bf16_compute_with_float32_master_weights():
    """Weights kept in float32 (the master copy the optimizer updates), cast to bf16 for the
    matmul: the gradient reaches the float32 master through the cast, on the CPU backend
    exactly as in the interpreter."""
    import flame.nn as nn
    w0 = rng.standard_normal((16, 8)).astype(np.float32)
    x, y = rng.standard_normal((32, 16)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    losses = {}
    for backend in ("interp", "cpu"):
        w = nn.Parameter(w0.copy())

        def step(x, y, w=w):
            def loss(x, y):
                pred = (x.cast("bf16") @ w.cast("bf16")).cast("f32")
                return ((pred - y) ** 2).mean()
            value, (g,) = flame.value_and_grad(loss, params=[w])(x, y)
            return value, {"param0": w - 0.05 * g}
        c = flame.compile(step, x, y, backend=backend, param_updates=True)
        losses[backend] = [float(c(x, y)) for _ in range(3)]
        assert w.data.dtype == np.float32
        losses[backend + "_w"] = w.data.copy()
    assert losses["cpu"][-1] < losses["cpu"][0]
    np.testing.assert_allclose(losses["cpu"], losses["interp"], rtol=1e-5)
    np.testing.assert_allclose(losses["cpu_w"], losses["interp_w"], rtol=1e-5, atol=1e-6)


def _kernel_source(fn, *shapes, block=256, prelude=False):
    from flame.codegen.schedule import make_schedule
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    sched = make_schedule(flame.compile(fn, *xs).graph, "cuda", block)
    return {k.name: sched.source(k, with_prelude=prelude) for k in sched.kernels if k.root.id in sched.descs}


@pytest.mark.parametrize("tiles", [1, 4])
@pytest.mark.parametrize("n", [1 << 20, (1 << 20) + 5])
def test_elementwise_loads_of_a_tile_come_before_its_stores(n, tiles, tmp_path, monkeypatch):
    """A store may alias a later load, so a load written after it stays after it: a thread
    stores a tile's outputs only once all their loads are issued. NVVM would sink each load
    to its use, after the previous output's sigmoid (rcp.rn, whose slow path is a branch
    ptxas hoists no load over): prelude's _loads_issued keeps them all before the arithmetic.
    With several tiles a block, the next tile's loads are issued before this tile's
    arithmetic and stores too. A partial last tile keeps its guarded load and store per
    output, after the whole ones."""
    from flame.codegen import cuda as cr
    from flame.codegen.ptx import kernel_ptx
    from flame.ir import dtypes as dt
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cr, "ELEMENTWISE_TILES", tiles)
    ((name, src),) = _kernel_source(lambda x: ((x * 1.5 + 1.0).tanh() * 0.5 + x).sigmoid() * x - 0.25, (n,),
                                    prelude=True).items()
    ptx = kernel_ptx(name, src, [dt.f32, dt.f32])
    ops = re.findall(r"(ld|st)\.global|(rcp)\.rn", ptx[ptx.index(".entry"):])   # in program order
    ops = [a or b for a, b in ops]
    # this tile's 4 loads (and, in the loop over tiles, the next tile's 4), its 4 sigmoids'
    # reciprocals, then its 4 stores
    head = ["ld"] * (4 if tiles == 1 else 8) + ["rcp"] * 4 + ["st"] * 4
    assert ops[:len(head)] == head, ops
    # the partial tile's, output by output (the compiler may drop those never in bounds)
    triples = len(ops[len(head):]) // 3
    assert ops[len(head):] == ["ld", "rcp", "st"] * triples and (0 < triples <= 4 if n % 1024 else triples == 0), ops


def test_kernels_index_by_their_flat_loop_index_and_divide_unsigned():
    """A buffer shaped like the iteration space, or reshaped from one, is read at the loop's
    own flat index (no unravel and re-linearise); the coordinates that remain split with
    unsigned 32-bit _div/_mod, not Python's signed 64-bit floor division."""
    src = _kernel_source(lambda x, m: x.reshape(2, 4, 30) - m, (8, 30), (2, 1, 30))
    (s,) = src.values()
    assert re.search(r"= p\d\[o\]", s), s             # x through the reshape: the flat index
    assert "_div(o, 120)" in s and "//" not in s.replace("cuda.threadIdx.x", ""), s
    # rows: a row's element at o * n_inner + r, never through the coordinates
    (s,) = _kernel_source(lambda x: F.softmax(x.reshape(6, 50), dim=-1), (3, 100)).values()
    assert "o * 50 + r" in s and " _div(" not in s and "rc_" in s, s   # and held in registers


def test_independent_reductions_of_a_row_share_one_pass_and_one_barrier():
    """softmax's backward sum and the loss's partial sum read only the forward's max and sum:
    one loop over the row and one barrier for both (3 barriers, not 4). layer_norm's
    backward: its three sums share the pass after the moments (the term of the variance's
    gradient through the mean being zero, passes.zero_centred_sums), and the mean and the
    squared deviations share one exchange (Chan's formula): 2 barriers for 5 sums."""
    w = rng.standard_normal((64, 4096)).astype(np.float32)
    src = _kernel_source(flame.value_and_grad(lambda x: (F.softmax(x, dim=-1) * flame.const(w)).sum()), (64, 4096))
    (row,) = [s for s in src.values() if "math.exp" in s]
    assert row.count("cuda.syncthreads()") == 3 and row.count("for j in range(16):") == 4, row
    w = rng.standard_normal((1024, 768)).astype(np.float32)
    src = _kernel_source(flame.value_and_grad(lambda x: (F.layer_norm(x, (768,)) * flame.const(w)).sum()), (1024, 768))
    (row,) = [s for s in src.values() if "rsqrt" in s or "sqrt" in s]
    assert len(set(re.findall(r"(red\d+) = acc", row))) == 5 and row.count("cuda.syncthreads()") == 2, row


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_rows_later_loads_are_issued_in_its_first_pass(prefetch, monkeypatch):
    """softmax's backward reads the upstream gradient only after the max and the sum: with
    prefetching its loads go into the first pass with x's, all in flight together."""
    from flame.codegen import kernel as kd
    monkeypatch.setattr(kd, "ROW_PREFETCH", prefetch)
    w = rng.standard_normal((64, 4096)).astype(np.float32)
    src = _kernel_source(flame.value_and_grad(lambda x: (F.softmax(x, dim=-1) * flame.const(w)).sum()), (64, 4096))
    (row,) = [s for s in src.values() if "math.exp" in s]
    first_pass = row.split("cuda.syncthreads()")[0]
    cached = set(re.findall(r"(rc_p\d+)\[j\] = ", row))
    assert len(cached) == 2, row
    assert {c for c in cached if f"{c}[j] = " in first_pass} == (cached if prefetch else cached - {max(cached)}), row


def test_row_elements_read_through_a_reshape_are_prefetched_too():
    """group_norm's backward reads the upstream gradient in the grouped view, through a
    reshape: its prefetched load is made at the thread's own element in the first pass."""
    fn = flame.value_and_grad(lambda x, w: (F.group_norm(x, 8) * w.tanh()).sum(), argnums=(0, 1))
    src = _kernel_source(fn, (2, 32, 16, 16), (2, 32, 16, 16))
    (row,) = [s for s in src.values() if "sqrt" in s]
    cached = set(re.findall(r"(rc_p\d+)\[j\] = ", row))
    first_pass = row.split("cuda.syncthreads()")[0]
    assert len(cached) == 2 and all(f"{c}[j] = " in first_pass for c in cached), row


def test_split_flat_falls_back_to_signed_division_past_2_31():
    from flame.codegen.kernel import split_flat
    assert split_flat("i", (4, 6)) == ["_div(i, 6)", "_mod(i, 6)"]
    assert split_flat("i", (1 << 20, 1 << 12)) == ["(i // 4096)", "(i % 4096)"]


@pytest.mark.parametrize("n,block,threads,rows_per_block", [
    (768, 256, 128, 2), (4096, 256, 256, 1), (77, 256, 16, 16), (5, 256, 1, 256), (20000, 1024, 1024, 1)])
def test_rows_get_threads_by_their_length(n, block, threads, rows_per_block):
    from flame.codegen import cuda as cr
    from flame.codegen.schedule import make_schedule
    x = rng.standard_normal((3, n)).astype(np.float32)
    sched = make_schedule(flame.compile(lambda x: F.softmax(x, dim=-1), x).graph, "cuda", block)
    (d,) = sched.descs.values()
    assert (d.row_threads, cr.rows_per_block(d, block)) == (threads, rows_per_block)
    grid, blk = cr.launch_dims(d, block)
    assert blk == threads * rows_per_block and grid * rows_per_block >= 3


def test_cubins_compile_in_parallel_workers_once(tmp_path, monkeypatch):
    """CudaRunner lists its kernels first and compiles the missing ones in worker processes;
    a second runner over the same graph finds every cubin cached."""
    pytest.importorskip("cuda.core")
    from flame.codegen import ptx
    from flame.runtime.cuda import CudaRunner
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    calls = []
    real = ptx.compile_cubins
    monkeypatch.setattr("flame.runtime.cuda.compile_cubins", lambda jobs: calls.append(real(jobs, workers=2)))
    x = rng.standard_normal((4, 40)).astype(np.float32)
    g = flame.compile(flame.value_and_grad(lambda x: (F.layer_norm(x, (40,)) * x.exp()).sum()), x).graph
    r = CudaRunner(g, compile_only=(9, 0))
    assert calls[0] >= 2 and len(list((tmp_path / "kernels" / "cubin").iterdir())) == calls[0]
    assert set(r.sources) == {k.name for k in r.kernels if k.root.id in r.descs}
    CudaRunner(g, compile_only=(9, 0))
    assert calls[1] == 0


def test_a_machine_without_a_gpu_compiles_cluster_kernels(tmp_path, monkeypatch):
    """compile_only prepares the cache for a GPU machine, also for kernels launched as thread
    block clusters (whose launch configuration would ask the driver)."""
    pytest.importorskip("cuda.core")
    from flame.codegen import cuda as cr
    from flame.runtime.cuda import CudaRunner
    monkeypatch.setenv("FLAME_CACHE_DIR", str(tmp_path))
    g = flame.compile(lambda x: F.group_norm(x, 32), np.zeros((2, 320, 64, 64), np.float32)).graph
    r = CudaRunner(g, compile_only=(9, 0))
    assert [cr.cluster_blocks(d) for d in r.descs.values()] == [2] and r.sources
    assert len(list((tmp_path / "kernels" / "cubin").iterdir())) == 1


@pytest.mark.parametrize("src, merged", [
    ("lambda x: F.layer_norm(x, (512,))", True),
    ("lambda x: ((x - x.mean(-1, keepdims=True)) ** 2).mean(-1)", True),
    # deviations from half the mean, from another row's mean, of another value: two exchanges
    ("lambda x: ((x - x.sum(-1, keepdims=True) * 0.5 / 512) ** 2).sum(-1)", False),
    ("lambda x: ((x[:5] - x[1:].mean(-1, keepdims=True)) ** 2).sum(-1)", False),
    ("lambda x: ((x * 2.0 - x.mean(-1, keepdims=True)) ** 2).sum(-1)", False),
    # rows of 500 on 64 threads: some threads hold fewer elements, so two exchanges
    ("lambda x: F.layer_norm(x[:, :500], (500,))", False)])
def test_only_deviations_from_a_rows_own_mean_meet_with_it(src, merged, monkeypatch):
    """One exchange for a row's sum and the squared deviations from its mean only where that is
    what the graph computes, every thread holding as many elements (Chan's formula with
    constant counts); the others keep a pass each."""
    from flame.codegen import cuda as cr
    from flame.codegen.schedule import make_schedule
    x = rng.standard_normal((6, 512)).astype(np.float32)
    s = make_schedule(flame.compile(eval(src), x).graph, "cuda", 256)
    rows = [s.descs[k.root.id] for k in s.kernels if k.root.id in s.descs and cr.block_per_row(s.descs[k.root.id])]
    two_stage = [d for d in rows if sum(isinstance(st, list) for st in row_steps(d)) == 2]
    assert len(two_stage) == 1, [d.kernel.name for d in rows]
    assert cr.row_exchanges(two_stage[0]) == (1 if merged else 2)
    monkeypatch.setattr(cr, "ONE_PASS_MOMENTS", False)   # the switch gpu_bench --only long_rows turns
    assert cr.row_exchanges(two_stage[0]) == 2


def test_deviations_from_a_mean_broadcast_along_rows_are_not_a_rows_own():
    """x[i, j] - mean[j] (a mean without its kept axis, broadcast along the row) is not a
    deviation from row i's mean, though the nodes have the same ops."""
    from flame.codegen.kernel import squared_deviations
    x = rng.standard_normal((6, 6)).astype(np.float32)
    for keep, own in ((True, True), (False, False)):
        g = flame.compile(lambda x: ((x - x.mean(-1, keepdims=keep)) ** 2).sum(-1), x).graph
        s, q = [n for n in g.nodes if n.op == "sum"]
        assert squared_deviations(q, s) is own
