"""backend="cuda" against the reference interpreter, on a real GPU (skipped without one)."""
import numpy as np
import pytest

import flame
import flame.nn as nn
import flame.nn.functional as F
from flame.ir import ops


def _have_gpu():
    from flame.runtime.device import cuda_available
    return cuda_available()[0]


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _have_gpu(), reason="no NVIDIA GPU")]

rng = np.random.default_rng()


def r(*shape, lo=None):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if lo == "pos" else a


# (name, fn, inputs): forward on cuda vs interp; float inputs also get a backward check
CASES = [
    ("unary", lambda x: (x.exp() + x.sin() * x.cos() + x.tanh() + x.erf() + x.abs() + x.sigmoid()
                         - x.sign() + x.neg()), [r(33, 65)]),
    ("positive", lambda x: x.log() + x.sqrt() + x.rsqrt() + x.reciprocal() + x ** 1.5, [r(7, 129, lo="pos")]),
    ("binary_bcast", lambda x, y: (x + y) * (x - y) / (y * y + 1.0) + x.maximum(y) - x.minimum(y), [r(4, 1, 37), r(5, 37)]),
    ("compare_where", lambda x, y: flame.where((x > y) & (x != 0.5), x, y * 2.0), [r(9, 17), r(17)]),
    ("reduce", lambda x: x.sum((0, 2)) + x.amax(2).sum(0) * 0.1, [r(6, 7, 8)]),
    ("softmax", lambda x: F.softmax(x, dim=-1), [r(64, 300)]),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, (96,), w, b), [r(50, 96), r(96), r(96)]),
    ("group_norm", lambda x, w, b: F.group_norm(x, 4, w, b), [r(2, 16, 9, 9), r(16), r(16)]),
    # SD 1.5 sizes: groups one 1024-thread block holds in registers; longer ones by channel rows
    ("group_norm_sd_groups", lambda x, w, b: F.group_norm(x, 32, w, b), [r(2, 320, 64, 64), r(320), r(320)]),
    ("group_norm_long_groups", lambda x, w, b: F.group_norm(x, 32, w, b), [r(1, 2048, 32, 32), r(2048), r(2048)]),
    ("movement", lambda x: (x.permute(2, 0, 1)[1:, ::2, :].reshape(-1) * 2.0), [r(6, 8, 5)]),
    ("pad_concat", lambda x, y: flame.cat([F.pad(x, (1, 2, 0, 1)), y], dim=0), [r(3, 4), r(2, 7)]),
    ("upsample", lambda x: F.interpolate(x, scale_factor=2) + 1.0, [r(2, 3, 4, 5)]),
    ("matmul", lambda x, y: x @ y, [r(64, 48), r(48, 80)]),
    ("matmul_batch_bcast", lambda x, y: x @ y, [r(2, 3, 16, 24), r(3, 24, 8)]),
    ("matmul_t", lambda x, y: ops.matmul_t(x, y, ta=True, tb=True), [r(24, 16), r(8, 24)]),
    ("conv", lambda x, w: F.conv2d(x, w, None, 1, 1), [r(2, 8, 12, 12), r(16, 8, 3, 3)]),
    ("conv_strided_groups", lambda x, w: F.conv2d(x, w, None, 2, 1, 1, 2), [r(2, 8, 11, 11), r(6, 4, 3, 3)]),
    ("attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [r(2, 2, 16, 8), r(2, 2, 16, 8), r(2, 2, 16, 8)]),
    ("gelu_silu", lambda x: F.gelu(x) + F.silu(x) + F.gelu(x, approximate="tanh"), [r(128, 64)]),
]


