"""Checkpoints, resume and interrupts of flame-train, on the quickstart with every image in
one bucket: an uninterrupted run is the reference; a run killed by SIGKILL (a real child
process) and resumed, and a run stopped by Ctrl-C (SIGINT) and resumed, end bit for bit where
it ends — LoRA weights, AdamW moments and the loss of every step. An interrupted save leaves
the previous file readable; keep_last prunes; a changed config is refused with the difference."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train_helpers import run_cli
from flame.models import checkpoint
from flame.models.checkpoint import load_safetensors
from flame.train import state

STEPS = 8
ARGS = ["--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=2", "--set", "save.every_steps=2",
        "--set", "save.keep_last=2",
        # every image in the 64x64 bucket: one training graph, the one the quickstart test compiled
        "--set", "buckets.upscale=true", "--set", "buckets.min_size=64", "--set", "buckets.max_size=64"]


@pytest.fixture(scope="module")
def env(train_cache_dir):
    return {**os.environ, "FLAME_CACHE_DIR": str(train_cache_dir), "PYTHONUNBUFFERED": "1"}


def main(argv, env):
    rc, out, err = run_cli(argv, env["FLAME_CACHE_DIR"])
    return rc, out + err


def child(folder, env):
    return subprocess.Popen([sys.executable, "-m", "flame.cli.train", "--quickstart", str(folder), *ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc, metrics, step, timeout=900):
    """Block until metrics.jsonl has a line for `step` (the child is mid-run)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the child ended early ({proc.returncode}):\n{proc.stdout.read()}")
        if metrics.exists():
            lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the child did not reach step {step}")


def final_state(folder):
    out = folder / "output"
    params, opt, position, _ = state.load_state(str(out / "state" / f"flamequick-step{STEPS:06d}.state.safetensors"))
    lora = {k: np.array(v) for k, v in load_safetensors(str(out / "flamequick.safetensors")).items()}
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return params, opt, position, lora, losses


def assert_same_run(a, b):
    pa, oa, posa, la, lossa = a
    pb, ob, posb, lb, lossb = b
    assert posa == posb
    assert lossa == lossb and len(lossa) == STEPS
    for x, y in ((pa, pb), (oa, ob), (la, lb)):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    folder = tmp_path_factory.mktemp("straight") / "qs"
    rc, said = main(["--quickstart", str(folder), *ARGS], env)
    assert rc == 0, said
    return folder, final_state(folder), said


def test_periodic_checkpoints_and_keep_last(reference):
    folder, (params, opt, position, lora, losses), said = reference
    out = folder / "output"
    # every 2 steps a LoRA and a state; keep_last = 2 leaves steps 4 and 6 (8 is the final save)
    assert sorted(os.listdir(out / "state")) == [f"flamequick-step{s:06d}.state.safetensors" for s in (4, 6, 8)]
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == \
        ["flamequick-step000004.safetensors", "flamequick-step000006.safetensors", "flamequick.safetensors"]
    assert "removed" in said and "step000002" in said
    assert position["step"] == STEPS and position["micro"] == STEPS
    # the state's float32 weights are what the fp16 LoRA file holds, rounded
    assert set(params) == {k for k in lora if k.endswith(".weight")}    # named as in the file
    for k, p in params.items():
        assert p.dtype == np.float32 and lora[k].dtype == np.float16
        np.testing.assert_array_equal(lora[k], p.astype(np.float16))
    assert set(opt) == {f"{t}.{k}" for t in ("m", "v") for k in params}


def test_killed_run_resumes_bit_for_bit(reference, tmp_path, env):
    folder = tmp_path / "qs"
    proc = child(folder, env)
    wait_for_step(proc, folder / "output" / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGKILL)          # no chance to save: steps after the last save are lost
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert state.latest_state(str(folder / "output"), "flamequick").endswith("step000004.state.safetensors")
    rc, said = main(["--quickstart", str(folder), "--resume", *ARGS], env)
    assert rc == 0, said
    assert "resuming from" in said and "step 4" in said
    assert_same_run(final_state(folder), reference[1])


