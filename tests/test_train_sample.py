"""train/sample.py: flame's DDIM and Euler loops with classifier-free guidance, run as
compiled graphs, against diffusers' DDIMScheduler and EulerDiscreteScheduler driving the same
stand-in denoiser in torch, for epsilon and v prediction; the grid."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import flame.nn as nn  # noqa: E402
from flame.train.sample import Sampler, grid  # noqa: E402

rng = np.random.default_rng()


class FakeUNet(nn.Module):
    """A denoiser stand-in that uses x, the timestep and the context: k x + t / 1000 + mean(ctx)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, t, ctx):
        b = x.shape[0]
        tt = t.reshape(-1, 1, 1, 1) if t.shape[0] == b else t.reshape(1, 1, 1, 1)
        return x * self.k + tt * 0.001 + ctx.mean((1, 2)).reshape(b, 1, 1, 1) * 0.5


def torch_fake(k):
    def f(x, t, ctx):
        return x * k + torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) * 0.001 \
            + ctx.mean((1, 2)).reshape(-1, 1, 1, 1) * 0.5
    return f


def diffusers_loop(name, prediction, steps, guidance, noise, ctx, k):
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction)
    if name == "ddim":
        sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **common)
    else:
        sched = diffusers.EulerDiscreteScheduler(**common)
    sched.set_timesteps(steps)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    f, c = torch_fake(k), torch.from_numpy(ctx)
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        out = f(xin, t, c)
        u, cond = out.chunk(2)
        x = sched.step(u + guidance * (cond - u), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("name", ["ddim", "euler"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sampler_equals_diffusers_scheduler(name, prediction):
    k = float(rng.uniform(0.1, 0.6))
    embeddings = {p: rng.standard_normal((1, 5, 6)).astype(np.float32) for p in ("", "a cat")}
    sampler = Sampler(FakeUNet(k), None, lambda p: embeddings[p], prediction, "cpu")
    steps, guidance, seed = int(rng.integers(4, 12)), float(rng.uniform(1.5, 8)), int(rng.integers(1 << 30))
    got = sampler.latents("a cat", "", name, steps, guidance, seed, (1, 4, 3, 5))
    noise = np.random.default_rng(seed).standard_normal((1, 4, 3, 5)).astype(np.float32)
    ctx = np.concatenate([embeddings[""], embeddings["a cat"]])
    want = diffusers_loop(name, prediction, steps, guidance, noise, ctx, k)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # one compiled graph serves every step
    assert len(sampler.graphs) == 1


def test_grid_lays_out_images_under_labels():
    from PIL import Image
    ims = [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(3)]
    g = grid(ims, ["one", "two", "three"], "step 5")
    assert g.size == (3 * 48, 32 + 36 + 18)
    a = np.asarray(g)
    for i, im in enumerate(ims):
        np.testing.assert_array_equal(a[18 + 36:, i * 48:(i + 1) * 48], np.asarray(im))
