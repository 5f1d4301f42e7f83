"""flame-compile --model: the Stable Diffusion presets (built shape-only, traced from flame.spec
inputs), their parameter counts against diffusers/transformers models of the same
configuration, and --summary."""
import re

import pytest

from flame.cli import compile as cli
from flame.models.configs import TINY_UNET, TINY_VAE
from flame.models.configs_clip import TINY_TEXT

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PARAMS_RE = re.compile(r"^# parameters: (\d+) tensors, ([\d,]+) values", re.M)


def compile_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def param_line(dump: str):
    m = PARAMS_RE.search(dump)
    assert m, dump[-2000:]
    return int(m.group(1)), int(m.group(2).replace(",", ""))


def is_equation(line: str) -> bool:
    return line.startswith("  ")


def reference(model: str):
    """The diffusers/transformers model built from the same tiny configuration."""
    if model == "sd15-unet":
        return diffusers.UNet2DConditionModel(**TINY_UNET.to_diffusers())
    if model == "sd15-vae":
        return diffusers.AutoencoderKL(**TINY_VAE.to_diffusers())
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT.to_transformers()))


# the inputs each tiny preset is traced with (default latent side: TINY_UNET.sample_size = 8;
# the two-block tiny VAE downsamples once, so its images are 2x the latent side)
TINY_HEADERS = {
    ("sd15-unet", False): "def unet(x:f32[1,4,8,8], timesteps:i64[1], context:f32[1,77,32]; ",
    ("sd15-unet", True): "def unet_grad(x:f32[1,4,8,8], timesteps:i64[1], context:f32[1,77,32], target:f32[1,4,8,8]; ",
    ("sd15-vae", False): "def vae(image:f32[1,3,16,16]; ",
    ("sd15-vae", True): "def vae_grad(image:f32[1,3,16,16]; ",
    ("sd15-clip", False): "def clip(input_ids:i64[1,77]; ",
    ("sd15-clip", True): "def clip_grad(input_ids:i64[1,77]; ",
}
RETURNS = {"sd15-unet": "noise_pred", "sd15-vae": "mean, logvar, decoded", "sd15-clip": "hidden"}


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("model", cli.PRESETS)
def test_tiny_preset_dumps_with_the_reference_parameter_count(capsys, model, grad):
    rc, out, err = compile_cli(capsys, "--model", model, "--config", "tiny", *(["--grad"] if grad else []))
    assert rc == 0 and err == "", err
    assert out.startswith(TINY_HEADERS[model, grad])
    ref = list(reference(model).parameters())
    assert param_line(out) == (len(ref), sum(p.numel() for p in ref))
    assert re.search(r"^# nodes: \d+ \(forward \d+, backward \d+\)$", out, re.M)
    ret = next(l for l in out.splitlines() if l.startswith("  return ("))
    if grad:   # the loss, then one gradient per parameter and none for the inputs
        names = ret[len("  return ("):-1].split(", ")
        assert names[0] == "value" and len(names) == 1 + len(ref)
        assert all(n.startswith("g") for n in names[1:]) and "gx" not in names and "gimage" not in names
        assert re.search(r"^# saved for backward: \d+ tensors, [\d.]+ [KMG]?i?B", out, re.M)
    else:
        assert ret == f"  return ({RETURNS[model]})"
        assert "# saved for backward" not in out


def test_sd15_unet_training_step_summary(capsys):
    rc, out, err = compile_cli(capsys, "--model", "sd15-unet", "--grad", "--summary")
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].startswith("def unet_grad(x:f32[1,4,64,64], timesteps:i64[1], context:f32[1,77,768], "
                               "target:f32[1,4,64,64]; ")
    assert "# parameters: 686 tensors, 859,520,964 values, 3.2 GiB" in lines
    assert any(l.startswith("# saved for backward: ") for l in lines)
    assert all(l.startswith("# ") for l in lines[1:]) and not any(map(is_equation, lines))


def test_sd15_clip_and_vae_sizes(capsys):
    rc, out, err = compile_cli(capsys, "--model", "sd15-clip", "--summary")
    assert rc == 0, err
    assert param_line(out) == (196, 123_060_480)
    # SD 1.5's VAE: 8x the latent side, 83,653,863 parameters (diffusers' AutoencoderKL, SD 1.5 config)
    rc, out, err = compile_cli(capsys, "--model", "sd15-vae", "--summary", "--batch", "2", "--latent-size", "32")
    assert rc == 0, err
    assert out.startswith("def vae(image:f32[2,3,256,256]; ")
    assert param_line(out)[1] == 83_653_863


def test_batch_and_latent_size_reach_the_inputs(capsys):
    rc, out, err = compile_cli(capsys, "--model", "sd15-unet", "--config", "tiny", "--batch", "3",
                               "--latent-size", "12", "--summary")
    assert rc == 0, err
    assert out.startswith("def unet(x:f32[3,4,12,12], timesteps:i64[3], context:f32[3,77,32]; ")


def test_summary_is_the_full_dumps_header_and_summary_lines(capsys):
    """For any target, not only presets: the built-in default (the MLP training step)."""
    rc, full, _ = compile_cli(capsys, "--schedule", "cpu")
    assert rc == 0
    rc, summary, err = compile_cli(capsys, "--schedule", "cpu", "--summary")
    assert rc == 0 and err == ""
    want = [l for l in full.splitlines() if l.startswith("def ") or re.match(r"# \S", l)]
    assert summary.splitlines() == want
    assert not any(" = " in l and is_equation(l) for l in summary.splitlines())
    for prefix in ("# nodes: ", "# parameters: ", "# saved for backward: ", "# schedule: ", "# memory: arena "):
        assert sum(l.startswith(prefix) for l in summary.splitlines()) == 1, prefix
    assert summary.endswith(cli.DEFAULT_NOTE)


def test_preset_schedule_reports_launches_and_arena(capsys):
    rc, out, err = compile_cli(capsys, "--model", "sd15-clip", "--config", "tiny", "--grad", "--schedule", "cpu")
    assert rc == 0, err
    assert re.search(r"^# schedule: \d+ launches \(\d+ library, \d+ generated\)$", out, re.M)
    assert re.search(r"^#   K0 ", out, re.M)
    assert re.search(r"^# memory: arena [\d.]+ [KMG]?i?B \(naive ", out, re.M)


@pytest.mark.parametrize("argv", [["--model", "sd15-unet2"], ["--model", "sd15-unet", "--config", "sd14"],
                                  ["--model", "sd15-unet", "--batch", "two"]])
def test_bad_preset_or_config_is_a_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "flame-compile: error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "sd15-clip", "--latent-size", "32"], "--latent-size does not apply to sd15-clip"),
    (["--model", "sd15-unet", "--latent-size", "30"], "the sd15 UNet needs a multiple of 8"),
    (["--model", "sd15-vae", "--latent-size", "0"], "--latent-size 0: must be at least 1"),
    (["--model", "sd15-unet", "--batch", "0"], "--batch 0: must be at least 1"),
    (["--model", "sd15-unet", "--arg", "x:f32[2]"], "--model replaces FILE.py:NAME"),
    ([cli.DEFAULT_TARGET, "--model", "sd15-unet"], "--model replaces FILE.py:NAME"),
    (["--config", "tiny"], "need --model"),
    ([cli.DEFAULT_TARGET, "--arg", "x:f32[32,4]", "--arg", "y:f32[32,1]", "--latent-size", "8"], "need --model"),
])
def test_preset_command_line_errors(capsys, argv, message):
    rc, out, err = compile_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("flame-compile: error: ") and message in err, err
