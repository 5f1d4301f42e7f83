"""Fusion, memory planning and generated source of the CPU backend: how many kernels a graph
becomes, which named rule fused or refused what, that switching a rule off changes the
schedule but not the numbers, that the arena never lets two live buffers overlap, and that
generated kernels live in content-hashed files with every float constant typed."""
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import flame
import flame.nn.functional as F
from flame.codegen import cache, fusion
from flame.ir import tree
from flame.runtime import arena


@pytest.fixture(autouse=True, scope="module")
def cache_dir(tmp_path_factory):
    """A fresh kernel cache for this module, not ~/.cache: generated files land in a temporary
    directory, and no kernel module loaded by another test file is reused."""
    with pytest.MonkeyPatch.context() as mp:
        path = str(tmp_path_factory.mktemp("flame_cache"))
        mp.setenv("FLAME_CACHE_DIR", path)
        mp.setattr(cache, "_loaded", {})
        yield path


rng = np.random.default_rng(20261124)
X = rng.standard_normal((4, 6, 8)).astype(np.float32)
B8 = rng.standard_normal(8).astype(np.float32)
X4 = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
G4 = rng.standard_normal(4).astype(np.float32)


def compiled(fn, *args, run=True):
    """Compile for the CPU, and (unless run=False) check it against the interpreter."""
    c = flame.compile(fn, *args, backend="cpu")
    assert c.runner.plan.peak <= c.runner.plan.naive
    if run:
        got, want = c(*args), flame.compile(fn, *args, backend="interp")(*args)
        for g, w in zip(tree.flatten(got)[0], tree.flatten(want)[0]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    return c


def rules_used(k):
    return {rule for _, rule in k.fused}


# ---------------------------------------------------------------- kernel counts


def ten_ops(x, b):
    y = x + b          # b [8] broadcasts over x [4,6,8]
    y = y * 1.5
    y = y.tanh()
    y = y - x
    y = y.exp()
    y = y.sigmoid()
    y = y * x
    y = y.maximum(b)
    y = y.sin()
    return -y


def test_elementwise_chain_is_one_kernel():
    (k,) = compiled(ten_ops, X, B8).runner.kernels
    assert k.kind == "E" and k.name.startswith("E_add_mul_tanh")
    assert len(k.fused) == 9 and rules_used(k) == {"elementwise_chain"}
    assert [n.op for n in k.reads()] == ["input", "input"]   # x and b: nothing else in memory


ROW_KERNELS = {
    "softmax": (lambda x: F.softmax(x, dim=-1), X),
    "log_softmax": (lambda x: F.log_softmax(x, dim=1), X),
    "layer_norm": (lambda x: F.layer_norm(x, (8,), flame.const(B8), flame.const(B8 * 2)), X),
    "group_norm": (lambda x: F.group_norm(x, 2), X4),
}


@pytest.mark.parametrize("name", list(ROW_KERNELS))
def test_row_reductions_forward_are_one_kernel(name):
    fn, x = ROW_KERNELS[name]
    (k,) = compiled(fn, x).runner.kernels
    assert k.kind == "R" and "row_reduction" in rules_used(k)


def test_group_norm_with_affine_forward_is_one_kernel():
    c = compiled(lambda x, g, b: F.group_norm(x, 2, g, b), X4, G4, G4, run=False)
    assert len(c.runner.kernels) == 1


G8 = rng.standard_normal((4, 6, 8)).astype(np.float32)
GX4 = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
ROW_TRAINING = {   # loss, its arguments, the rows' space and reduced axes
    "softmax": (lambda x, g: (F.softmax(x, dim=-1) * g).sum(), (X, G8), (4, 6, 8), (2,)),
    "layer_norm": (lambda x, w, b, g: (F.layer_norm(x, (8,), w, b) * g).sum(),
                   (X, B8, B8 * 0.5, G8), (4, 6, 8), (2,)),
    "group_norm": (lambda x, w, b, g: (F.group_norm(x, 2, w, b) * g).sum(),
                   (X4, G4, G4 * 0.5, GX4), (2, 2, 2, 15), (2, 3)),
}


@pytest.mark.parametrize("name", list(ROW_TRAINING))
def test_row_reductions_backward_are_one_kernel(name):
    """multi_output: the backward's reductions over the rows and the input gradient they feed
    run as one kernel (before, each value the backward shared ended a kernel: 8-15 launches)."""
    fn, args, space, axes = ROW_TRAINING[name]
    c = compiled(flame.value_and_grad(fn, argnums=tuple(range(len(args)))), *args)
    ks = c.runner.kernels
    gx = c.runner.graph.outputs[1]

    def row_reductions(backward):
        return [n for n in c.runner.graph.nodes if n.op in fusion.REDUCE_OPS and (n.rule is not None) == backward
                and n.inputs[0].shape == space and n.attrs["axes"] == axes]
    for backward in (False, True):
        reds = row_reductions(backward)
        assert reds
        # in row kernels over those rows (a backward sum that reads only forward values may
        # run in the forward's kernel, which recomputes what it needs)
        holders = {id(k): k for k in ks for n in reds if n in k.nodes}.values()
        assert all(k.kind == "R" and (k.full, k.raxes) == (space, axes) for k in holders)
        if backward:
            assert any(gx in k.out_nodes() and "multi_output" in rules_used(k) for k in holders)
    rows = [k for k in ks if (k.full, k.raxes) == (space, axes)]
    assert len(rows) <= 2, [k.name for k in rows]   # the forward's and the backward's (or one)


def test_multi_output_kernel_stores_every_value_used_outside_it():
    """exp(x - max) is read by a later kernel and is a graph output: the softmax kernel
    computes it inline and also writes it; switching the rule off gives more kernels, the
    same numbers."""
    def fn(x):
        e = (x - x.max(-1, keepdim=True)).exp()
        y = e / e.sum(-1, keepdim=True)
        return y, e, (y * e).sum((0, 1))
    on = compiled(fn, X).runner
    (row,) = [k for k in on.kernels if k.raxes == (2,)]
    assert len(row.out_nodes()) == 2 and all(n in row.nodes for n in row.out_nodes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fusion.RULES, "multi_output", False)
        off = compiled(fn, X).runner
    assert len(off.kernels) > len(on.kernels)
    assert all(not k.extra for k in off.kernels)


# ---------------------------------------------------------------- recompute, siblings, split rows


def test_a_cheap_value_read_by_two_kernels_is_recomputed_in_each_not_stored():
    """h is read by sums over two different rows: each kernel computes h itself."""
    def fn(x, b):
        h = (x * 2.0 + b).tanh()
        return h.sum(0), h.sum(2)
    ks = compiled(fn, X, B8).runner.kernels
    h = [n for n in ks[0].nodes if n.op == "tanh"]
    assert len(ks) == 2 and h
    assert all((h[0], "recompute") in k.fused for k in ks)
    assert not any(h[0] in k.out_nodes() for k in ks)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fusion.RULES, "recompute", False)
        off = compiled(fn, X, B8).runner.kernels
    assert any(h2.op == "tanh" for k in off for h2 in k.out_nodes())   # h is stored and read back
    assert any("recompute is off" in why for k in off for _, why in k.refused)


