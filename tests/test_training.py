"""End-to-end SGD through the interpreter against the same training in torch.

The flame step differentiates inside the trace (value_and_grad(params=model)) and returns the
updated parameters; the compiled step is traced once and called every step, with the new
arrays written to `p.data` in between (the compiled callable reads them on every call).
"""
import numpy as np
import pytest
import torch

import flame
import flame.nn as nn
import flame.nn.functional as F

rng = np.random.default_rng()


# ---------------------------------------------------------------- models (flame and torch twins)


def mlp_pair():
    flame.manual_seed(int(rng.integers(1 << 30)))
    fm = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
    tm = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    return fm, tm


class Block(nn.Module):
    """conv -> group_norm -> silu -> 2-head self-attention over H*W -> out proj -> residual."""

    def __init__(self, c_in=4, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.conv = nn.Conv2d(c_in, c, 3, padding=1)
        self.norm = nn.GroupNorm(4, c)
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.out = nn.Linear(c, c)

    def forward(self, x):
        h = self.conv(x)
        b, c, hh, ww = h.shape
        t = F.silu(self.norm(h)).reshape(b, c, hh * ww).permute(0, 2, 1)          # [B, L, C]
        split = lambda u: u.reshape(b, hh * ww, self.heads, c // self.heads).permute(0, 2, 1, 3)
        a = F.scaled_dot_product_attention(split(self.q(t)), split(self.k(t)), split(self.v(t)))
        a = self.out(a.permute(0, 2, 1, 3).reshape(b, hh * ww, c))
        return h + a.permute(0, 2, 1).reshape(b, c, hh, ww)


class TorchBlock(torch.nn.Module):
    def __init__(self, c_in=4, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.conv = torch.nn.Conv2d(c_in, c, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, c)
        self.q, self.k, self.v = (torch.nn.Linear(c, c) for _ in range(3))
        self.out = torch.nn.Linear(c, c)

    def forward(self, x):
        h = self.conv(x)
        b, c, hh, ww = h.shape
        t = torch.nn.functional.silu(self.norm(h)).reshape(b, c, hh * ww).permute(0, 2, 1)
        split = lambda u: u.reshape(b, hh * ww, self.heads, c // self.heads).permute(0, 2, 1, 3)
        a = torch.nn.functional.scaled_dot_product_attention(split(self.q(t)), split(self.k(t)), split(self.v(t)))
        a = self.out(a.permute(0, 2, 1, 3).reshape(b, hh * ww, c))
        return h + a.permute(0, 2, 1).reshape(b, c, hh, ww)


def block_pair():
    flame.manual_seed(int(rng.integers(1 << 30)))
    fm, tm = Block(), TorchBlock()
    # GroupNorm starts at weight 1, bias 0: perturb so its affine gradients are exercised
    for p in (fm.norm.weight, fm.norm.bias):
        p.data = (p.data + 0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    return fm, tm


def copy_into_torch(fm, tm, dtype=torch.float32):
    """Same weights in both (flame's state-dict names and layouts equal torch's here)."""
    sd = {k: torch.tensor(np.asarray(v), dtype=dtype) for k, v in fm.state_dict().items()}
    tm.load_state_dict(sd, strict=True)
    return tm.to(dtype)


# ---------------------------------------------------------------- training loops


def train_flame(model, x, y, steps, lr):
    def step(x, y):
        loss, g = flame.value_and_grad(lambda x, y: F.mse_loss(model(x), y), params=model)(x, y)
        return loss, {k: p - lr * g[k] for k, p in model.named_parameters()}

    c = flame.compile(step, x, y)   # traced once; the loop below only feeds new data
    params = dict(model.named_parameters())
    losses = []
    for _ in range(steps):
        loss, new = c(x, y)
        losses.append(float(loss))
        for k, v in new.items():
            assert v.dtype == params[k].data.dtype, k
            params[k].data = v
    return np.array(losses)


def train_torch(model, x, y, steps, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xt), yt)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def assert_params_close(fm, tm, rtol, atol):
    tsd = tm.state_dict()
    for k, v in fm.state_dict().items():
        np.testing.assert_allclose(v, tsd[k].detach().numpy(), rtol=rtol, atol=atol, err_msg=k)


# ---------------------------------------------------------------- tests


def test_mlp_sgd_matches_torch():
    fm, tm = mlp_pair()
    tm = copy_into_torch(fm, tm)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((4, 1))).astype(np.float32)
    lf = train_flame(fm, x, y, steps=40, lr=0.2)
    lt = train_torch(tm, x, y, steps=40, lr=0.2)
    assert lf[-1] < 0.6 * lf[0], lf
    # float32 rounding differs (numpy vs torch GEMMs, summation order) and compounds over the
    # steps; measured drift is <1e-6 relative, so 1e-5 leaves a 10x margin
    np.testing.assert_allclose(lf, lt, rtol=1e-5)
    assert_params_close(fm, tm, rtol=1e-5, atol=1e-6)


def test_conv_norm_attention_block_sgd_matches_torch():
    fm, tm = block_pair()
    tm = copy_into_torch(fm, tm)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    y = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    lf = train_flame(fm, x, y, steps=40, lr=0.1)
    lt = train_torch(tm, x, y, steps=40, lr=0.1)
    assert lf[-1] < 0.8 * lf[0], lf   # a random target: it fits part of it, not all
    np.testing.assert_allclose(lf, lt, rtol=1e-5)
    assert_params_close(fm, tm, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pair, x_shape, y_shape", [
    (mlp_pair, (16, 4), (16, 1)),
    (block_pair, (2, 4, 8, 8), (2, 8, 8, 8)),
])
def test_param_grads_match_torch_float64(pair, x_shape, y_shape):
    fm, tm = pair()
    fm.to("f64")
    tm = copy_into_torch(fm, tm, torch.float64)
    x, y = rng.standard_normal(x_shape), rng.standard_normal(y_shape)
    loss, g = flame.value_and_grad(lambda x, y: F.mse_loss(fm(x), y), params=fm)(x, y)
    tl = torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y))
    tl.backward()
    np.testing.assert_allclose(loss, tl.item(), rtol=1e-12)
    tg = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    assert set(g) == set(tg)
    for k in g:
        assert g[k].dtype == np.float64, k
        np.testing.assert_allclose(g[k], tg[k], rtol=1e-6, atol=1e-12, err_msg=k)
