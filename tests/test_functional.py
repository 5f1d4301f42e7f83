"""flame.nn.functional and the torch-like Tensor methods against PyTorch: forward and
backward (value_and_grad of sum(out * w) with a random cotangent w vs torch.autograd), in
float64 and float32, on fresh random inputs run by the reference interpreter."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import flame
import flame.nn.functional as F

# torch warns that an even 'same' kernel copies the input; that is the case we test
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

rng = np.random.default_rng()
TOL = {"f64": 1e-6, "f32": 1e-4}
NP = {"f64": np.float64, "f32": np.float32}


def r(*shape):
    return rng.standard_normal(shape)


def idx(high, *shape):
    return rng.integers(0, high, size=shape).astype(np.int64)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30)


def _cast(arrays, dtype):
    return [a.astype(NP[dtype]) if a.dtype.kind == "f" else a for a in arrays]


def check(fl, th, inputs, dtype):
    """fl(*flame tensors) and th(*torch tensors) must agree, and so must the gradients of
    sum(out * w) w.r.t. every float input. torch runs in float64 on the same (rounded)
    inputs, so the float32 error is flame's alone."""
    xs = _cast(inputs, dtype)
    out = flame.compile(fl, *xs)(*xs)
    ts = [torch.tensor(a.astype(np.float64) if a.dtype.kind == "f" else a,
                       requires_grad=a.dtype.kind == "f") for a in xs]
    want = th(*ts)
    assert out.dtype == NP[dtype]
    assert rel_err(out, want.detach().numpy()) <= TOL[dtype]

    w = r(*want.shape)
    (want * torch.tensor(w)).sum().backward()
    diff = [i for i, a in enumerate(xs) if a.dtype.kind == "f"]
    _, grads = flame.value_and_grad(lambda *a: (fl(*a[:-1]) * a[-1]).sum(),
                                    argnums=tuple(diff))(*xs, w.astype(NP[dtype]))
    for i, g in zip(diff, grads):
        assert g.dtype == NP[dtype]
        assert rel_err(g, ts[i].grad.numpy()) <= TOL[dtype], f"gradient of input {i}"


def _mask(b, h, L, S):
    m = rng.random((b, h, L, S)) < 0.6
    m[..., 0] = True   # every query sees at least one key (else the row is NaN in both)
    return m