def test_recompute_refuses_a_value_that_would_load_three_tensors_in_each_reader():
    big = [rng.standard_normal((64, 96)).astype(np.float32) for _ in range(3)]

    def fn(x, y, z):
        h = x * y + z
        return h.sum(0), h.sum(1)
    ks = compiled(fn, *big).runner.kernels
    assert any(n.op == "add" for k in ks for n in k.out_nodes())   # h is stored once
    assert not any(rule == "recompute" for k in ks for _, rule in k.fused)
    assert any("readers would load 3 tensors" in why for k in ks for _, why in k.refused)


def test_a_reduction_read_by_recomputed_values_is_always_stored():
    """A recomputed value's reduction input must stay in memory: not swallowed as the store
    of a reshape's kernel (first case), not dropped from a joined kernel's stores while a
    third kernel that recomputes its reader loads it (second: column statistics)."""
    w = np.ones((1, 4), np.float32)
    x16 = rng.standard_normal((8, 16)).astype(np.float32)

    def reshape_read_by_matmul(x, w):
        r = x.sum(1).reshape(8, 1)
        return (r * x).sum(0), r @ w

    def column_statistics(x):
        d = x - x.mean(0)
        return (d * d).sum(0), (d * d).sum(2)
    compiled(reshape_read_by_matmul, x16, w)
    ks = compiled(column_statistics, rng.standard_normal((16, 6, 8)).astype(np.float32)).runner.kernels
    assert any(rule == "recompute" for k in ks for _, rule in k.fused)


def test_independent_sums_over_the_same_rows_share_one_kernel():
    """siblings: sum(x) and sum(x*x) over the same rows read x once, in one kernel."""
    (k,) = compiled(lambda x: (x.sum(2), (x * x).sum(2)), X).runner.kernels
    assert len(k.out_nodes()) == 2 and "multi_output" in rules_used(k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fusion.RULES, "multi_output", False)
        assert len(compiled(lambda x: (x.sum(2), (x * x).sum(2)), X).runner.kernels) == 2


