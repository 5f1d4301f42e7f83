"""train/optim.py and train/step.py: the compiled AdamW step against torch.optim.AdamW (with
clip_grad_norm_), gradient accumulation, and the whole diffusion training step against the
same step written with torch + diffusers' DDPMScheduler + kohya's min-SNR weighting."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import flame
import flame.nn as nn
import flame.nn.functional as F
from flame.nn import Parameter
from flame.train import objective as obj
from flame.train.optim import AdamW, AdamWConfig
from flame.train.schedule import ScheduleConfig, lr_at
from flame.train.step import build_train_step

rng = np.random.default_rng()


def rand(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- AdamW on an MLP

def mlp_pair():
    flame.manual_seed(int(rng.integers(1 << 30)))
    fm = nn.Sequential(nn.Linear(5, 12), nn.SiLU(), nn.Linear(12, 3))
    tm = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.SiLU(), torch.nn.Linear(12, 3))
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in fm.state_dict().items()})
    return fm, tm


def torch_adamw(tm, cfg):
    return torch.optim.AdamW(tm.parameters(), lr=1.0, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)


def torch_update(tm, opt, cfg, lr, batches):
    """kohya/accelerate: each micro-batch's loss / k backward, clip, step."""
    opt.zero_grad()
    for x, y in batches:
        (torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y)) / len(batches)).backward()
    norm = torch.nn.utils.clip_grad_norm_(tm.parameters(), cfg.max_grad_norm or float("inf"))
    opt.param_groups[0]["lr"] = lr
    opt.step()
    return float(norm)


def assert_same_params(fm, tm, opt=None, fopt=None, rtol=1e-5, atol=1e-6):
    for k, v in tm.state_dict().items():
        assert np.allclose(fm.state_dict()[k], v.numpy(), rtol=rtol, atol=atol), k
    if opt is not None:   # the moments too
        for (k, p), tp in zip(fopt.params.items(), tm.parameters()):
            st = opt.state[tp]
            assert np.allclose(fopt.m[k].data, st["exp_avg"].numpy(), rtol=rtol, atol=atol), k
            assert np.allclose(fopt.v[k].data, st["exp_avg_sq"].numpy(), rtol=rtol, atol=1e-9), k


@pytest.mark.parametrize("backend", ["interp", "cpu"])
def test_adamw_equals_torch(backend):
    fm, tm = mlp_pair()
    x, y = rand(16, 5), rand(16, 3)
    norm0 = torch.nn.utils.get_total_norm(torch.autograd.grad(
        torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y)), list(tm.parameters())))
    # a max norm below the first gradient's norm, so clipping really happens
    cfg = AdamWConfig(betas=(0.85, 0.99), eps=1e-7, weight_decay=float(rng.uniform(0.05, 0.2)),
                      max_grad_norm=float(norm0) * 0.6)
    sched = ScheduleConfig(lr=3e-2, name="cosine", warmup_steps=2, total_steps=8)
    opt = AdamW(dict(fm.named_parameters()), cfg)
    traces = []

    def step(x, y, hyper):
        traces.append(1)
        loss, g = flame.value_and_grad(lambda x, y: F.mse_loss(fm(x), y), params=list(opt.params.values()))(x, y)
        upd, norm = opt.update(g, hyper)
        return (loss, norm), upd

    c = flame.compile(step, x, y, opt.hyper(1e-3, 1), backend=backend, param_updates=True)
    topt = torch_adamw(tm, cfg)
    clipped = 0
    for k in range(7):
        x, y = rand(16, 5), rand(16, 3)
        lr = lr_at(k, sched)
        loss, norm = c(x, y, opt.hyper(lr, k + 1))
        tloss = torch.nn.functional.mse_loss(tm(torch.from_numpy(x)), torch.from_numpy(y)).item()
        tnorm = torch_update(tm, topt, cfg, lr, [(x, y)])
        assert np.allclose(loss, tloss, rtol=1e-5) and np.allclose(norm, tnorm, rtol=1e-5), k
        clipped += tnorm > cfg.max_grad_norm
        assert_same_params(fm, tm, topt, opt)
    assert clipped and len(traces) == 1   # seven learning rates, one trace