# (id, flame fn, torch fn, inputs)
FUNCTIONAL = [
    ("linear", F.linear, TF.linear, [r(5, 7), r(4, 7), r(4)]),
    ("linear_nobias", F.linear, TF.linear, [r(5, 7), r(4, 7)]),
    ("linear_3d", F.linear, TF.linear, [r(2, 3, 7), r(4, 7), r(4)]),
    ("conv2d", F.conv2d, TF.conv2d, [r(2, 3, 7, 6), r(4, 3, 3, 3), r(4)]),
    ("conv2d_nobias", F.conv2d, TF.conv2d, [r(2, 3, 5, 5), r(4, 3, 2, 3)]),
    ("conv2d_stride_pad", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
     lambda x, w, b: TF.conv2d(x, w, b, stride=2, padding=1), [r(2, 3, 9, 8), r(4, 3, 3, 3), r(4)]),
    ("conv2d_pad_tuple_stride_tuple", lambda x, w: F.conv2d(x, w, stride=(1, 2), padding=(2, 1)),
     lambda x, w: TF.conv2d(x, w, stride=(1, 2), padding=(2, 1)), [r(1, 2, 6, 7), r(3, 2, 3, 2)]),
    ("conv2d_same", lambda x, w, b: F.conv2d(x, w, b, padding="same"),
     lambda x, w, b: TF.conv2d(x, w, b, padding="same"), [r(2, 3, 6, 5), r(4, 3, 3, 3), r(4)]),
    ("conv2d_same_even_kernel", lambda x, w: F.conv2d(x, w, padding="same"),
     lambda x, w: TF.conv2d(x, w, padding="same"), [r(1, 2, 6, 5), r(3, 2, 4, 2)]),
    ("conv2d_same_dilated", lambda x, w: F.conv2d(x, w, padding="same", dilation=2),
     lambda x, w: TF.conv2d(x, w, padding="same", dilation=2), [r(1, 2, 7, 8), r(3, 2, 3, 3)]),
    ("conv2d_dilation", lambda x, w: F.conv2d(x, w, padding=1, dilation=(2, 1)),
     lambda x, w: TF.conv2d(x, w, padding=1, dilation=(2, 1)), [r(2, 2, 8, 7), r(3, 2, 3, 3)]),
    ("conv2d_groups", lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2),
     lambda x, w, b: TF.conv2d(x, w, b, padding=1, groups=2), [r(2, 4, 6, 6), r(6, 2, 3, 3), r(6)]),
    ("conv2d_depthwise", lambda x, w: F.conv2d(x, w, stride=2, groups=3),
     lambda x, w: TF.conv2d(x, w, stride=2, groups=3), [r(2, 3, 7, 7), r(3, 1, 3, 3)]),
    ("silu", F.silu, TF.silu, [r(4, 9)]),
    ("gelu", F.gelu, TF.gelu, [r(4, 9) * 2]),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"),
     lambda x: TF.gelu(x, approximate="tanh"), [r(4, 9) * 2]),
    *[(f"softmax_dim{d}", lambda x, d=d: F.softmax(x, dim=d), lambda x, d=d: TF.softmax(x, dim=d),
       [r(3, 4, 5) * 3]) for d in (0, 1, -1)],
    *[(f"log_softmax_dim{d}", lambda x, d=d: F.log_softmax(x, dim=d),
       lambda x, d=d: TF.log_softmax(x, dim=d), [r(3, 4, 5) * 3]) for d in (0, 1, -1)],
    ("layer_norm", lambda x, w, b: F.layer_norm(x, (6,), w, b),
     lambda x, w, b: TF.layer_norm(x, (6,), w, b), [r(3, 4, 6), r(6), r(6)]),
    ("layer_norm_noaffine", lambda x: F.layer_norm(x, 6), lambda x: TF.layer_norm(x, (6,)),
     [r(3, 4, 6) * 2 + 1]),
    ("layer_norm_2d_shape", lambda x, w, b: F.layer_norm(x, (4, 6), w, b, eps=1e-3),
     lambda x, w, b: TF.layer_norm(x, (4, 6), w, b, eps=1e-3), [r(3, 4, 6), r(4, 6), r(4, 6)]),
    ("group_norm_4d", lambda x, w, b: F.group_norm(x, 3, w, b),
     lambda x, w, b: TF.group_norm(x, 3, w, b), [r(2, 6, 4, 5) + 0.5, r(6), r(6)]),
    ("group_norm_3d", lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-4),
     lambda x, w, b: TF.group_norm(x, 2, w, b, eps=1e-4), [r(3, 4, 7), r(4), r(4)]),
    ("group_norm_noaffine", lambda x: F.group_norm(x, 4), lambda x: TF.group_norm(x, 4),
     [r(2, 8, 3, 3)]),
    ("sdpa", F.scaled_dot_product_attention, TF.scaled_dot_product_attention,
     [r(2, 3, 5, 4), r(2, 3, 5, 4), r(2, 3, 5, 4)]),
    ("sdpa_cross", F.scaled_dot_product_attention, TF.scaled_dot_product_attention,
     [r(2, 3, 5, 4), r(2, 3, 7, 4), r(2, 3, 7, 6)]),
    ("sdpa_bool_mask", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
     lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m),
     [r(2, 3, 5, 4), r(2, 3, 7, 4), r(2, 3, 7, 4), _mask(2, 1, 5, 7)]),
    ("sdpa_float_mask", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
     lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m),
     [r(2, 3, 5, 4), r(2, 3, 7, 4), r(2, 3, 7, 4), r(5, 7)]),
    ("sdpa_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
     [r(2, 2, 6, 4), r(2, 2, 6, 4), r(2, 2, 6, 4)]),
    ("sdpa_causal_cross", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
     [r(1, 2, 4, 3), r(1, 2, 6, 3), r(1, 2, 6, 3)]),
    ("sdpa_scale", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.37),
     lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, scale=0.37),
     [r(2, 3, 5, 4), r(2, 3, 6, 4), r(2, 3, 6, 4)]),
    ("interp_x2", lambda x: F.interpolate(x, scale_factor=2),
     lambda x: TF.interpolate(x, scale_factor=2, mode="nearest"), [r(2, 3, 4, 5)]),
    ("interp_size", lambda x: F.interpolate(x, size=(8, 15)),
     lambda x: TF.interpolate(x, size=(8, 15), mode="nearest"), [r(2, 3, 4, 5)]),
    ("interp_down_size", lambda x: F.interpolate(x, size=(3, 2)),
     lambda x: TF.interpolate(x, size=(3, 2), mode="nearest"), [r(2, 3, 6, 8)]),
    ("interp_down_scale", lambda x: F.interpolate(x, scale_factor=0.5),
     lambda x: TF.interpolate(x, scale_factor=0.5, mode="nearest"), [r(1, 2, 6, 8)]),
    ("pad_last", lambda x: F.pad(x, (1, 2)), lambda x: TF.pad(x, (1, 2)), [r(2, 3, 4)]),
    ("pad_3dims_value", lambda x: F.pad(x, (1, 1, 0, 2, 2, 1), value=1.5),
     lambda x: TF.pad(x, (1, 1, 0, 2, 2, 1), value=1.5), [r(2, 3, 4, 5)]),
    ("pad_negative_crops", lambda x: F.pad(x, (-1, 2, 1, -2)),
     lambda x: TF.pad(x, (-1, 2, 1, -2)), [r(2, 5, 6)]),
    ("embedding", F.embedding, TF.embedding, [idx(6, 3, 5), r(6, 4)]),
    ("embedding_padding_idx", lambda i, w: F.embedding(i, w, padding_idx=2),
     lambda i, w: TF.embedding(i, w, padding_idx=2),
     [np.array([[2, 0, 3, 2], [1, 2, 3, 3]]), r(5, 4)]),
    ("embedding_neg_padding_idx", lambda i, w: F.embedding(i, w, padding_idx=-1),
     lambda i, w: TF.embedding(i, w, padding_idx=-1), [np.array([4, 0, 4, 1, 1]), r(5, 3)]),
    *[(f"mse_{red}", lambda a, b, red=red: F.mse_loss(a, b, reduction=red),
       lambda a, b, red=red: TF.mse_loss(a, b, reduction=red), [r(3, 5), r(3, 5)])
      for red in ("mean", "sum", "none")],
    ("dropout_eval", lambda x: F.dropout(x, 0.3, training=False),
     lambda x: TF.dropout(x, 0.3, training=False), [r(4, 5)]),
]


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("fl,th,inputs", [c[1:] for c in FUNCTIONAL], ids=[c[0] for c in FUNCTIONAL])
def test_functional_vs_torch(fl, th, inputs, dtype):
    check(fl, th, inputs, dtype)