def _gn_reference(x, groups, w, b, eps=1e-5):
    x64 = x.astype(np.float64).reshape(x.shape[0], groups, -1)
    y = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + eps)
    return y.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


# a short group; one a GPU block holds in registers (32768); a longer one (channel rows first)
@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (1, 4, 128, 128), (1, 4, 256, 128)])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_group_norm_keeps_its_precision_with_a_large_mean_and_a_spike(shape, dtype):
    """Statistics are centred, never E[x²] - E[x]² (mean 300 times the spread, a 100-sigma
    spike at a group's first element), and taken in float32 for bf16 activations."""
    x = (rng.standard_normal(shape) * 0.5 + 150.0).astype(np.float32)
    x[0, 0, 0, 0] += 50.0
    w, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    if dtype == "bf16":
        x = (rng.standard_normal(shape)).astype(np.float32)
        x[0, 0, 0, 0] = 40.0
        fn = lambda x, w, b: F.group_norm(x.cast("bf16"), 2, w, b).cast("f32")   # noqa: E731
        tol = 0.08   # bf16 storage of the output: 8 bits of mantissa
    else:
        fn, tol = (lambda x, w, b: F.group_norm(x, 2, w, b)), 2e-3
    got = compiled(fn, x, w, b, run=False)(x, w, b)   # against float64, not the float32 interpreter
    ref = _gn_reference(x, 2, w, b)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_group_norm_at_sd_size_is_one_row_kernel_holding_each_group_in_registers():
    """SD 1.5's group_norm at 64x64 latents (groups of 10 x 4096): one block of 1024 threads
    per group keeps its 40960 elements in registers (40 a thread): mean, centred variance
    and the normalisation in one launch reading x once."""
    x = flame.spec((2, 320, 64, 64), "f32")
    s = flame.plan(lambda x: F.group_norm(x, 32), x, backend="cuda")
    runs = [k for k in s.kernels if s.runs(k)]
    assert len(runs) == 1, [k.name for k in runs]
    d = s.descs[runs[0].root.id]
    assert (d.n_outer, d.n_inner, d.row_threads, d.cache_slots) == (64, 40960, 1024, 20)
    assert "# launch_bounds=1024" in s.source(runs[0], False)
    # 64 groups on 132 SMs: a cluster of two blocks a group, each loading and storing half
    from flame.codegen import cuda as cr
    assert d.row_parts == 2 and cr.launch_dims(d, 256) == (128, 1024) and cr.cluster_blocks(d) == 2
    src = s.source(runs[0], False)
    assert "r = lane + (part * 20 + j) * 1024" in src and "cuda.local.array(20," in src
    # the mean and the squared deviations from it meet in one exchange (Chan's formula)
    assert src.count("cluster_sync()") == 1 and src.rstrip().endswith("cluster_wait()")


@pytest.mark.parametrize("parts", [4, 1])
def test_a_row_on_a_cluster_of_blocks_is_written_in_place(parts, monkeypatch):
    """group_norm of a conv's output, which nothing else reads: y may overwrite it, with one
    block a group or a cluster of two, where each block reads only the half it writes."""
    from flame.codegen import kernel as kd
    monkeypatch.setattr(kd, "LONG_ROW_PARTS", parts)
    s = flame.plan(lambda x, w: F.group_norm(F.conv2d(x, w, padding=1), 32), flame.spec((2, 320, 64, 64)),
                   flame.spec((320, 320, 3, 3)), backend="cuda")
    (k,) = [k for k in s.kernels if s.runs(k) and k.kind == "R"]
    assert s.descs[k.root.id].row_parts == min(parts, 2)
    assert k.root.id in s.plan.in_place


def test_long_rows_take_one_block_each_without_clusters():
    """The simulator (blocks one at a time) and GPUs before sm_90 have no clusters."""
    from flame.codegen.schedule import make_schedule
    g = flame.trace(lambda x: F.group_norm(x, 32), flame.spec((2, 320, 64, 64), "f32"))
    for target, clusters in (("cuda-sim", True), ("cuda", False)):
        s = make_schedule(g, target, clusters=clusters)
        (k,) = [k for k in s.kernels if s.runs(k)]
        assert s.descs[k.root.id].row_parts == 1 and "cluster" not in s.source(k)


