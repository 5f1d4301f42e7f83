"""The CLIP text encoder and tokenizer against transformers: a small random CLIPTextModel saved
in every key layout flame reads (transformers 5's save_pretrained, the Hub's `text_model.*`,
the original SD single file, its older form), loaded by load_text_encoder, run by the
reference interpreter on fresh random ids; clip_skip, gradients, the full-size SD 1.5 layout;
the tokenizer's ids against transformers.CLIPTokenizer on a small vocabulary made here;
damaged and mismatched files."""
import collections
import json
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
st = pytest.importorskip("safetensors.torch")

import flame  # noqa: E402
from flame.models import load_text_encoder, load_tokenizer  # noqa: E402
from flame.models.checkpoint import CheckpointError  # noqa: E402
from flame.models.clip import CLIPTextModel  # noqa: E402
from flame.models.configs_clip import SD15_TEXT, TINY_TEXT, CLIPTextConfig  # noqa: E402
from flame.models.configs import ConfigError  # noqa: E402
from flame.models.loading_clip import to_flame_keys  # noqa: E402
from flame.nn import StateDictError  # noqa: E402
from flame.nn.init import shape_only  # noqa: E402

TOL = 1e-4
CFG = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4)
LDM = "cond_stage_model.transformer."


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def torch_clip(cfg, seed):
    """transformers' model with every weight random: matrices ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    m = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers()))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "embedding" in name:
                p.copy_(r)
            elif p.ndim > 1:
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(1 + 0.1 * r if "norm" in name and name.endswith("weight") else 0.1 * r)
    return m.eval()


def hub_keys(tm):
    """name -> tensor with the `text_model.` prefix the Hub's (transformers 4) files have,
    whichever transformers made tm."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
            for k, v in tm.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tm = torch_clip(CFG, 0)
    tm.save_pretrained(root / "pipe" / "text_encoder", safe_serialization=True)
    hub = hub_keys(tm)
    pos = torch.arange(CFG.max_position_embeddings)[None]
    # the Hub layout with the position_ids buffer older transformers saved
    (root / "hub").mkdir()
    shutil.copy(root / "pipe" / "text_encoder" / "config.json", root / "hub" / "config.json")
    st.save_file({**hub, "text_model.embeddings.position_ids": pos}, root / "hub" / "model.safetensors")
    # an original-layout SD checkpoint: text encoder beside (stand-in) UNet and VAE tensors,
    # position_ids stored as floats as some merged checkpoints have them
    other = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
             "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3)}
    st.save_file({**{LDM + k: v for k, v in hub.items()}, **other,
                  LDM + "text_model.embeddings.position_ids": pos.float() - 1e-4}, root / "sd.safetensors")
    # the older original layout, without text_model.
    st.save_file({LDM + k[len("text_model."):]: v for k, v in hub.items()}, root / "sd_old.safetensors")
    return {"root": root, "tm": tm}


def ids_for(cfg, seed, dtype=np.int64, batch=2):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.max_position_embeddings)).astype(dtype)


def run(model, ids):
    return flame.compile(model, ids, backend="interp")(ids)


LAYOUTS = [  # (name, path under the fixture root, config argument)
    ("transformers 5 folder", "pipe/text_encoder", None),
    ("pipeline root", "pipe", None),
    ("Hub folder (text_model.*, position_ids)", "hub", None),
    ("Hub file, sibling config.json", "hub/model.safetensors", None),
    ("SD single file", "sd.safetensors", CFG),
    ("older SD single file", "sd_old.safetensors", CFG.__dict__),
]


