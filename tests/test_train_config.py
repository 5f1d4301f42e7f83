"""The trainer's config: unknown keys named with a suggestion, --set overrides, every value
checked before anything heavy starts, and the resolved config written back as TOML that
loads to the same thing."""
import os
import tomllib

import pytest

from flame.train import config as C

BASE = """\
[model]
checkpoint = "model.safetensors"
tokenizer = "tok"

[[data]]
path = "images/10_thing"
trigger = "thing"

[train]
steps = 50
lr = 2e-4
lr_scheduler = "cosine"
warmup_steps = 5
"""


def write(tmp_path, text=BASE, name="run.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_filled_and_paths_relative_to_the_config(tmp_path):
    cfg = C.load(write(tmp_path))
    assert cfg["model"]["checkpoint"] == os.path.join(str(tmp_path), "model.safetensors")
    assert cfg["data"][0]["path"] == os.path.join(str(tmp_path), "images", "10_thing")
    assert cfg["save"]["output_dir"] == os.path.join(str(tmp_path), "output")
    assert cfg["train"]["lr"] == 2e-4 and cfg["train"]["steps"] == 50
    # every key of every section present, defaults from KEYS
    for s, keys in C.KEYS.items():
        tables = cfg[s] if s in C.LIST_SECTIONS else [cfg[s]]
        for t in tables:
            assert set(t) == set(keys)
    assert cfg["network"]["rank"] == C.KEYS["network"]["rank"].default
    assert cfg["data"][0]["missing_caption"] == "error"


@pytest.mark.parametrize("text, needle", [
    (BASE.replace("lr = 2e-4", "learning_rate = 2e-4"), "unknown key train.learning_rate"),
    (BASE.replace("steps = 50", "stpes = 50"), "did you mean 'steps'?"),
    (BASE.replace('trigger = "thing"', 'triger = "thing"'), "data[0].triger (did you mean 'trigger'?)"),
    (BASE + "\n[netwrok]\nrank = 4\n", "unknown section [netwrok] (did you mean 'network'?)"),
])
def test_misspelled_key_is_named_with_a_suggestion(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(C.ConfigError) as e:
        C.load(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_set_overrides_and_output(tmp_path):
    out = tmp_path / "elsewhere"
    cfg = C.load(write(tmp_path), ["train.lr=1e-3", "train.steps=7", "network.rank=4",
                                   "data.0.repeats=3", "data.flip=true", "save.name=my lora"],
                 output=str(out))
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["steps"] == 7
    assert cfg["network"]["rank"] == 4
    assert cfg["data"][0]["repeats"] == 3 and cfg["data"][0]["flip"] is True
    assert cfg["save"]["name"] == "my lora"            # a bare value is read as a string
    assert cfg["save"]["output_dir"] == str(out)


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "unknown key train.stepz (did you mean 'steps'?)"),
    ("trian.steps=3", "unknown section 'trian' (did you mean 'train'?)"),
    ("train.steps", "write section.key=value"),
    ("data.4.path=x", "there are 1 [[data]] tables"),
])
def test_bad_overrides(tmp_path, override, needle):
    with pytest.raises(C.ConfigError) as e:
        C.load(write(tmp_path), [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("train.steps=0", "train.steps = 0: must be >= 1"),
    ("train.steps=2.5", "train.steps = 2.5: must be an integer"),
    ("train.lr=\"fast\"", "train.lr = 'fast': must be a number"),
    ("train.lr_scheduler=\"cosin\"", "did you mean 'cosine'?"),
    ("train.warmup_steps=50", "train.warmup_steps = 50 is not below train.steps = 50"),
    ("train.betas=[0.9]", "train.betas = [0.9]: two numbers in [0, 1)"),
    ("train.timestep_min=1000", "train.timestep_min = 1000 must be below train.timestep_max = 1000"),
    ("network.alpha=0", "network.alpha = 0.0: must be > 0"),
    ("network.text_encoder_rank=4", "network.text_encoder_rank is set but network.train_text_encoder is false"),
    ("data.caption_dropout=1.5", "data[0].caption_dropout = 1.5: must be <= 1"),
    ("data.missing_caption=\"trigger\"", None),
    ("data.flip=1", "data[0].flip = 1: must be true or false"),
    ("buckets.crop=\"random\"", "needs train.cache_latents = false"),
    ("buckets.step=12", "buckets.step = 12 must be a multiple of 8"),
    ("buckets.min_size=2048", "step <= min_size <= resolution <= max_size"),
    ("save.name=\"a/b\"", "must be a plain file name"),
])
def test_values_validated(tmp_path, override, needle):
    if needle is None:      # trigger policy with a trigger set: valid
        C.load(write(tmp_path), [override])
        with pytest.raises(C.ConfigError, match="needs data\\[0\\].trigger"):
            C.load(write(tmp_path), [override, "data.trigger=\"\""])
        return
    with pytest.raises(C.ConfigError) as e:
        C.load(write(tmp_path), [override])
    assert needle in str(e.value)


def test_structure_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="no \\[\\[data\\]\\] table"):
        C.load(write(tmp_path, BASE.split("[[data]]")[0]))
    with pytest.raises(C.ConfigError, match="model.checkpoint is missing"):
        C.load(write(tmp_path, BASE.replace('checkpoint = "model.safetensors"\n', "")))
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(write(tmp_path, BASE + "\n[train\n"))
    with pytest.raises(C.ConfigError, match="no such config file"):
        C.load(tmp_path / "absent.toml")


def test_check_paths_names_the_missing_thing(tmp_path):
    cfg = C.load(write(tmp_path))
    with pytest.raises(C.ConfigError, match="model.checkpoint = .*model.safetensors: no such file"):
        C.check_paths(cfg, "run.toml")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(C.ConfigError, match="model.tokenizer = .*tok: no such file"):
        C.check_paths(cfg, "run.toml")
    (tmp_path / "tok").mkdir()
    with pytest.raises(C.ConfigError, match="data\\[0\\].path = .*10_thing: no such folder"):
        C.check_paths(cfg, "run.toml")
    (tmp_path / "images" / "10_thing").mkdir(parents=True)
    C.check_paths(cfg, "run.toml")
    (tmp_path / "old.ckpt").write_bytes(b"x")
    cfg2 = C.load(write(tmp_path), ["model.checkpoint=old.ckpt"])
    with pytest.raises(C.ConfigError, match="a pickle file; flame reads safetensors only"):
        C.check_paths(cfg2)


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load(write(tmp_path), ["network.train_text_encoder=true", "train.text_encoder_lr=5e-5"])
    text = C.to_toml(cfg)
    tomllib.loads(text)   # valid TOML
    again = C.load(write(tmp_path, text, "resolved.toml"))
    assert again == cfg