def test_group_norm_backward_and_its_loss_are_one_row_kernel():
    """sum(group_norm(x) * w) and its x-gradient: the loss sum splits along the group rows
    (not the tensor's own [N, C, H, W] axes), so statistics, loss partial sums, the backward's
    two sums and the gradient are one kernel over the groups, plus the 64-value final sum."""
    x = flame.spec((2, 320, 64, 64), "f32")
    w = rng.standard_normal((2, 320, 64, 64)).astype(np.float32)
    s = flame.plan(flame.value_and_grad(lambda x: (F.group_norm(x, 32) * flame.const(w)).sum()), x, backend="cuda")
    runs = [k for k in s.kernels if s.runs(k)]
    assert len(runs) == 2, [k.name for k in runs]
    assert (runs[0].full, runs[0].raxes) == ((2, 32, 10, 4096), (2, 3))
    assert [n.size for n in runs[0].out_nodes()] == [2 * 320 * 64 * 64, 64]   # the gradient, the partial sums
    assert s.descs[runs[0].root.id].row_parts == 2


def test_silu_after_group_norm_joins_its_row_kernel_in_another_view():
    """group_norm's rows are [N, G, C/G * H * W]; the silu after it runs over [N, C, H, W]:
    the same elements in another view, computed at the row kernel's own element (one kernel
    forward; with the backward, one row kernel plus the final sums of the loss and of w, b)."""
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    w, b = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    c = compiled(lambda x, w, b: F.silu(F.group_norm(x, 32, w, b)), x, w, b)
    assert [k.kind for k in c.runner.kernels] == ["R"], [k.name for k in c.runner.kernels]
    vg = flame.value_and_grad(lambda x, w, b: (F.silu(F.group_norm(x, 32, w, b)) * x).sum(), argnums=(0, 1, 2))
    compiled(vg, x, w, b)
    s = flame.plan(vg, x, w, b, backend="cuda")   # the loss split along the group rows too
    assert len([k for k in s.kernels if s.runs(k)]) == 3, [k.name for k in s.kernels]


def _softmax_seen_in_two_views(x):
    y = F.softmax(x, -1)
    return (y.reshape(8, 4) * 3.0).reshape(4, 8) + x.max(-1, keepdim=True)


def _silu_kept_and_summed_in_rows_of_one(x, w):
    a = F.silu(x.reshape(2, 3)) * w
    return a, a.reshape(6, 1).sum(-1)


# values in another view of a row kernel's elements (a review found the first four failing to
# compile or giving wrong numbers): views apart only by size-1 axes, rows over a middle axis,
# rows of one element, a per-row value broadcast in another view, and views there and back
OTHER_VIEWS = {
    "unit_axes_group_norm": (lambda x: F.silu(F.group_norm(x, 1)), [(3, 6, 1, 4)]),
    "unit_axes_softmax": (lambda x: F.silu(F.softmax(x, -1).reshape(2, 4, 1, 5)), [(2, 4, 5)]),
    "middle_axis_rows": (lambda x: F.softmax(x, dim=1).reshape(4, 6) * 2.0, [(2, 3, 4)]),
    "leading_axis_rows": (lambda x: F.softmax(x, 0).reshape(12, 2) + 1.0, [(3, 4, 2)]),
    "rows_of_one_element": (_silu_kept_and_summed_in_rows_of_one, [(6,), (3,)]),
    "row_sum_broadcast_in_another_view": (lambda x: x.reshape(8, 4) + x.sum(-1), [(4, 8)]),
    "there_and_back": (_softmax_seen_in_two_views, [(4, 8)]),
    "unit_axes_and_a_bias": (lambda x, b: F.softmax(x, -1).reshape(3, 4) + b, [(2, 1, 6), (4,)]),
    "prologue_in_another_view": (lambda x: F.softmax(F.silu(x).reshape(4, 8), -1), [(8, 4)]),
}


@pytest.mark.parametrize("name", list(OTHER_VIEWS))
def test_values_in_another_view_of_a_row_kernel_equal_the_interpreter(name):
    fn, shapes = OTHER_VIEWS[name]
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    compiled(fn, *xs)

    def loss(*a):
        out = fn(*a)
        return sum((t * t).sum() for t in (out if isinstance(out, tuple) else (out,)))
    compiled(flame.value_and_grad(loss, argnums=tuple(range(len(xs)))), *xs)


