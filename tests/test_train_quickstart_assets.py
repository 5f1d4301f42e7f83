"""The quickstart's files: captioned synthetic images whose captions say what is drawn, a
random tiny SD 1.x checkpoint in the original layout that flame's loaders and diffusers' own
single-file converters both read (and agree on), a CLIP vocabulary giving transformers'
CLIPTokenizer's ids, all a function of the seed."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from flame.models import load_text_encoder, load_tokenizer, load_unet, load_vae
from flame.models.checkpoint import load_safetensors, metadata
from flame.models.configs import TINY_UNET, TINY_VAE
from flame.models.configs_clip import TINY_TEXT
from flame.train.quickstart_assets import COLORS, WORDS, write_quickstart

CAPTION = re.compile(r"^(?:an? (\w+) (circle|square|triangle) on a (\w+) background|(\w+) and (\w+) (stripes))$")


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    return write_quickstart(tmp_path_factory.mktemp("qs") / "quick", seed=0)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_images_and_captions(qs):
    files = os.listdir(qs["image_dir"])
    pngs = sorted(f for f in files if f.endswith(".png"))
    assert 8 <= len(pngs) <= 16 and len(files) == 2 * len(pngs)
    assert os.path.basename(qs["image_dir"]) == f"{qs['repeats']}_{qs['trigger']}"
    assert os.path.dirname(qs["image_dir"]) == qs["data"]
    ratios, shapes = set(), set()
    for png in pngs:
        im = Image.open(os.path.join(qs["image_dir"], png))
        assert im.mode == "RGB" and 96 <= min(im.size) and max(im.size) <= 256
        ratios.add(round(im.width / im.height, 2))
        text = read(os.path.join(qs["image_dir"], png[:-4] + ".txt")).decode("utf-8")
        m = CAPTION.match(text)
        assert m, text
        fg, shape, bg = (m[1], m[2], m[3]) if m[1] else (m[4], m[6], m[5])
        shapes.add(shape)
        a = np.asarray(im).reshape(-1, 3)
        colors, counts = np.unique(a, axis=0, return_counts=True)
        # exactly the two colours the caption names (PNG is lossless, shapes are not antialiased)
        assert {tuple(c) for c in colors} == {COLORS[fg], COLORS[bg]}, text
        if shape != "stripes":     # a shape covers less than the background
            assert tuple(colors[np.argmax(counts)]) == COLORS[bg], text
    assert len(ratios) >= 3 and shapes == {"circle", "square", "triangle", "stripes"}
    assert [os.path.basename(p) for p in qs["images"]] == pngs


def test_checkpoint_loads_and_matches_diffusers_conversion(qs):
    torch = pytest.importorskip("torch")
    sf = pytest.importorskip("diffusers.loaders.single_file_utils")
    path = qs["checkpoint"]
    meta = metadata(path)
    assert meta["flame.quickstart"] == "random" and "RANDOM" in meta["description"]
    raw = load_safetensors(path)
    assert {k.split(".")[0] for k in raw} == {"model", "first_stage_model", "cond_stage_model"}
    for k in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.output_blocks.5.1.proj_out.weight", "model.diffusion_model.out.2.weight",
              "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.1.upsample.conv.weight",
              "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
              "cond_stage_model.transformer.text_model.embeddings.position_ids"):
        assert k in raw, k
    assert raw["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)

    ck = {k: torch.from_numpy(np.array(v)) for k, v in raw.items()}
    want = [sf.convert_ldm_unet_checkpoint(ck, TINY_UNET.to_diffusers()),
            sf.convert_ldm_vae_checkpoint(ck, TINY_VAE.to_diffusers()),
            sf.convert_ldm_clip_checkpoint(ck)]
    got = [load_unet(path, config=TINY_UNET), load_vae(path, config=TINY_VAE),
           load_text_encoder(path, config=TINY_TEXT)]
    for ref, model in zip(want, got):
        sd = model.state_dict()
        ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
        assert set(ref) == set(sd)
        for k, v in sd.items():
            assert np.array_equal(ref[k].numpy().reshape(v.shape), v), k
    weights = [v for k, v in got[0].state_dict().items() if k.endswith("weight") and v.ndim > 1]
    assert all(np.std(w) > 0 for w in weights)      # random, not empty


def test_tokenizer_matches_transformers(qs):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer(os.path.join(qs["tokenizer"], "vocab.json"),
                                     os.path.join(qs["tokenizer"], "merges.txt"))
    tok = load_tokenizer(qs["tokenizer"])
    texts = qs["captions"] + [f"{qs['trigger']}, " + c for c in qs["captions"]] + ["A Yellow CIRCLE!"]
    ids = tok.encode(texts)
    want = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert np.array_equal(ids, want)
    assert ids.max() < TINY_TEXT.vocab_size and (ids[:, 0] == 49406).all()
    assert len(json.loads(read(os.path.join(qs["tokenizer"], "vocab.json")))) == TINY_TEXT.vocab_size
    for w in WORDS:      # every caption word is one token
        row = tok.encode(w)[0]
        assert row[0] == 49406 and row[2] == 49407 and row[1] < 49406, w
    assert tok.decode(ids[0]) == qs["captions"][0]


def test_same_seed_same_files_other_seed_other_files(qs, tmp_path):
    again = write_quickstart(tmp_path / "a", seed=0)
    other = write_quickstart(tmp_path / "b", seed=1)
    files = all_files(qs["root"])
    assert files == all_files(again["root"]) == all_files(other["root"])
    differ = []
    for f in files:
        a = read(os.path.join(qs["root"], f))
        assert a == read(os.path.join(again["root"], f)), f
        differ += [f] if a != read(os.path.join(other["root"], f)) else []
    assert os.path.relpath(qs["checkpoint"], qs["root"]) in differ
    assert sum(f.endswith(".png") for f in differ) >= len(qs["images"]) - 1