def close(a, b, tol=2e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_interpreter(name, fn, inputs):
    ref = flame.compile(fn, *inputs)(*inputs)
    got = flame.compile(fn, *inputs, backend="cuda")(*inputs)
    close(got, ref)
    w = r(*np.shape(ref))

    def loss(*xs):
        return (fn(*xs) * flame.const(w)).sum()
    vg = flame.value_and_grad(loss, argnums=tuple(range(len(inputs))))
    (v_ref, g_ref) = flame.compile(vg, *inputs)(*inputs)
    (v_got, g_got) = flame.compile(vg, *inputs, backend="cuda")(*inputs)
    close(v_got, v_ref, 1e-3)
    for a, b in zip(g_got, g_ref):
        close(a, b, 1e-3)


def test_bf16_storage_matches_interpreter():
    import ml_dtypes
    x = r(64, 96).astype(ml_dtypes.bfloat16)
    w = r(96, 48).astype(ml_dtypes.bfloat16)
    fn = lambda x, w: F.layer_norm(F.gelu(x @ w).cast("f32"), (48,)).cast("bf16") * 2.0
    close(flame.compile(fn, x, w, backend="cuda")(x, w).astype(np.float32),
          flame.compile(fn, x, w)(x, w).astype(np.float32), 2e-2)


def test_random_same_numbers_as_interpreter():
    fn = lambda x: flame.rand_uniform((1000,), seed=7) + x
    x = r(1000)
    assert np.array_equal(flame.compile(fn, x, backend="cuda")(x), flame.compile(fn, x)(x))


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("name, fn, shape", [
    ("group_norm_silu", lambda x: F.silu(F.group_norm(x, 32)), (1, 320, 64, 64)),
    ("softmax_long_rows", lambda x: F.softmax(x, dim=-1), (32, 40960)),
    ("group_norm_grad", flame.grad(lambda x: (F.group_norm(x, 32) * x).sum()), (1, 320, 32, 64))])
def test_rows_on_a_cluster_of_blocks_match_interpreter_launch_after_launch(name, fn, shape, parts, monkeypatch):
    """Long rows on a thread block cluster of 2 or 4 blocks (each loads and stores its part,
    partial results meet through the blocks' shared memory): the interpreter's numbers, and
    the same bits on every launch of the captured graph, fresh inputs each time."""
    from flame.codegen import kernel as kd
    monkeypatch.setattr(kd, "LONG_ROW_PARTS", parts)
    plan = flame.plan(fn, flame.spec(shape, "f32"), backend="cuda")
    assert max(d.row_parts for d in plan.descs.values()) == parts
    xs = [r(*shape) * 2.0 + 0.5 for _ in range(3)]
    gpu, ref = flame.compile(fn, xs[0], backend="cuda"), flame.compile(fn, xs[0])
    for x in xs + xs[:1]:
        got = gpu(x)
        close(got, ref(x))
        assert np.array_equal(got, gpu(x))


class Block(nn.Module):
    def __init__(self, c=8, groups=4, heads=2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.heads = heads

    def forward(self, x):
        n, c, h, w = x.shape
        y = F.silu(self.norm(self.conv(x)))
        t = y.reshape(n, c, h * w).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        sh = lambda z: z.reshape(n, h * w, self.heads, c // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(sh(q), sh(k), sh(v))
        a = self.proj(a.transpose(1, 2).reshape(n, h * w, c))
        return x + a.transpose(1, 2).reshape(n, c, h, w)


def test_block_training_step_equals_cpu_backend():
    flame.manual_seed(0)
    model = Block()
    x, target = r(2, 8, 8, 8), r(2, 8, 8, 8)

    def step(x, target):
        return flame.value_and_grad(lambda x, t: F.mse_loss(model(x), t), params=model)(x, target)
    cpu = flame.compile(step, x, target, backend="cpu")(x, target)
    gpu = flame.compile(step, x, target, backend="cuda")(x, target)
    close(gpu[0], cpu[0], 1e-4)
    for k in cpu[1]:
        close(gpu[1][k], cpu[1][k], 1e-3)


def test_parameters_stay_on_device_and_update_in_place():
    """param_updates on the GPU: new parameters are written device to device inside the
    captured step, downloaded only when the host reads p.data, uploaded again when set."""
    flame.manual_seed(3)
    models = [nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 2)) for _ in range(2)]
    models[1].load_state_dict({k: v.copy() for k, v in models[0].state_dict().items()})
    x, y = r(32, 6), r(32, 2)

    def stepper(model, backend):
        def step(x, y):
            loss, g = flame.value_and_grad(lambda x, y: F.mse_loss(model(x), y), params=model)(x, y)
            return loss, {k: p - 0.1 * g[k] for k, p in model.named_parameters()}
        return flame.compile(step, x, y, backend=backend, param_updates=True)
    gpu, cpu = stepper(models[0], "cuda"), stepper(models[1], "cpu")
    lg = [float(gpu(x, y)) for _ in range(4)]
    lc = [float(cpu(x, y)) for _ in range(4)]
    assert np.allclose(lg, lc, rtol=1e-4), (lg, lc)
    p0, p1 = models[0].parameters()[0], models[1].parameters()[0]
    assert p0.__dict__["_device_owner"] is gpu.runner      # resident, not yet downloaded
    close(p0.data, p1.data, 1e-4)                          # downloaded on access
    p0.data = p0.data * 0.0                                # host change -> uploaded again
    p1.data = p1.data * 0.0
    close(float(gpu(x, y)), float(cpu(x, y)), 1e-4)


def test_tiny_sd_unet_forward_and_backward_match_interpreter():
    """The SD 1.x UNet structure at reduced size: cuda against the reference interpreter."""
    from flame.models.configs import TINY_UNET
    from flame.models.unet import UNet2DConditionModel
    flame.manual_seed(1)
    unet = UNet2DConditionModel(TINY_UNET)
    x, c, y = r(1, 4, 16, 16), r(1, 77, TINY_UNET.cross_attention_dim), r(1, 4, 16, 16)
    t = np.array([321.0], np.float32)
    close(flame.compile(lambda x, t, c: unet(x, t, c), x, t, c, backend="cuda")(x, t, c),
          flame.compile(lambda x, t, c: unet(x, t, c), x, t, c)(x, t, c), 1e-4)
    vg = flame.value_and_grad(lambda x, t, c, y: F.mse_loss(unet(x, t, c), y), params=unet)
    v_got, g_got = flame.compile(vg, x, t, c, y, backend="cuda")(x, t, c, y)
    v_ref, g_ref = flame.compile(vg, x, t, c, y)(x, t, c, y)
    close(v_got, v_ref, 1e-4)
    for k in g_ref:
        close(g_got[k], g_ref[k], 1e-3)


def _cpu_table():
    import test_cpu_backend   # the CPU backend's op table: every primitive and functional op
    return test_cpu_backend


@pytest.mark.parametrize("name", list(_cpu_table().CASES))
def test_op_table_matches_interpreter_on_cuda(name):
    """The same op table the CPU backend is tested with, forward and backward, on the GPU
    (float32, reduction order and cuBLAS differ from numpy: a looser tolerance)."""
    if name == "big_parallel":
        pytest.skip("a CPU-threading case")
    _cpu_table().run_case(name, rtol=2e-4, atol=2e-5, backend="cuda")