def test_a_per_row_value_broadcast_in_another_view_stays_out_of_the_row_kernel():
    """x.reshape(8, 4) + x.sum(-1): element (i, j) reads the sum of row j of x, not of its own
    row, so the add cannot run at the row kernel's own element."""
    x = rng.standard_normal((4, 8)).astype(np.float32)
    c = compiled(lambda x: x.reshape(8, 4) + x.sum(-1), x)
    assert len(c.runner.kernels) == 2, [k.name for k in c.runner.kernels]


def test_losses_through_scalar_ops_of_a_kept_group_norm_output_equal_the_interpreter():
    """(y ** 2).mean() and (y * 2.0).sum() with y = group_norm(x) also returned: the loss is
    split along the group rows through reshapes of y (a review found these failing to compile
    when the kernel joins checked only y's renamed buffer, not what reads it)."""
    x = rng.standard_normal((1, 64, 32, 16)).astype(np.float32)
    compiled(flame.value_and_grad(lambda x: (F.group_norm(x, 32) ** 2).mean()), x)
    x = rng.standard_normal((2, 64, 32, 32)).astype(np.float32)

    def f(x):
        y = F.group_norm(x, 32)
        return (y * 2.0).sum() * 1e-3, y
    compiled(f, x)


def test_joins_forget_the_kernels_they_replace(monkeypatch):
    """A join where the consumer computes again (rule recompute) a value the producer read
    from a third kernel: the joined kernels must leave that kernel's readers too, or a later
    sibling join looks up a dead kernel (a KeyError in about half of the compiles, as Python
    reused or not the dead kernel's id)."""
    import flame.codegen.split as sp
    monkeypatch.setattr(sp, "MIN_INNER", 16)
    monkeypatch.setattr(sp, "AXIS_ROW", 8)
    monkeypatch.setattr(sp, "LONG_ROW", 128)
    monkeypatch.setattr(sp, "LONG_ROW_MIN_ROWS", 1)

    def f(x, w, g, b):
        h = x * g.reshape(1, 6, 1, 1) + b.reshape(1, 6, 1, 1)
        h = F.gelu(F.gelu(h * w.permute(0, 1, 3, 2).reshape(3, 6, 3, 2)))
        return h.amax((2, 3)).sum() + h.sum()
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(3, 6, 3, 2), (3, 6, 3, 2), (6,), (6,)]]
    for _ in range(6):
        compiled(flame.value_and_grad(f, argnums=(0, 1, 2, 3)), *xs)


def test_group_norm_of_longer_groups_is_three_launches_reading_x_twice():
    """Groups longer than a block holds (30 x 4096 in SD 1.5's decoder): each channel's mean
    and centred sum of squares (one row kernel), the group's (one kernel), the normalisation;
    x - row mean is recomputed, never stored."""
    x = flame.spec((2, 960, 64, 64), "f32")
    s = flame.plan(lambda x: F.group_norm(x, 32), x, backend="cuda")
    runs = [k for k in s.kernels if s.runs(k)]
    assert len(runs) == 3, [k.name for k in runs]
    big = [n for k in runs for n in k.out_nodes() if n.size == 2 * 960 * 64 * 64]
    assert len(big) == 1                                 # only y is written at full size
    assert sum(1 for k in runs for r in k.reads() if r.op == "input") == 2
    assert sum(1 for k in runs if any(rule == "recompute" for _, rule in k.fused)) == 2


def test_a_loss_sum_splits_along_its_producers_rows_and_joins_their_kernel():
    """sum(softmax(x) * w): the whole-tensor sum is split over x's own rows, so its partial
    sums join the softmax's forward and backward row kernel: reading x and w and writing the
    gradient, plus one short final sum."""
    x = flame.spec((1024, 1024), "f32")
    w = rng.standard_normal((1024, 1024)).astype(np.float32)
    s = flame.plan(flame.value_and_grad(lambda x: (F.softmax(x, dim=-1) * flame.const(w)).sum()), x, backend="cuda")
    runs = [k for k in s.kernels if s.runs(k)]
    assert [k.kind for k in runs] == ["R", "R"], [k.name for k in runs]
    row, final = runs
    assert (row.full, row.raxes) == ((1024, 1024), (1,)) and len(row.out_nodes()) == 2
    assert final.full == (1024,)


def test_split_loss_sum_on_the_cpu_equals_the_interpreter():
    x, w = rng.standard_normal((2, 256, 160)).astype(np.float32), rng.standard_normal((2, 256, 160)).astype(np.float32)
    c = compiled(flame.value_and_grad(lambda x, w: (F.softmax(x, dim=-1) * w).sum(), argnums=(0, 1)), x, w)
    assert any(n.op == "sum" and n.attrs["axes"] == (2,) and not n.attrs["keepdims"] for n in c.runner.graph.nodes)


