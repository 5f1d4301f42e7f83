"""`flame-train --quickstart` end to end at a reduced step count, through the command line:
the loss falls; the LoRA file's keys, shapes, dtypes, alpha and metadata are kohya's format
(names and shapes from kohya's rule applied to diffusers' UNet, tag counts from the caption
files); diffusers' own LoRA loader, given that file and the quickstart checkpoint converted by
diffusers' single-file converter, changes the UNet output as flame's UNet-plus-LoRA does."""
import hashlib
import json
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors = pytest.importorskip("safetensors")
import safetensors.torch  # noqa: E402
from diffusers.loaders import single_file_utils as sf  # noqa: E402
from lora_reference import kohya_reference  # noqa: E402
from train_helpers import run_cli  # noqa: E402

import flame  # noqa: E402
from flame.models import load_unet  # noqa: E402
from flame.models.checkpoint import load_safetensors  # noqa: E402
from flame.models.configs import TINY_UNET  # noqa: E402
from flame.train.export import apply_lora  # noqa: E402
from flame.train.lora import inject_lora  # noqa: E402
from flame.train.quickstart_assets import CHECKPOINT_NAME, REPEATS, TRIGGER  # noqa: E402

STEPS = 16
PROMPTS = ["flamequick, a red circle on a blue background", "flamequick, green and yellow stripes"]
SAMPLE = ["--set", f"sample.prompts={PROMPTS}".replace("'", '"'), "--set", "sample.steps=3",
          "--set", "sample.every_steps=8", "--set", "sample.width=64", "--set", "sample.height=48"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_cache_dir):
    root = tmp_path_factory.mktemp("quickstart")
    rc, out, err = run_cli(["--quickstart", str(root / "qs"), "--set", f"train.steps={STEPS}",
                            "--set", "train.warmup_steps=2", *SAMPLE], train_cache_dir)
    assert rc == 0, err
    qs = root / "qs"
    return {"root": qs, "stdout": out, "lora": qs / "output" / "flamequick.safetensors",
            "checkpoint": qs / "model" / CHECKPOINT_NAME, "data": qs / "data" / f"{REPEATS}_{TRIGGER}"}


def test_writes_everything_and_the_loss_falls(run):
    out = run["root"] / "output"
    assert sorted(os.listdir(out)) == ["config.toml", "flamequick.safetensors", "loss.png", "metrics.jsonl",
                                       "samples", "state", "train.log"]
    assert os.listdir(out / "state") == [f"flamequick-step{STEPS:06d}.state.safetensors"]
    assert (run["root"] / "quickstart.toml").is_file()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert set(recs[0]) == {"step", "loss", "lr", "grad_norm", "epoch", "time"}
    losses = np.array([r["loss"] for r in recs])
    assert np.isfinite(losses).all()
    # warm-up then cosine: 0, lr/2, lr, ..., decaying
    lrs = [r["lr"] for r in recs]
    assert lrs[:3] == [0.0, 5e-4, 1e-3] and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    first, last = losses[:4].mean(), losses[-4:].mean()
    assert last < first - 0.01, losses
    # it says the base model is random, and where the LoRA, the config and the log are
    said = run["stdout"]
    assert "base model is RANDOM" in said
    for p in (run["lora"], run["root"] / "quickstart.toml", out / "train.log"):
        assert str(p) in said, p
    assert str(run["lora"]) in (out / "train.log").read_text()