# Tensor methods and free functions that mirror torch's
TENSOR = [
    ("reshape_view", lambda x: x.reshape(3, -1) * 2.0 + x.view(-1, 4, 2).sum(0).reshape(-1)[:1],
     lambda x: x.reshape(3, -1) * 2.0 + x.view(-1, 4, 2).sum(0).reshape(-1)[:1], [r(3, 4, 2)]),
    ("permute", lambda x: x.permute(2, 0, 1), lambda x: x.permute(2, 0, 1), [r(2, 3, 4)]),
    ("permute_neg", lambda x: x.permute((-1, 0, -2)), lambda x: x.permute((-1, 0, -2)), [r(2, 3, 4)]),
    ("transpose", lambda x: x.transpose(0, -1), lambda x: x.transpose(0, -1), [r(2, 3, 4)]),
    ("mT_T", lambda x: x.mT + x.T.permute(2, 1, 0), lambda x: x.mT + x.permute(2, 1, 0).permute(2, 1, 0),
     [r(2, 3, 3)]),
    ("flatten", lambda x: x.flatten(1) * 1.0 + x.flatten().reshape(2, -1),
     lambda x: x.flatten(1) * 1.0 + x.flatten().reshape(2, -1), [r(2, 3, 4)]),
    ("flatten_range", lambda x: x.flatten(1, 2), lambda x: x.flatten(1, 2), [r(2, 3, 4, 5)]),
    ("unsqueeze_squeeze", lambda x: x.unsqueeze(1).unsqueeze(-1).squeeze(1) + x.squeeze().unsqueeze(-1),
     lambda x: x.unsqueeze(1).unsqueeze(-1).squeeze(1) + x.squeeze().unsqueeze(-1), [r(3, 1, 4)]),
    ("squeeze_dim", lambda x: x.squeeze(0).squeeze(1), lambda x: x.squeeze(0).squeeze(1), [r(1, 3, 4)]),
    ("getitem_int_slice", lambda x: x[1, 1:3, ::2], lambda x: x[1, 1:3, ::2], [r(3, 4, 5)]),
    ("getitem_neg_step", lambda x: x[-1, :, 1::3], lambda x: x[-1, :, 1::3], [r(3, 4, 7)]),
    ("getitem_none_ellipsis", lambda x: x[None, ..., 2, None] + x[..., 0:1, :][:, None],
     lambda x: x[None, ..., 2, None] + x[..., 0:1, :][:, None], [r(2, 3, 4)]),
    ("getitem_ellipsis_last", lambda x: x[..., -2], lambda x: x[..., -2], [r(2, 3, 4)]),
    ("chunk", lambda x: sum((c * (i + 1) for i, c in enumerate(x.chunk(3, dim=1))), 0.0),
     lambda x: sum((c * (i + 1) for i, c in enumerate(x.chunk(3, dim=1))), 0.0), [r(2, 9)]),
    ("chunk_uneven", lambda x: flame.cat([c.sum(-1, keepdim=True) for c in x.chunk(3, -1)], 0),
     lambda x: torch.cat([c.sum(-1, keepdim=True) for c in x.chunk(3, -1)], 0), [r(2, 8)]),
    ("split", lambda x: flame.cat([x.split(2, 0)[2], x.split([1, 4], 0)[0] * 3.0], 1),
     lambda x: torch.cat([x.split(2, 0)[2], x.split([1, 4], 0)[0] * 3.0], 1), [r(5, 3)]),
    ("sum_dims", lambda x: x.sum((0, 2)), lambda x: x.sum((0, 2)), [r(3, 4, 5)]),
    ("sum_keepdim", lambda x: x.sum(-1, keepdim=True) * x, lambda x: x.sum(-1, keepdim=True) * x, [r(3, 4)]),
    ("sum_all", lambda x: x.sum(), lambda x: x.sum(), [r(3, 4)]),
    ("mean_dims", lambda x: x.mean((1, -1), keepdim=True), lambda x: x.mean((1, -1), keepdim=True), [r(2, 3, 4)]),
    ("mean_all", lambda x: x.mean(), lambda x: x.mean(), [r(2, 3, 4)]),
    ("var", lambda x: x.var(1), lambda x: x.var(1), [r(3, 5, 2)]),
    ("var_biased_keepdim", lambda x: x.var((0, 2), keepdim=True, unbiased=False),
     lambda x: x.var((0, 2), keepdim=True, unbiased=False), [r(3, 5, 2)]),
    ("var_correction", lambda x: x.var(-1, correction=2), lambda x: x.var(-1, correction=2), [r(3, 6)]),
    ("amax", lambda x: x.amax(1), lambda x: x.amax(1), [r(3, 5, 2)]),
    ("amax_dims_keepdim", lambda x: x.amax((0, 2), keepdim=True), lambda x: x.amax((0, 2), keepdim=True),
     [r(3, 5, 2)]),
    ("softmax_method", lambda x: x.softmax(1), lambda x: x.softmax(1), [r(3, 5, 2) * 3]),
    ("log_softmax_method", lambda x: x.log_softmax(-1), lambda x: x.log_softmax(-1), [r(3, 5) * 3]),
    ("clamp", lambda x: x.clamp(-0.5, 0.7), lambda x: x.clamp(-0.5, 0.7), [r(4, 6)]),
    ("clamp_min", lambda x: x.clamp(min=0.1), lambda x: x.clamp(min=0.1), [r(4, 6)]),
    ("clamp_max", lambda x: x.clamp(max=-0.2), lambda x: x.clamp(max=-0.2), [r(4, 6)]),
    ("matmul", lambda a, b: a @ b, lambda a, b: a @ b, [r(3, 4), r(4, 5)]),
    ("matmul_batched_bcast", lambda a, b: a @ b, lambda a, b: a @ b, [r(2, 3, 4), r(4, 5)]),
    ("matmul_vec_vec", lambda a, b: a @ b, lambda a, b: a @ b, [r(4), r(4)]),
    ("matmul_mat_vec", lambda a, b: a @ b, lambda a, b: a @ b, [r(2, 3, 4), r(4)]),
    ("matmul_vec_mat", lambda a, b: a.matmul(b), lambda a, b: a.matmul(b), [r(4), r(2, 4, 3)]),
    ("cat", lambda a, b: flame.cat([a, b, a], dim=1), lambda a, b: torch.cat([a, b, a], dim=1),
     [r(2, 3, 4), r(2, 5, 4)]),
    ("cat_neg_dim", lambda a, b: flame.cat([a, b], -1), lambda a, b: torch.cat([a, b], -1), [r(2, 3), r(2, 1)]),
    ("stack", lambda a, b: flame.stack([a, b, a * b]), lambda a, b: torch.stack([a, b, a * b]), [r(2, 3), r(2, 3)]),
    ("stack_last", lambda a, b: flame.stack([a, b], dim=-1), lambda a, b: torch.stack([a, b], dim=-1),
     [r(2, 3), r(2, 3)]),
    ("where_scalar_else", lambda x: flame.where(x > 0.2, x, 0.5), lambda x: torch.where(x > 0.2, x, 0.5),
     [r(3, 4)]),
    ("where_scalar_then", lambda x, y: flame.where(x < y, -1.0, y * x),
     lambda x, y: torch.where(x < y, -1.0, y * x), [r(3, 4), r(4)]),
    ("where_bcast", lambda c, x, y: flame.where(c, x, y), lambda c, x, y: torch.where(c, x, y),
     [rng.random((3, 1)) < 0.5, r(1, 4), r(3, 4)]),
    ("arith_scalars", lambda x: (2.0 - x) / (x * x + 1.0) + 3.0 * x ** 2 - (-x) / 4.0,
     lambda x: (2.0 - x) / (x * x + 1.0) + 3.0 * x ** 2 - (-x) / 4.0, [r(3, 4)]),
]


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("fl,th,inputs", [c[1:] for c in TENSOR], ids=[c[0] for c in TENSOR])
def test_tensor_methods_vs_torch(fl, th, inputs, dtype):
    check(fl, th, inputs, dtype)