def test_ctrl_c_saves_and_resumes_bit_for_bit(reference, tmp_path, env):
    folder = tmp_path / "qs"
    proc = child(folder, env)
    wait_for_step(proc, folder / "output" / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, text
    assert "interrupted after step" in text and "continue with --resume" in text
    step = int(text.split("interrupted after step ")[1].split()[0])
    assert 3 <= step < STEPS
    out = folder / "output"
    assert (out / f"flamequick-step{step:06d}.safetensors").is_file()
    assert state.latest_state(str(out), "flamequick").endswith(f"step{step:06d}.state.safetensors")
    rc, said = main(["--quickstart", str(folder), "--resume", *ARGS], env)
    assert rc == 0, said
    assert_same_run(final_state(folder), reference[1])
    # resuming a finished run says so and changes nothing
    rc, said = main(["--quickstart", str(folder), "--resume", *ARGS], env)
    assert rc == 0 and "already finished at step 8" in said


def test_resume_refuses_a_changed_config(reference, env):
    folder = reference[0]
    rc, said = main(["--quickstart", str(folder), "--resume", *ARGS, "--set", "train.lr=0.002",
                     "--set", "network.rank=4", "--set", "save.name=flamequick"], env)
    assert rc == 1
    assert "cannot resume: the config differs" in said
    assert "train.lr: 0.001 (saved) -> 0.002 (now)" in said and "network.rank: 8 (saved) -> 4 (now)" in said


def test_resume_without_state_is_an_error(tmp_path, env):
    rc, said = main(["--quickstart", str(tmp_path / "qs"), "--resume", *ARGS, "--set", "save.name=other"], env)
    assert rc == 1 and "--resume: no training state in" in said and "'other'" in said


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    path = str(tmp_path / "ck.safetensors")
    old = {"w": rng.standard_normal((3, 5)).astype(np.float32)}
    checkpoint.save_safetensors(old, path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_safetensors({"w": rng.standard_normal((300, 500)).astype(np.float32)}, path)
    assert path in str(e.value) and "No space left" in str(e.value) and "unchanged" in str(e.value)
    assert os.listdir(tmp_path) == ["ck.safetensors"]            # no half-written temporary left
    np.testing.assert_array_equal(np.array(load_safetensors(path)["w"]), old["w"])


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(policy, tmp_path, env, monkeypatch):
    from flame.train import trainer
    real = trainer.Trainer.inputs
    calls = []

    def poisoned(self, batch):     # the third micro-batch's latents hold a NaN
        lat, ctx = real(self, batch)
        calls.append(1)
        if len(calls) == 3:
            lat = lat.copy()
            lat[0, 0, 0, 0] = np.nan
        return lat, ctx
    monkeypatch.setattr(trainer.Trainer, "inputs", poisoned)
    folder = tmp_path / "qs"
    rc, said = main(["--quickstart", str(folder), *ARGS, "--set", f"train.nonfinite={policy}"], env)
    recs = [json.loads(ln) for ln in (folder / "output" / "metrics.jsonl").read_text().splitlines()]
    if policy == "stop":
        assert rc == 1
        assert "step 3: the loss is nan" in said and "learning rate" in said
        assert "Last saved LoRA: " + str(folder / "output" / "flamequick-step000002.safetensors") in said
        assert [r["step"] for r in recs] == [1, 2]
        return
    assert rc == 0, said
    assert "step 3: the loss is nan" in said and "update skipped" in said
    assert recs[2] == {**recs[2], "loss": None, "skipped": True}
    assert all(np.isfinite(r["loss"]) for r in recs if r["step"] != 3) and len(recs) == STEPS
    lora = load_safetensors(str(folder / "output" / "flamequick.safetensors"))
    assert all(np.isfinite(np.array(v, np.float32)).all() for v in lora.values())


def test_check_plans_what_the_run_uses(reference, env, monkeypatch):
    """--check's dataset figures and planned arena per training graph equal those of the
    run's own compiled step (the 64x64 graph is in the shared kernel cache by now)."""
    from flame.train import config, trainer
    from flame.train.check import dry_run
    monkeypatch.setenv("FLAME_CACHE_DIR", env["FLAME_CACHE_DIR"])
    folder = reference[0]
    sets = [a for a in ARGS if a != "--set"]
    cfg = config.load(folder / "quickstart.toml", sets, output=str(folder / "check-out"))
    lines = []
    figures = dry_run(cfg, "quickstart.toml", lines.append)
    said = "\n".join(lines)
    assert "no weights are read" in said and "captions: 12 of 12" in said
    tr = trainer.Trainer(cfg, "quickstart.toml", quiet=True)
    tr.prepare()
    assert figures["images"] == len(tr.ds.records) and figures["skipped"] == len(tr.ds.skipped)
    assert figures["buckets"] == {"64x64": 120}
    assert figures["micro_batches_per_epoch"] == len(trainer.data.epoch_batches(tr.ds, cfg, 0))
    (plan,) = figures["plans"]
    assert (plan["bucket"], plan["batch"]) == ("64x64", 2)
    c = tr.step.compile_for((2, 4, 32, 32), (2, 77, 32))
    assert plan["arena"] == c.runner.plan.peak > 0
    assert plan["kernels"] == len(c.runner.steps)
    tr.log.close()
    # and from the command line
    rc, out = main(["--quickstart", str(folder), *ARGS, "--check"], env)
    assert rc == 0 and "arena" in out and "check done" in out