@pytest.mark.parametrize("name,sub,cfg", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_forward_matches_transformers(files, name, sub, cfg):
    model = load_text_encoder(files["root"] / sub, config=cfg)
    assert model.config == CFG
    ids = ids_for(CFG, [l[0] for l in LAYOUTS].index(name), np.int32 if "older" in name else np.int64)
    with torch.no_grad():
        want = files["tm"](torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    got = run(model, ids)
    assert got.shape == (2, 77, CFG.hidden_size) and got.dtype == np.float32
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip(files, clip_skip):
    """clip_skip=k: transformers' hidden_states[-k] through its final_layer_norm (kohya/ComfyUI)."""
    tm = files["tm"]
    ids = ids_for(CFG, 10 + clip_skip)
    with torch.no_grad():
        hs = tm(torch.from_numpy(ids), output_hidden_states=True).hidden_states
        assert len(hs) == CFG.num_hidden_layers + 1
        want = tm.final_layer_norm(hs[-clip_skip]).numpy()
    model = load_text_encoder(files["root"] / "pipe", clip_skip=clip_skip)
    assert rel_err(run(model, ids), want) < TOL


def test_short_sequence_and_gelu(tmp_path):
    """hidden_act='gelu' (exact erf GELU) and fewer than max positions."""
    cfg = CLIPTextConfig(**{**CFG.__dict__, "hidden_act": "gelu", "num_hidden_layers": 2})
    tm = torch_clip(cfg, 3)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    model = load_text_encoder(tmp_path)
    assert model.config == cfg
    ids = ids_for(cfg, 4)[:, :20]
    with torch.no_grad():
        want = tm(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert rel_err(run(model, ids), want) < TOL


GRADS = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
         "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.1.mlp.fc1.bias",
         "text_model.encoder.layers.2.layer_norm1.weight", "text_model.final_layer_norm.bias"]


def test_gradients_match_torch(files):
    model = load_text_encoder(files["root"] / "pipe")
    params = dict(model.named_parameters())
    ids = ids_for(CFG, 20)
    w = np.random.default_rng(21).standard_normal((2, 77, CFG.hidden_size)).astype(np.float32)

    def loss(ids):
        return (model(ids) * w).sum()
    value, grads = flame.compile(flame.value_and_grad(loss, params={n: params[n] for n in GRADS}), ids)(ids)
    tm = files["tm"]
    tm.zero_grad()
    ref = (tm(torch.from_numpy(ids)).last_hidden_state * torch.from_numpy(w)).sum()
    ref.backward()
    tp = {("text_model." + k if not k.startswith("text_model.") else k): p for k, p in tm.named_parameters()}
    assert abs(float(value) - ref.item()) <= TOL * abs(ref.item())
    for n in GRADS:
        assert rel_err(grads[n], tp[n].grad.numpy()) < TOL, n


def test_full_size_layout():
    """SD 1.5's text encoder: flame's keys and shapes (built shape-only, no memory) are
    transformers' (on torch's meta device), and every key layout maps onto them."""
    with torch.device("meta"):
        tm = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT.to_transformers()))
    want = {k: tuple(v.shape) for k, v in hub_keys(tm).items()}
    with shape_only():
        model = CLIPTextModel(SD15_TEXT)
    got = {k: v.shape for k, v in model.state_dict().items()}
    assert list(got) == list(want) and got == want
    assert model.num_parameters() == sum(p.numel() for p in tm.parameters()) == 123_060_480
    bare = {k[len("text_model."):]: v for k, v in want.items()}
    for layout, sd in [("hf", dict(want, **{"text_model.embeddings.position_ids": (1, 77)})),
                       ("hf5", bare),
                       ("ldm", {LDM + k: v for k, v in want.items()}),
                       ("ldm", {LDM + k: v for k, v in bare.items()})]:
        mapped, found = to_flame_keys(sd)
        assert found == layout and mapped == want
    # the original layout is the one diffusers' single-file converter reads
    sf = pytest.importorskip("diffusers.loaders.single_file_utils")
    assert sf.convert_ldm_clip_checkpoint({LDM + k: v for k, v in want.items()}) == want


def test_sd15_config_from_its_config_json():
    # the fields of SD 1.5's text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
    d = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
         "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
         "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
         "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
         "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
         "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408}
    assert CLIPTextConfig.from_dict(d) == SD15_TEXT
    assert CLIPTextConfig.from_dict({"text_config": d}) == SD15_TEXT
    assert TINY_TEXT.vocab_size == SD15_TEXT.vocab_size and TINY_TEXT.hidden_size == 32
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")


# ---------------------------------------------------------------- damaged and mismatched files


