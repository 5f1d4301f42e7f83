"""train/objective.py and train/schedule.py against diffusers, kohya's formulas and torch."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

import flame
from flame.ir import rng as flame_rng
from flame.train import objective as obj
from flame.train.schedule import ScheduleConfig, lr_at

rng = np.random.default_rng()


def ddpm():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012)


def batch(b=5, shape=(4, 6, 5)):
    lat = rng.standard_normal((b,) + shape).astype(np.float32)
    noise = rng.standard_normal((b,) + shape).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.int64)
    t[:2] = (0, 999)   # both ends of the schedule, where float32 is least forgiving
    return lat, noise, t


def test_tables_equal_diffusers():
    s = ddpm()
    # diffusers builds the tables in float32, flame in float64 (like the LDM code)
    assert np.allclose(obj.BETAS, s.betas.numpy(), rtol=1e-6, atol=0)
    assert np.allclose(obj.ALPHAS_CUMPROD, s.alphas_cumprod.numpy(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", ["interp", "cpu"])
def test_add_noise_and_velocity_equal_diffusers(backend):
    lat, noise, t = batch()
    f = flame.compile(lambda x, n, t: (obj.add_noise(x, n, t), obj.velocity(x, n, t)),
                      lat, noise, t, backend=backend)
    noisy, v = f(lat, noise, t)
    s = ddpm()
    tl, tn, tt = torch.from_numpy(lat), torch.from_numpy(noise), torch.from_numpy(t)
    # The float32 and float64 tables differ by up to 4e-7 of each term's size (1.3e-5 relative on
    # sqrt(1 - ac_0) = 0.029), so the error is bounded by the terms, not by their sum, which may
    # cancel to near zero (measured: at most 6.9e-7 of |x| + |eps| over 300 random batches)
    bound = 3e-6 * (np.abs(lat) + np.abs(noise)) + 1e-7
    assert np.all(np.abs(noisy - s.add_noise(tl, tn, tt).numpy()) <= bound)
    assert np.all(np.abs(v - s.get_velocity(tl, tn, tt).numpy()) <= bound)


def kohya_apply_snr_weight(loss, timesteps, noise_scheduler, gamma, v_prediction=False):
    """kohya-ss/sd-scripts library/custom_train_functions.py (prepare_scheduler_for_custom_
    training's all_snr, then apply_snr_weight)."""
    ac = noise_scheduler.alphas_cumprod
    all_snr = (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2
    snr = torch.stack([all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    snr_weight = torch.div(min_snr_gamma, snr + 1 if v_prediction else snr).float()
    return loss * snr_weight


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_kohya(prediction):
    t = rng.integers(0, 1000, 64).astype(np.int64)
    t[:3] = (0, 999, 500)
    gamma = float(rng.uniform(1, 8))
    w = flame.compile(lambda t: obj.min_snr_weights(t, gamma, prediction), t)(t)
    ones = torch.ones(len(t))
    ref = kohya_apply_snr_weight(ones, torch.from_numpy(t), ddpm(), gamma, prediction == "v_prediction")
    # kohya's SNR comes from float32 alphas_cumprod: 1 - ac near t = 0 carries ~3e-5 of error
    assert np.allclose(w, ref.numpy(), rtol=1e-4, atol=0)
    assert (w < 1).any()     # some weights are actually clipped


def test_weighted_mse_equals_torch():
    pred, tgt, _ = batch(3)
    w = rng.uniform(0.1, 2, 3).astype(np.float32)
    got = flame.compile(obj.weighted_mse, pred, tgt, w)(pred, tgt, w)
    per = torch.nn.functional.mse_loss(torch.from_numpy(pred), torch.from_numpy(tgt), reduction="none").mean([1, 2, 3])
    assert np.allclose(got, (per * torch.from_numpy(w)).mean().item(), rtol=1e-5)


@pytest.mark.parametrize("backend", ["interp", "cpu"])
def test_noise_and_offset_from_the_counter_rng(backend):
    seed = int(rng.integers(1 << 40))
    shape = (3, 4, 5, 6)
    off = float(rng.uniform(0.05, 0.2))
    f = flame.compile(lambda s: obj.sample_noise(shape, s, off), np.int64(seed), backend=backend)
    got = f(np.int64(seed))
    # the numpy reference of flame's RNG: the noise on stream 0, the offset on stream 1
    base = flame_rng.normal(seed, 0, int(np.prod(shape))).reshape(shape)
    per_channel = flame_rng.normal(seed, 1, shape[0] * shape[1]).reshape(shape[0], shape[1], 1, 1)
    assert np.allclose(got, base + off * per_channel, rtol=1e-5, atol=1e-6)
    assert not np.allclose(f(np.int64(seed + 1)), got)


def test_sample_timesteps_stays_in_range():
    cfg = obj.ObjectiveConfig(t_min=int(rng.integers(0, 400)), t_max=int(rng.integers(600, 1001)))
    t = obj.sample_timesteps(np.random.default_rng(int(rng.integers(1 << 30))), 40000, cfg)
    assert t.dtype == np.int64 and t.min() == cfg.t_min and t.max() == cfg.t_max - 1


@pytest.mark.parametrize("bad, match", [
    (dict(prediction="sample"), "prediction"), (dict(min_snr_gamma=0), "min_snr_gamma"),
    (dict(noise_offset=-0.1), "noise_offset"), (dict(t_min=500, t_max=500), "timestep range"),
    (dict(t_max=1001), "timestep range")])
def test_objective_config_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        obj.ObjectiveConfig(**bad)


# ---------------------------------------------------------------- LR schedules

@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "cosine", "linear"])
def test_lr_schedule_equals_diffusers(name):
    total = int(rng.integers(20, 40))
    warm = 0 if name == "constant" else int(rng.integers(1, 8))
    lr = float(rng.uniform(1e-5, 1e-3))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total)
    cfg = ScheduleConfig(lr=lr, name=name, warmup_steps=warm, total_steps=total)
    for k in range(total + 3):   # past the end too: cosine and linear stay at 0
        assert lr_at(k, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18), (name, k)
        opt.step()
        sched.step()


def test_schedule_config_rejects():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        ScheduleConfig(lr=1e-4, name="cosin")
    with pytest.raises(ValueError, match="constant_with_warmup"):
        ScheduleConfig(lr=1e-4, name="constant", warmup_steps=10)
    with pytest.raises(TypeError):
        lr_at(0, {"lr": 1e-4, "warmup": 3})