def test_adamw_accumulation_equals_the_concatenated_batch():
    k, b = 3, 4
    fm, tm = mlp_pair()
    cfg = AdamWConfig(weight_decay=0.1, max_grad_norm=0.5, grad_accum=k)
    opt = AdamW(dict(fm.named_parameters()), cfg)
    vg = flame.value_and_grad(lambda x, y: F.mse_loss(fm(x), y), params=list(opt.params.values()))
    acc = flame.compile(lambda x, y: (lambda lg: (lg[0], opt.accumulate(lg[1])))(vg(x, y)),
                        rand(b, 5), rand(b, 3), backend="cpu", param_updates=True)
    apply = flame.compile(lambda h: (lambda un: (un[1], un[0]))(opt.apply(h)), opt.hyper(1e-3, 1),
                          backend="cpu", param_updates=True)
    topt = torch_adamw(tm, cfg)
    for step in (1, 2):   # twice: the sums must restart from zero
        micro = [(rand(b, 5), rand(b, 3)) for _ in range(k)]
        for x, y in micro:
            acc(x, y)
        lr = float(rng.uniform(1e-3, 1e-2))
        norm = apply(opt.hyper(lr, step, grad_scale=1.0 / k))
        # torch: one step on the concatenation (mean loss over k*b rows)
        cat = (np.concatenate([x for x, _ in micro]), np.concatenate([y for _, y in micro]))
        tnorm = torch_update(tm, topt, cfg, lr, [cat])
        assert np.allclose(norm, tnorm, rtol=1e-5)
        assert_same_params(fm, tm, topt, opt)
        assert all(not s.data.any() for s in opt.gsum.values())


def test_adamw_rejects_bad_input():
    fm, _ = mlp_pair()
    with pytest.raises(ValueError, match="betas"):
        AdamWConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="grad_accum"):
        AdamWConfig(grad_accum=0)
    with pytest.raises(ValueError, match="step 0"):
        AdamW(fm.parameters()).hyper(1e-4, 0)
    with pytest.raises(TypeError, match="not a flame Parameter"):
        AdamW({"w": np.ones(3)})


# ---------------------------------------------------------------- the diffusion step

class Denoiser(nn.Module):
    """A UNet stand-in: conv, a LoRA on the channels, timestep and context conditioning."""

    def __init__(self, d_ctx=6, c=8, r=2):
        super().__init__()
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.t_proj = nn.Linear(1, c)
        self.ctx_proj = nn.Linear(d_ctx, c)
        self.lora_down = Parameter(rand(r, c, scale=0.3))
        self.lora_up = Parameter(rand(c, r, scale=0.3))
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x, t, ctx):
        h = self.conv_in(x)
        lora = F.linear(F.linear(h.permute(0, 2, 3, 1), self.lora_down), self.lora_up)
        h = h + lora.permute(0, 3, 1, 2)
        cond = self.t_proj((t.cast("f32") / 1000.0).reshape(-1, 1)) + self.ctx_proj(ctx.mean(1))
        h = F.silu(h + cond.reshape(cond.shape[0], cond.shape[1], 1, 1))
        return self.conv_out(h)


class TorchDenoiser(torch.nn.Module):
    def __init__(self, d_ctx=6, c=8, r=2):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, c, 3, padding=1)
        self.t_proj = torch.nn.Linear(1, c)
        self.ctx_proj = torch.nn.Linear(d_ctx, c)
        self.lora_down = torch.nn.Parameter(torch.zeros(r, c))
        self.lora_up = torch.nn.Parameter(torch.zeros(c, r))
        self.conv_out = torch.nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x, t, ctx):
        h = self.conv_in(x)
        h = h + (h.permute(0, 2, 3, 1) @ self.lora_down.T @ self.lora_up.T).permute(0, 3, 1, 2)
        cond = self.t_proj((t.float() / 1000.0).reshape(-1, 1)) + self.ctx_proj(ctx.mean(1))
        return self.conv_out(torch.nn.functional.silu(h + cond[:, :, None, None]))


TRAINABLE = ("lora_down", "lora_up", "conv_out.bias")


def torch_reference_step(tm, topt, sched, ocfg, acfg, lr, micro):
    """kohya's train_network.py step, for micro = [(latents, ctx, t, noise)]."""
    topt.zero_grad()
    losses = []
    for lat, ctx, t, noise in micro:
        lat, ctx, t, noise = map(torch.from_numpy, (lat, ctx, t, noise))
        pred = tm(sched.add_noise(lat, noise, t), t, ctx)
        target = sched.get_velocity(lat, noise, t) if ocfg.prediction == "v_prediction" else noise
        loss = torch.nn.functional.mse_loss(pred, target, reduction="none").mean([1, 2, 3])
        if ocfg.min_snr_gamma:
            ac = sched.alphas_cumprod
            snr = (ac / (1 - ac))[t]
            w = torch.minimum(snr, torch.full_like(snr, ocfg.min_snr_gamma))
            loss = loss * w / (snr + 1 if ocfg.prediction == "v_prediction" else snr)
        loss = loss.mean()
        (loss / len(micro)).backward()
        losses.append(loss.item())
    params = [p for p in tm.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, acfg.max_grad_norm or float("inf"))
    topt.param_groups[0]["lr"] = lr
    topt.step()
    return losses, float(norm)