def test_lora_file_is_kohya_format(run):
    with safetensors.safe_open(str(run["lora"]), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
        file = {k: f.get_tensor(k) for k in keys}
    want = kohya_reference(diffusers.UNet2DConditionModel(**TINY_UNET.to_diffusers()), 8, 0)
    assert sorted(keys) == sorted(f"{n}.{s}" for n in want for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    for n, (down, up) in want.items():
        d, u, a = file[f"{n}.lora_down.weight"], file[f"{n}.lora_up.weight"], file[f"{n}.alpha"]
        assert (tuple(d.shape), tuple(u.shape)) == (down, up), n
        assert d.dtype == u.dtype == torch.float16, n
        assert a.ndim == 0 and a.dtype == torch.float32 and a.item() == 8.0, n
        assert u.abs().max() > 0, n          # trained: up started at zero
    # tag frequency counted from the caption files themselves
    tags = {}
    for name in sorted(os.listdir(run["data"])):
        if name.endswith(".txt"):
            cap = (run["data"] / name).read_text().strip()
            for t in [TRIGGER] + [x.strip() for x in cap.split(",") if x.strip()]:
                tags[t] = tags.get(t, 0) + 1
    images = sum(n.endswith(".png") for n in os.listdir(run["data"]))
    assert json.loads(md["ss_tag_frequency"]) == {f"{REPEATS}_{TRIGGER}": tags}
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("8", "8.0")
    assert "ss_network_args" not in md                       # no conv LoRA in the quickstart
    assert (md["ss_max_train_steps"], md["ss_steps"]) == (str(STEPS), str(STEPS))
    assert md["ss_learning_rate"] == "0.001" and md["ss_lr_scheduler"] == "cosine"
    assert md["ss_num_train_images"] == str(images * REPEATS)
    assert md["ss_sd_model_name"] == CHECKPOINT_NAME and md["ss_prediction_type"] == "epsilon"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.title"] == "flamequick"
    assert md["modelspec.trigger_phrase"] == TRIGGER
    raw = run["lora"].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()


def test_diffusers_loader_changes_the_unet_as_flame_does(run):
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = rng.uniform(0, 999, 2).astype(np.float32)
    c = rng.standard_normal((2, 7, TINY_UNET.cross_attention_dim)).astype(np.float32)

    ck = {k: torch.from_numpy(np.array(v)) for k, v in load_safetensors(str(run["checkpoint"])).items()}
    tu = diffusers.UNet2DConditionModel(**TINY_UNET.to_diffusers())
    tu.load_state_dict(sf.convert_ldm_unet_checkpoint(ck, TINY_UNET.to_diffusers()))
    tu.eval()
    pipe = diffusers.StableDiffusionPipeline
    sd, alphas = pipe.lora_state_dict(str(run["lora"]))
    with torch.no_grad():
        u0 = tu(*map(torch.from_numpy, (x, t, c))).sample.numpy()
        pipe.load_lora_into_unet(sd, alphas, tu)
        u1 = tu(*map(torch.from_numpy, (x, t, c))).sample.numpy()

    base = load_unet(str(run["checkpoint"]), config=TINY_UNET)
    f0 = flame.compile(base, x, t, c)(x, t, c)
    unet = load_unet(str(run["checkpoint"]), config=TINY_UNET)
    inject_lora(unet, 8, 8.0)
    assert len(apply_lora(unet, None, run["lora"])) == len(sd) // 2
    f1 = flame.compile(unet, x, t, c)(x, t, c)

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())
    assert rel(f0, u0) < 1e-4                        # the same base model
    delta_t, delta_f = u1 - u0, f1 - f0
    assert np.abs(delta_t).max() > 1e-3 * np.abs(u0).max()   # the LoRA does change the output
    assert rel(delta_f, delta_t) < 1e-2


def pixels(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16)


def test_samples_during_training_and_from_the_saved_lora(run, train_cache_dir):
    samples = run["root"] / "output" / "samples"
    want = sorted(f"step{s:06d}-{i}.png" for s in (8, STEPS) for i in ("0", "1", "grid"))
    assert sorted(os.listdir(samples)) == want
    ims = {f: pixels(samples / f) for f in want}
    for f, a in ims.items():
        if "grid" not in f:
            assert a.shape == (48, 64, 3), f
    end = [ims[f"step{STEPS:06d}-{i}.png"] for i in (0, 1)]
    assert np.abs(end[0] - end[1]).mean() > 1            # the prompt matters
    assert np.abs(end[0] - ims["step000008-0.png"]).mean() > 0.1   # so does the LoRA's training
    # flame-train sample with the saved (fp16) LoRA renders what the run rendered at its end
    rc, _, err = run_cli(["sample", str(run["root"] / "quickstart.toml"), "--lora", str(run["lora"]),
                          "--output", str(run["root"] / "rendered"), *SAMPLE], train_cache_dir)
    assert rc == 0, err
    again = [pixels(run["root"] / "rendered" / "samples" / f"flamequick-{i}.png") for i in (0, 1)]
    for a, b in zip(again, end):
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.0    # fp16-saved weights: nearly equal