def test_loss_sum_split_along_group_rows_on_the_cpu_equals_the_interpreter(monkeypatch):
    """The loss over a group_norm's [N, C, H, W] output splits along the [N, G, C/G * H * W]
    group rows: x * w is computed again in the grouped view, not reshaped into it. (On the CPU
    only rows that fill ROW_BLOCKS stay whole; lowered here so the CPU takes the same split.)"""
    import flame.codegen.split as sp
    monkeypatch.setattr(sp, "ROW_BLOCKS", 64)
    x, w = rng.standard_normal((2, 64, 32, 32)).astype(np.float32), rng.standard_normal((2, 64, 32, 32)).astype(np.float32)
    c = compiled(flame.value_and_grad(lambda x, w: (F.group_norm(x, 32) * w).sum(), argnums=(0, 1)), x, w)
    sums = [n for n in c.runner.graph.nodes if n.op == "sum" and not n.attrs["keepdims"]]
    final = [n for n in sums if n.inputs[0].shape == (2, 32) and n.attrs["axes"] == (0, 1)]
    assert len(final) == 1, [(n.inputs[0].op, n.inputs[0].shape, n.attrs) for n in sums]
    part = final[0].inputs[0]
    assert part.inputs[0].op == "mul" and part.inputs[0].shape == (2, 32, 2, 1024)


def test_reduce_prologue_sum_of_squares_is_one_kernel():
    (k,) = compiled(lambda x: (x * x).sum(), X).runner.kernels
    assert k.kind == "R" and rules_used(k) == {"reduce_prologue"}


def test_movement_folds_into_index_arithmetic():
    def fn(x, b):
        y = x.permute(2, 0, 1)[:, ::2, 1:].reshape(8, 10)          # [8,3,5] -> [8,10]
        return y * 2.0 + b.reshape(8, 1).expand(8, 10)
    (k,) = compiled(fn, X, B8).runner.kernels
    assert k.kind == "E"
    folded = {n.op for n, rule in k.fused if rule == "movement_fold"}
    assert folded == {"permute", "slice", "reshape", "expand"}


def test_matmul_is_a_library_call_and_its_bias_add_a_separate_kernel():
    x = rng.standard_normal((6, 8)).astype(np.float32)
    w = rng.standard_normal((5, 8)).astype(np.float32)
    ks = compiled(lambda x, w, b: F.linear(x, w, b), x, w, B8[:5].copy()).runner.kernels
    assert [k.kind for k in ks] == ["L", "E"]
    mm, add = ks
    assert mm.name == "L_matmul" and add.name == "E_add"
    (why,) = [why for n, why in add.refused if n is mm.root]
    assert "library call" in why and "epilogue" in why


# ---------------------------------------------------------------- switching rules off


def mixed(x, b):
    """Uses every built rule: movement into row reductions, sum(x*x), an elementwise chain."""
    h = F.layer_norm(x.permute(0, 2, 1) * 2.0 + 1.0, (6,))
    return F.softmax(h.tanh() + b.reshape(8, 1), dim=-1), (x * x).sum(), (x.exp() * 2.0 + b).sin()


@pytest.mark.parametrize("rule", ["elementwise_chain", "reduce_prologue", "row_reduction",
                                  "movement_fold"])   # multi_output: its own test above
def test_switching_a_rule_off_changes_the_schedule_not_the_result(rule, monkeypatch):
    # multi_output off in both: it would join some of what the rule leaves apart
    monkeypatch.setitem(fusion.RULES, "multi_output", False)
    on = compiled(mixed, X, B8).runner.kernels
    assert any(r == rule for k in on for _, r in k.fused)
    monkeypatch.setitem(fusion.RULES, rule, False)
    off = compiled(mixed, X, B8).runner.kernels    # still equal to the interpreter
    assert len(off) > len(on)
    assert not any(r == rule for k in off for _, r in k.fused)
    assert any(rule in why for k in off for _, why in k.refused)


def test_gemm_epilogue_refusal_follows_its_flag(monkeypatch):
    x = rng.standard_normal((6, 8)).astype(np.float32)
    monkeypatch.setitem(fusion.RULES, "gemm_epilogue", False)
    ks = compiled(lambda x, w: (x @ w).tanh(), x, x.T.copy(), run=False).runner.kernels
    assert [k.kind for k in ks] == ["L", "E"]
    assert not any("epilogue" in why for k in ks for _, why in k.refused)


# ---------------------------------------------------------------- the arena