@pytest.mark.parametrize("backend, ocfg, acfg", [
    ("interp", obj.ObjectiveConfig(), AdamWConfig(max_grad_norm=None)),
    ("cpu", obj.ObjectiveConfig(prediction="v_prediction", min_snr_gamma=5.0, noise_offset=0.1, t_min=100),
     AdamWConfig(weight_decay=0.05, max_grad_norm=2e-4)),   # below any gradient norm seen: always clips
    ("cpu", obj.ObjectiveConfig(min_snr_gamma=3.0, noise_offset=0.05),
     AdamWConfig(max_grad_norm=2e-4, grad_accum=2)),
], ids=["interp-eps", "cpu-v-snr-offset-clip", "cpu-accum2"])
def test_train_step_equals_torch_diffusers(backend, ocfg, acfg):
    flame.manual_seed(int(rng.integers(1 << 30)))
    fm, tm = Denoiser(), TorchDenoiser()
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in fm.state_dict().items()})
    for k, p in tm.named_parameters():
        p.requires_grad = k in TRAINABLE
    params = dict(fm.named_parameters())
    step = build_train_step(fm, {k: params[k] for k in TRAINABLE}, ocfg, acfg,
                            batch_shapes=[((2, 4, 6, 5), (2, 7, 6))], backend=backend)
    topt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=1.0, betas=acfg.betas,
                             eps=acfg.eps, weight_decay=acfg.weight_decay, foreach=False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    lrs = ScheduleConfig(lr=2e-2, name="linear", warmup_steps=1, total_steps=6)
    trng = np.random.default_rng(int(rng.integers(1 << 30)))
    k = acfg.grad_accum
    for n in range(3):
        micro = []
        for _ in range(k):
            lat, ctx = rand(2, 4, 6, 5), rand(2, 7, 6)
            t, seed = obj.sample_timesteps(trng, 2, ocfg), int(rng.integers(1 << 40))
            # the noise the step draws in its graph, drawn alone by the same function
            noise = flame.compile(lambda s: obj.sample_noise(lat.shape, s, ocfg.noise_offset),
                                  np.int64(seed))(np.int64(seed))
            micro.append((lat, ctx, t, noise, seed))
        lr = lr_at(n, lrs)
        losses = [step(lat, ctx, t, seed, lr, n + 1) for lat, ctx, t, _, seed in micro]
        tlosses, tnorm = torch_reference_step(tm, topt, sched, ocfg, acfg, lr, [m[:4] for m in micro])
        assert np.allclose(losses, tlosses, rtol=5e-5), (n, losses, tlosses)
        assert np.allclose(step.last_grad_norm, tnorm, rtol=5e-5), n
        for name in TRAINABLE:
            assert np.allclose(params[name].data, tm.state_dict()[name].numpy(), rtol=5e-5, atol=1e-6), (n, name)
        if acfg.max_grad_norm:
            assert tnorm > acfg.max_grad_norm   # clipping was active
    frozen = [k for k in params if k not in TRAINABLE]
    assert all(np.array_equal(params[k].data, tm.state_dict()[k].numpy()) for k in frozen)
    # new learning rates every step, and still one trace per graph
    assert step.traces == (1 if k == 1 else 2)
    step(rand(3, 4, 4, 4), rand(3, 7, 6), np.array([1, 500, 999]), 7, 1e-3, 4)   # a new bucket
    assert step.traces == (2 if k == 1 else 3) and len(step.compiled) == step.traces


def test_train_step_rejects_bad_timesteps():
    fm = Denoiser()
    step = build_train_step(fm, [fm.lora_down, fm.lora_up], backend="interp")
    with pytest.raises(ValueError, match="timesteps must be integers"):
        step(rand(2, 4, 4, 4), rand(2, 3, 6), np.array([0.5, 3.0]), 0, 1e-4, 1)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_nonfinite_step_leaves_weights_and_moments_unchanged(grad_accum):
    flame.manual_seed(int(rng.integers(1 << 30)))
    fm = Denoiser()
    params = dict(fm.named_parameters())
    train = {k: params[k] for k in TRAINABLE}
    step = build_train_step(fm, train, obj.ObjectiveConfig(),
                            AdamWConfig(grad_accum=grad_accum, skip_nonfinite=True), backend="cpu")
    ctx = rand(2, 7, 6)
    t = np.array([10, 500])

    def state():
        return {k: p.data.copy() for k, p in {**train, **{f"m.{k}": p for k, p in step.opt.m.items()},
                                               **{f"v.{k}": p for k, p in step.opt.v.items()}}.items()}

    for _ in range(grad_accum):
        step(rand(2, 4, 6, 5), ctx, t, 1, 1e-2, 1)
    before = state()
    bad = rand(2, 4, 6, 5)
    bad[1, 2, 3, 4] = np.nan
    losses = [step(bad if i == 0 else rand(2, 4, 6, 5), ctx, t, 2, 1e-2, 2) for i in range(grad_accum)]
    assert np.isnan(losses[0]) and not np.isfinite(step.last_grad_norm)
    after = state()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    for _ in range(grad_accum):       # a finite step afterwards updates again
        loss = step(rand(2, 4, 6, 5), ctx, t, 3, 1e-2, 3)
    assert np.isfinite(loss) and np.isfinite(step.last_grad_norm)
    assert not np.array_equal(train["lora_down"].data, before["lora_down"])
