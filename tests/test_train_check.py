"""`flame-train --check` on a full-size SD 1.5 config: the dry run reads no weights (the
checkpoint here is a one-tensor stand-in), yet traces and plans the whole 512x512 training
step — the UNet's 859,520,964 weights stored as placeholders."""
import numpy as np
from PIL import Image

from flame.cli import train as cli
from flame.models.checkpoint import save_safetensors
from flame.train import config
from flame.train.check import dry_run

SD15_UNET_PARAMETERS = 859_520_964


def test_check_plans_a_full_sd15_step_without_weights(tmp_path, capsys):
    save_safetensors({"x": np.zeros(1, np.float32)}, str(tmp_path / "stand-in.safetensors"))
    (tmp_path / "img").mkdir()
    (tmp_path / "tok").mkdir()
    rng = np.random.default_rng()
    Image.fromarray(rng.integers(0, 256, (512, 640, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "a.txt").write_text("a photo")
    (tmp_path / "run.toml").write_text('[model]\ncheckpoint = "stand-in.safetensors"\ntokenizer = "tok"\n'
                                       '[[data]]\npath = "img"\n[network]\nrank = 4\n[train]\nsteps = 3\n'
                                       'backend = "cpu"\n')
    cfg = config.load(tmp_path / "run.toml")
    lines = []
    figures = dry_run(cfg, "run.toml", lines.append)
    (plan,) = figures["plans"]
    assert (plan["bucket"], plan["batch"]) == ("512x448", 1)      # kohya: 640x512 scaled to 572x458, floored to 64
    # f32 base weights plus the LoRA's weights and two AdamW moments, all float32
    assert SD15_UNET_PARAMETERS * 4 < plan["parameters"] < SD15_UNET_PARAMETERS * 4 + 64 << 20
    assert plan["arena"] > 1 << 30 and plan["kernels"] > 1000
    assert cli.main([str(tmp_path / "run.toml"), "--check"]) == 0
    assert "arena" in capsys.readouterr().out