def buffer_uses(runner):
    """Derived from what the runner executes, not from the planner: for every value, the step
    that writes it (0: inputs and array constants) and the last step that reads it (graph
    outputs are read after the last step). A pure reshape that runs nothing reads as its source."""
    plan = runner.plan
    aliases = plan.aliases or {}
    renamed = {k.root.id: arena.alias_of(k) for k in runner.kernels
               if k.root.id in aliases and k.root.id not in (plan.in_place or set())}

    def value(i):
        while i in renamed:
            i = renamed[i]
        return i
    written = {n.id: 0 for n in runner.graph.inputs}
    written.update({n.id: 0 for n in runner.graph.nodes if n.op == "const" and n.id in plan.offsets})
    last = {}
    for step, (_, _, reads, outs) in enumerate(runner.steps, start=1):
        for out in outs:   # a multi_output kernel writes several
            written[out] = step
        for r in reads:
            last[value(r)] = step
    for o in runner.graph.outputs:
        if value(o.id) in written:
            last[value(o.id)] = len(runner.steps) + 1
    return {v: (w, max(w, last.get(v, w))) for v, w in written.items()}


def assert_no_live_overlap(runner):
    """Two values whose lifetimes intersect never share a byte. A value written in place over
    another (same offset) is fine only if the old one is never read after that write."""
    plan, uses = runner.plan, buffer_uses(runner)
    size = {v: runner.nodes[v].nbytes for v in uses}
    assert set(uses) <= set(plan.offsets), "a buffer the runner touches has no place in the arena"
    for a in uses:
        oa, wa, ea = plan.offsets[a], *uses[a]
        assert oa % arena.ALIGN == 0 and oa + size[a] <= plan.peak
        for b in uses:
            ob, wb, eb = plan.offsets[b], *uses[b]
            if b == a or oa + size[a] <= ob or ob + size[b] <= oa:
                continue
            first, then = (a, b) if (wa, a) < (wb, b) else (b, a)
            assert uses[first][1] <= uses[then][0], \
                f"%{first} (steps {uses[first]}) still alive when %{then} (steps {uses[then]}) " \
                f"is written over its bytes"
            if uses[first][1] == uses[then][0]:   # read and overwritten by the same kernel:
                # only an in-place elementwise kernel may (the comparison with the
                # interpreter in compiled() checks that it reads each element before writing it)
                assert then in (plan.in_place or ()) and plan.offsets[first] == plan.offsets[then] \
                    and size[first] == size[then], f"%{then} overwrites %{first} while its kernel reads it"


def long_chain(x):
    # each op reads its input transposed, so no step can overwrite its input in place
    for i in range(12):
        x = (x.T * 1.01).sin() if i % 2 else x.T + 0.5
    return x


def test_arena_reuses_the_buffers_of_a_long_chain(monkeypatch):
    monkeypatch.setitem(fusion.RULES, "elementwise_chain", False)   # one kernel per op
    x = rng.standard_normal((64, 64)).astype(np.float32)
    r = compiled(long_chain, x).runner
    assert len(r.kernels) >= 12
    assert r.plan.peak < r.plan.naive
    # each intermediate dies once the next op has read it: two buffers take turns
    assert r.plan.peak <= 2 * x.nbytes and r.plan.naive >= 12 * x.nbytes
    assert_no_live_overlap(r)


def test_arena_never_overlaps_live_buffers_in_a_training_step():
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w = rng.standard_normal((8, 8)).astype(np.float32)

    def loss(q, w):
        h = F.layer_norm(F.gelu(F.linear(q, w)), (8,))
        return (F.scaled_dot_product_attention(h, q, h, is_causal=True) ** 2.0).mean()
    c = compiled(flame.value_and_grad(loss, argnums=(0, 1)), q, w)
    assert_no_live_overlap(c.runner)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6), st.integers(1, 3000)),
                min_size=1, max_size=25))
def test_plan_invariant_on_random_lifetimes(bufs):
    lifetimes = {i: (s, s + d) for i, (s, d, _) in enumerate(bufs)}
    sizes = {i: n for i, (_, _, n) in enumerate(bufs)}
    p = arena.plan(lifetimes, sizes)
    for a in lifetimes:
        for b in lifetimes:
            (sa, ea), (sb, eb) = lifetimes[a], lifetimes[b]
            if a < b and not (ea < sb or eb < sa):
                assert p.offsets[a] + sizes[a] <= p.offsets[b] or p.offsets[b] + sizes[b] <= p.offsets[a]
    # never below what is alive at once, never above keeping everything
    busiest = max(sum(sizes[i] for i, (s, e) in lifetimes.items() if s <= t <= e) for t in range(20))
    assert busiest <= p.peak <= p.naive


