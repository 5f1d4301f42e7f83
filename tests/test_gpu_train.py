"""flame-train on the GPU: the quickstart's run with train.backend = "cuda" gives, step for
step, the losses and the LoRA of the same run on the CPU backend (same seed: the same data
order, timesteps and noise, since flame's random draws are the same on every backend).
Skipped without an NVIDIA GPU."""
import contextlib
import io
import json

import numpy as np
import pytest
from test_gpu import _have_gpu

from flame.cli import train as cli
from flame.train.export import load_lora

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _have_gpu(), reason="no NVIDIA GPU")]

STEPS = 12


def quickstart(folder, backend, *extra):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main(["--quickstart", str(folder), "--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=2",
                       "--set", f"train.backend={backend}", *extra])
    assert rc == 0, out.getvalue()
    res = folder / "output"
    losses = [json.loads(line)["loss"] for line in (res / "metrics.jsonl").read_text().splitlines()]
    return out.getvalue(), losses, load_lora(res / "flamequick.safetensors")[0]


# every image in one 64x64 bucket: one training graph to compile per backend
ONE_BUCKET = ("--set", "buckets.upscale=true", "--set", "buckets.min_size=64", "--set", "buckets.max_size=64")


def test_quickstart_on_cuda_equals_cpu(tmp_path):
    """All three buckets: three compiled steps on the GPU share the LoRA weights and moments,
    each must start from the others' newest values (tests/test_cuda_residency.py checks the
    bookkeeping without a GPU)."""
    said, gpu_losses, gpu_lora = quickstart(tmp_path / "gpu", "cuda", "--set", "train.base_dtype=f32")
    assert "backend: cuda" in said and "buckets: 48x64: 40, 64x48: 40, 64x64: 40" in said
    _, cpu_losses, cpu_lora = quickstart(tmp_path / "cpu", "cpu")
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=2e-3)
    assert set(gpu_lora) == set(cpu_lora)
    for k, v in cpu_lora.items():   # Adam's sign-like first steps: compare each tensor as a whole
        g, c = np.float32(gpu_lora[k]), np.float32(v)
        assert np.linalg.norm(g - c) <= 0.05 * np.linalg.norm(c), k


def test_quickstart_on_cuda_with_bf16_base_trains(tmp_path):
    said, losses, lora = quickstart(tmp_path / "bf16", "cuda", *ONE_BUCKET)
    assert "base weights stored as bf16" in said
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert all(np.isfinite(np.float32(v)).all() for v in lora.values())