# ---- dropout in training mode: torch's RNG differs, so check the mask's properties and
# compare the gradient with the mask read off the same forward.

def _dropout_and_grad(p, x, w, seed):
    def step(x, w):
        def loss(x):
            y = F.dropout(x, p, training=True)
            return (y * w).sum(), y
        (_, y), g = flame.value_and_grad(loss, has_aux=True)(x)
        return y, g
    return flame.compile(step, x, w)(x, w, seed=seed)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_training(p):
    x, w = r(200, 250), r(200, 250)   # 50k draws: the kept fraction is within ~0.01
    y, g = _dropout_and_grad(p, x, w, seed=7)
    y2, _ = _dropout_and_grad(p, x, w, seed=7)
    y3, _ = _dropout_and_grad(p, x, w, seed=8)
    np.testing.assert_array_equal(y, y2)           # a fixed seed gives a fixed mask
    keep = y != 0
    assert not np.array_equal(keep, y3 != 0)       # another seed another mask
    n = keep.size
    assert abs(keep.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    scale = 1.0 / (1.0 - p)
    np.testing.assert_allclose(y[keep], (x * scale)[keep], rtol=1e-6)

    xt = torch.tensor(x, requires_grad=True)
    (xt * torch.tensor(keep * scale) * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_dropout_explicit_seed_ignores_graph_seed():
    x = r(64, 64)
    f = flame.compile(lambda x: F.dropout(x, 0.5, training=True, seed=3), x)
    np.testing.assert_array_equal(f(x, seed=0), f(x, seed=1))
    g = flame.compile(lambda x: F.dropout(x, 0.5, training=True, seed=4), x)
    assert not np.array_equal(f(x) != 0, g(x) != 0)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_edges(p):
    x = r(5, 6)
    y = flame.compile(lambda x: F.dropout(x, p, training=True), x)(x)
    np.testing.assert_array_equal(y, TF.dropout(torch.tensor(x), p, training=True).numpy())