# ---------------------------------------------------------------- generated source

FLOAT = re.compile(r"(?<![\w.])(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|(?<![\w.])\d+[eE][-+]?\d+"
                   r"|\bnp\.(?:inf|nan)\b|\bfloat\(")
WRAPPED_F32 = re.compile(r"np\.float32\(-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|np\.inf|np\.nan)\)")


def constants_everywhere(x, w):
    """Float constants of every origin: gelu's, eps, masks (-inf), pad values, dropout."""
    h = F.gelu(F.layer_norm(x, (8,), w, w), "tanh") + F.gelu(x) * x.sigmoid()
    a = F.scaled_dot_product_attention(h, h, h, is_causal=True)
    return (F.dropout(a, 0.2, seed=3) ** 2.0).mean() + F.pad(x, (1, 1), value=0.25).sum() \
        + flame.rand_normal((3,), seed=1).sum() * 0.1


def generated(runner):
    """(kernel, dispatcher, file) for every generated (non-library) step."""
    out = []
    for k, fn, _, _ in runner.steps:
        if k.kind != "L":
            out.append((k, fn, fn.py_func.__code__.co_filename))
    return out


def test_generated_sources_are_content_hashed_files_and_reused(cache_dir, monkeypatch):
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    c = compiled(flame.value_and_grad(constants_everywhere, argnums=(0, 1)), x, B8)
    files = generated(c.runner)
    assert len(files) > 5
    root = os.path.realpath(cache_dir)
    for k, _, path in files:
        assert os.path.realpath(path).startswith(root + os.sep)
        # named after what it fuses; kernels differing only in the unique suffix share a file
        assert re.fullmatch(re.escape(k.base_name) + r"_[0-9a-f]{16,}\.py", os.path.basename(path))
        with open(path) as f:
            src = f.read()
        compile(src, path, "exec")                      # printable, valid Python
        assert f"def {k.base_name}(" in src
        assert c.runner.sources[k.name].replace(f"def {k.name}(", f"def {k.base_name}(") == src
        assert k.name in c.runner.sources
    # the same kernel with other content (a different constant) gets another file
    (k1, _, p1), = generated(compiled(lambda x: x * 1.25, x).runner)
    (k2, _, p2), = generated(compiled(lambda x: x * 1.75, x).runner)
    assert k1.name == k2.name and p1 != p2

    # a second compile, with the in-process module cache emptied, reads the same files
    stamp = {p: os.stat(p).st_mtime_ns for _, _, p in files}
    listing = sorted(os.listdir(os.path.dirname(files[0][2])))
    monkeypatch.setattr(cache, "_loaded", {})
    again = generated(flame.compile(flame.value_and_grad(constants_everywhere, argnums=(0, 1)),
                                    x, B8, backend="cpu").runner)
    assert [p for _, _, p in again] == [p for _, _, p in files]
    assert {p: os.stat(p).st_mtime_ns for _, _, p in files} == stamp
    assert sorted(os.listdir(os.path.dirname(files[0][2]))) == listing


def test_float32_kernels_type_every_float_constant():
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    c = compiled(flame.value_and_grad(constants_everywhere, argnums=(0, 1)), x, B8)
    for k, fn, path in generated(c.runner):
        with open(path) as f:
            src = f.read()
        assert "np.float64" not in src, k.name
        bare = FLOAT.findall(WRAPPED_F32.sub("C", src))
        assert not bare, f"{k.name}: untyped float constants {bare}"
        # and Numba agrees: no variable of the kernel is float64
        for ov in fn.overloads.values():
            assert ov.type_annotation is not None
            wide = {v: str(t) for v, t in ov.type_annotation.typemap.items()
                    if not v.startswith("$") and "float64" in str(t)}
            assert not wide, f"{k.name}: float64 variables {wide}"


def test_literal_check_catches_a_bare_float():
    # the regexes above are not vacuous
    assert FLOAT.findall(WRAPPED_F32.sub("C", "v = (v1 * 0.5) + np.float32(2.0)")) == ["0.5"]
    assert FLOAT.findall(WRAPPED_F32.sub("C", "v = np.float32(-np.inf) if c else 1e-05")) == ["1e-05"]
    assert not FLOAT.findall(WRAPPED_F32.sub("C", "x = _U(0x7FEB352D) + i3 * 40"))
