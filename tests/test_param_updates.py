"""compile(..., param_updates=True): a training step that writes its new parameters back."""
import numpy as np
import pytest

import flame
import flame.nn as nn
import flame.nn.functional as F

rng = np.random.default_rng()


def _model():
    flame.manual_seed(int(rng.integers(1 << 30)))
    return nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 2))


def _train(backend, model, x, y, steps, lr=0.1):
    def step(x, y):
        loss, g = flame.value_and_grad(lambda x, y: F.mse_loss(model(x), y), params=model)(x, y)
        return loss, {k: p - lr * g[k] for k, p in model.named_parameters()}
    c = flame.compile(step, x, y, backend=backend, param_updates=True)
    return [float(c(x, y)) for _ in range(steps)]


@pytest.mark.parametrize("backend", ["interp", "cpu"])
def test_updates_equal_a_manual_sgd_loop(backend):
    x, y = rng.standard_normal((32, 6)).astype(np.float32), rng.standard_normal((32, 2)).astype(np.float32)
    m1 = _model()
    m2 = _model()
    m2.load_state_dict({k: v.copy() for k, v in m1.state_dict().items()})
    losses = _train(backend, m1, x, y, 5)
    # the same steps by hand: returned gradients, host-side update
    vg = flame.compile(flame.value_and_grad(lambda x, y: F.mse_loss(m2(x), y), params=m2), x, y)
    manual = []
    for _ in range(5):
        loss, g = vg(x, y)
        manual.append(float(loss))
        for k, p in m2.named_parameters():
            p.data = p.data - 0.1 * g[k]
    assert np.allclose(losses, manual, rtol=1e-5), (losses, manual)
    assert losses[-1] < losses[0]
    for (k, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert np.allclose(a.data, b.data, rtol=1e-5, atol=1e-6), k


def test_updates_must_name_parameters():
    model = _model()
    x = np.zeros((2, 6), np.float32)
    with pytest.raises(KeyError, match="not a parameter"):
        flame.compile(lambda x: (model(x).sum(), {"nope": x}), x, param_updates=True)
    with pytest.raises(TypeError, match="must return"):
        flame.compile(lambda x: model(x).sum(), x, param_updates=True)