def test_bad_files(files, tmp_path):
    good = files["root"] / "hub" / "model.safetensors"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_text_encoder(ckpt)
    (tmp_path / "bin" / "text_encoder").mkdir(parents=True)
    (tmp_path / "bin" / "text_encoder" / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle"):
        load_text_encoder(tmp_path / "bin")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(cut))}: truncated"):
        load_text_encoder(cut, config=CFG)
    with pytest.raises(CheckpointError, match="no such file"):
        load_text_encoder(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_text_encoder(tmp_path)


def test_unet_file_is_reported(tmp_path):
    unet = tmp_path / "unet.safetensors"
    st.save_file({"down_blocks.0.resnets.0.conv1.weight": torch.randn(8, 4, 3, 3),
                  "time_embedding.linear_1.weight": torch.randn(16, 8)}, unet)
    with pytest.raises(StateDictError) as e:
        load_text_encoder(unet)
    msg = str(e.value)
    assert str(unet) in msg and "missing keys" in msg and "unexpected keys (2)" in msg
    assert "time_embedding.linear_1.weight" in msg and "load_unet" in msg


def test_wrong_config_and_openclip(files, tmp_path):
    with pytest.raises(StateDictError, match=r"(?s)wrong shape for text_model.embeddings.token_embedding"
                                             r".*\[49408, 768\].*\[1000, 32\].*pass config="):
        load_text_encoder(files["root"] / "sd.safetensors")
    sd2 = tmp_path / "sd2.safetensors"
    st.save_file({"cond_stage_model.model.token_embedding.weight": torch.randn(4, 4)}, sd2)
    with pytest.raises(CheckpointError, match="OpenCLIP"):
        load_text_encoder(sd2)
    model = load_text_encoder(files["root"] / "pipe", clip_skip=CFG.num_hidden_layers + 1)
    with pytest.raises(ValueError, match="clip_skip=4"):
        run(model, ids_for(CFG, 0))
    model.clip_skip = 1
    with pytest.raises(flame.ShapeError, match="token ids"):
        run(model, np.zeros((1, 78), np.int64))


# ---------------------------------------------------------------- tokenizer


def bytes_to_unicode():
    """CLIP's byte -> printable character table (as in openai/CLIP's simple_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


CORPUS = ["a photo of a cat sitting on the mat, highly detailed", "the quick brown fox jumps over the lazy dog",
          "a painting of a castle in the mountains, trending on artstation", "portrait of a smiling woman",
          "isn't it the best thing they've seen"]


def write_vocab(folder, n_merges=80):
    """A CLIP-format vocabulary: the 256 byte characters, their `</w>` forms, merges learnt by
    plain BPE on CORPUS's words, then <|startoftext|> and <|endoftext|>."""
    b2u = bytes_to_unicode()
    words = collections.Counter(w for line in CORPUS for w in re.findall(r"[a-z]+", line))
    seqs = {w: [b2u[b] for b in w.encode()] for w in words}
    for s in seqs.values():
        s[-1] += "</w>"
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for pair in zip(s, s[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for s in seqs.values():
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1
    vocab = list(b2u.values())
    vocab += [v + "</w>" for v in vocab] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(vocab)


CAPTIONS = [
    "a photo of a cat sitting on the mat",
    "A PHOTO of The Quick Brown FOX!!!",
    "portrait, (smiling:1.2), [woman]; highly-detailed... #art @artist 100% $5",
    "isn't it the best thing they've seen? I'm sure we'll see, you'd agree",
    "café naïve résumé Ærøskøbing straße",
    "cafe\u0301 man\u0303ana",                    # decomposed accents: NFC composes them
    "東京タワーの写真, 猫 🐱🔥 emoji 👩‍🎨 and ½ ² ①",
    "  multiple   spaces\n\nnewlines\tand tabs  ",
    "",
    "<|endoftext|> inside <|startoftext|> a caption",
    "numbers 1234567 and 3.14",
    " ".join(CORPUS * 3),                         # needs truncation
    "x" * 300,
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "pipe" / "tokenizer"
    write_vocab(d)
    return d


def reference_ids(tok, captions):
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


def test_tokenizer_matches_transformers(vocab_dir, tmp_path):
    ref = transformers.CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))
    want = reference_ids(ref, CAPTIONS)
    # the tokenizer folder, the pipeline root, and a folder with only tokenizer.json
    ref.save_pretrained(tmp_path / "json")
    assert not (tmp_path / "json" / "vocab.json").exists()
    for path in (vocab_dir, vocab_dir.parent, tmp_path / "json"):
        tok = load_tokenizer(path)
        got = tok.encode(CAPTIONS)
        assert got.dtype == np.int64 and got.shape == (len(CAPTIONS), 77)
        np.testing.assert_array_equal(got, want, err_msg=str(path))
    eos = tok.eos_id
    assert (want[-2:, 76] == eos).all() and (want[-2:, 75] != eos).all()   # the long ones were cut
    np.testing.assert_array_equal(tok.encode(CAPTIONS[1]), want[1:2])
    for c in CAPTIONS[:6]:
        assert tok.decode(tok.encode(c)) == ref.decode(ref(c).input_ids, skip_special_tokens=True)


def test_tokenizer_pad_token_from_config(vocab_dir, tmp_path):
    """SD 2.x style: tokenizer_config.json says pad_token '!' (id 0)."""
    d = tmp_path / "tokenizer"
    shutil.copytree(vocab_dir, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!", "model_max_length": 77}))
    ref = transformers.CLIPTokenizer.from_pretrained(str(d))
    tok = load_tokenizer(d)
    assert tok.pad_id == 0 == ref.pad_token_id
    np.testing.assert_array_equal(tok.encode(CAPTIONS), reference_ids(ref, CAPTIONS))


def test_tokenizer_then_encoder(vocab_dir, files):
    """ids from the tokenizer run through the encoder as transformers' pipeline would."""
    ref = transformers.CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))
    ids = load_tokenizer(vocab_dir).encode(CAPTIONS[:2])
    assert ids.max() < CFG.vocab_size
    with torch.no_grad():
        want = files["tm"](torch.from_numpy(reference_ids(ref, CAPTIONS[:2]))).last_hidden_state.numpy()
    assert rel_err(run(load_text_encoder(files["root"] / "pipe"), ids), want) < TOL


def test_tokenizer_errors(tmp_path):
    from flame.models.tokenizer import TokenizerError
    with pytest.raises(TokenizerError, match="no vocab.json"):
        load_tokenizer(tmp_path)
    write_vocab(tmp_path / "t")
    v = json.loads((tmp_path / "t" / "vocab.json").read_text(encoding="utf-8"))
    del v["<|startoftext|>"]
    (tmp_path / "t" / "vocab.json").write_text(json.dumps(v), encoding="utf-8")
    with pytest.raises(TokenizerError, match="no <\\|startoftext\\|>"):
        load_tokenizer(tmp_path / "t")
