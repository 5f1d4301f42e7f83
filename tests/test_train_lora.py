"""LoRA (train/lora.py) and the LoRA file (train/export.py) against independent references:
one step's LoRA gradients against diffusers' UNet with the same LoRA through PEFT; a saved file
loaded by diffusers' own kohya-format loader changes the UNet and the text encoder exactly as
flame's injected modules do; the file's keys, shapes, dtypes and metadata read back with the
safetensors package; the layers against torch with bf16-stored base weights; errors."""
import datetime
import hashlib
import json
import struct

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors")
import safetensors.torch  # noqa: E402

import flame  # noqa: E402
import flame.nn as nn  # noqa: E402
import flame.nn.functional as F  # noqa: E402
from flame.models import load_text_encoder, load_unet  # noqa: E402
from flame.models.configs import TINY_UNET  # noqa: E402
from flame.models.configs_clip import TINY_TEXT  # noqa: E402
from flame.models.unet import UNet2DConditionModel  # noqa: E402
from flame.train.export import apply_lora, load_lora, save_lora  # noqa: E402
from lora_reference import kohya_reference  # noqa: E402
from flame.train.lora import (LORA_TYPES, LoRAConv2d, LoRAError, LoRALinear, inject_lora,  # noqa: E402
                              inject_lora_text_encoder, lora_parameters)

TOL = 1e-4
rng = np.random.default_rng()


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def randomize(model, seed):
    """Every parameter random (diffusers zero-inits proj_out): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model.eval()


def torch_unet(seed=0):
    return randomize(diffusers.UNet2DConditionModel(**TINY_UNET.to_diffusers()), seed)


def torch_clip(seed=1):
    return randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT.to_transformers())), seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny UNet and CLIP saved as diffusers/transformers folders (flame loads them)."""
    root = tmp_path_factory.mktemp("lora")
    torch_unet().save_pretrained(root / "unet", safe_serialization=True)
    torch_clip().save_pretrained(root / "te", safe_serialization=True)
    return root


def random_up(modules, scale=0.2):
    """Non-zero up weights, so the adapters act and both weights get gradients."""
    for m in modules.values():
        m.lora_up.weight.data = (scale * rng.standard_normal(m.lora_up.weight.shape)).astype(np.float32)


def unet_inputs(b=2):
    x = rng.standard_normal((b, 4, 8, 8)).astype(np.float32)
    t = rng.uniform(0, 999, b).astype(np.float32)
    c = rng.standard_normal((b, 5, TINY_UNET.cross_attention_dim)).astype(np.float32)
    return x, t, c


def paths(model):
    """{module path: LoRA module}: the diffusers names PEFT targets."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LORA_TYPES)}


# ---------------------------------------------------------------- (a) gradients against PEFT


def test_one_step_lora_gradients_match_diffusers_with_peft(base):
    unet = load_unet(base / "unet")
    flame.manual_seed(int(rng.integers(1 << 30)))
    mods = inject_lora(unet, 4, 2.0, conv_rank=2, conv_alpha=3.0)   # LoCon too: conv scale 1.5
    random_up(mods)
    where = paths(unet)
    conv = [p for p, m in where.items() if isinstance(m, LoRAConv2d) and m.kernel_size != (1, 1)]
    assert conv and len(where) == len(mods)

    tu = torch_unet()
    tu.add_adapter(peft.LoraConfig(r=4, lora_alpha=2.0, target_modules=list(where),
                                   rank_pattern={p: 2 for p in conv}, alpha_pattern={p: 3.0 for p in conv}))
    with torch.no_grad():
        for p, m in where.items():
            layer = tu.get_submodule(p)
            assert layer.scaling["default"] == m.scale, p
            layer.lora_A["default"].weight.copy_(torch.from_numpy(m.lora_down.weight.data))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(m.lora_up.weight.data))

    x, t, c = unet_inputs()
    y = rng.standard_normal(x.shape).astype(np.float32)
    step = flame.value_and_grad(lambda x, t, c, y: F.mse_loss(unet(x, t, c), y), params=lora_parameters(mods))
    loss, grads = flame.compile(step, x, t, c, y)(x, t, c, y)
    ref = torch.nn.functional.mse_loss(tu(*map(torch.from_numpy, (x, t, c))).sample, torch.from_numpy(y))
    ref.backward()
    assert abs(float(loss) - ref.item()) <= TOL * ref.item()
    assert len(grads) == 2 * len(mods)
    name_of = {id(m): n for n, m in mods.items()}
    for p, m in where.items():
        layer = tu.get_submodule(p)
        for suffix, tp in (("lora_down.weight", layer.lora_A["default"].weight),
                           ("lora_up.weight", layer.lora_B["default"].weight)):
            g, want = grads[f"{name_of[id(m)]}.{suffix}"], tp.grad.numpy()
            assert g.shape == want.shape and np.abs(want).max() > 0, (p, suffix)
            assert rel_err(g, want) < TOL, (p, suffix, rel_err(g, want))


# ---------------------------------------------------------------- (b) diffusers' own loader


def test_saved_lora_loaded_by_diffusers_changes_models_as_flame_does(base, tmp_path):
    unet, te = load_unet(base / "unet"), load_text_encoder(base / "te")
    flame.manual_seed(int(rng.integers(1 << 30)))
    mods = inject_lora(unet, 4, 2.0, conv_rank=2, conv_alpha=3.0)
    tmods = inject_lora_text_encoder(te, 3, 1.5)
    random_up(mods)
    random_up(tmods)
    path = tmp_path / "flame-lora.safetensors"
    save_lora(path, {**mods, **tmods}, {"ss_tag_frequency": {"1_cat": {"cat": 2}}}, dtype="fp32")

    pipe = diffusers.StableDiffusionPipeline
    sd, alphas = pipe.lora_state_dict(str(path))
    assert len(sd) == 2 * (len(mods) + len(tmods))   # every adapter converted, none dropped

    tu, tm = torch_unet(), torch_clip()
    x, t, c = unet_inputs()
    ids = rng.integers(0, TINY_TEXT.vocab_size, (2, 7))
    with torch.no_grad():
        u0 = tu(*map(torch.from_numpy, (x, t, c))).sample.numpy()
        e0 = tm(torch.from_numpy(ids)).last_hidden_state.numpy()
    pipe.load_lora_into_unet(sd, alphas, tu)
    pipe.load_lora_into_text_encoder(sd, alphas, tm)
    with torch.no_grad():
        u1 = tu(*map(torch.from_numpy, (x, t, c))).sample.numpy()
        e1 = tm(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert rel_err(u0, u1) > 0.05 and rel_err(e0, e1) > 0.05   # the LoRA does change both
    assert rel_err(flame.compile(unet, x, t, c)(x, t, c), u1) < TOL
    assert rel_err(flame.compile(te, ids)(ids), e1) < TOL


# ---------------------------------------------------------------- (c) the file format


TE_KEYS = [f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(TINY_TEXT.num_hidden_layers)
           for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                     "mlp_fc1", "mlp_fc2")]
SPOT = {   # hand-checked names and shapes for TINY_UNET, rank 4, conv_rank 2
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 32), (32, 4)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 32), (64, 4)),
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0": ((4, 64), (64, 4)),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": ((4, 64), (512, 4)),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": ((4, 256), (64, 4)),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 32, 1, 1), (32, 4, 1, 1)),
    "lora_unet_up_blocks_2_attentions_1_proj_out": ((4, 32, 1, 1), (32, 4, 1, 1)),
    "lora_unet_down_blocks_1_resnets_0_conv1": ((2, 32, 3, 3), (64, 2, 1, 1)),
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ((4, 32, 1, 1), (64, 4, 1, 1)),
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": ((4, 128), (64, 4)),
    "lora_unet_down_blocks_0_downsamplers_0_conv": ((2, 32, 3, 3), (32, 2, 1, 1)),
    "lora_unet_up_blocks_0_upsamplers_0_conv": ((2, 64, 3, 3), (64, 2, 1, 1)),
}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def small_models(conv_rank=2, seed=None):
    flame.manual_seed(int(rng.integers(1 << 30)) if seed is None else seed)
    unet = UNet2DConditionModel(TINY_UNET)
    from flame.models.clip import CLIPTextModel
    te = CLIPTextModel(TINY_TEXT)
    mods = inject_lora(unet, 4, 1.0, conv_rank=conv_rank, conv_alpha=1.5)
    tmods = inject_lora_text_encoder(te, 4, 1.0)
    return unet, te, mods, tmods


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_file_keys_shapes_dtypes_and_metadata(tmp_path, dtype):
    unet, te, mods, tmods = small_models()
    random_up(mods)
    random_up(tmods)
    path = tmp_path / "my-lora.safetensors"
    tags = {"10_cat": {"cat": 12, "sitting": 3}, "5_dog": {"dog": 5}}
    meta = save_lora(path, {**mods, **tmods}, {"ss_tag_frequency": tags, "ss_learning_rate": 1e-4,
                                              "ss_max_train_steps": 300, "ss_text_encoder_lr": None}, dtype)

    with safetensors.safe_open(str(path), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
        file = {k: f.get_tensor(k) for k in keys}
    assert md == meta
    ref = kohya_reference(torch_unet(), 4, 2)
    want = {**{k: v for k, v in ref.items()},
            **{k: ((4, TINY_TEXT.hidden_size if "fc2" not in k else TINY_TEXT.intermediate_size),
                   (TINY_TEXT.hidden_size if "fc1" not in k else TINY_TEXT.intermediate_size, 4)) for k in TE_KEYS}}
    for k, shapes in SPOT.items():
        assert ref[k] == shapes, k
    assert sorted(keys) == sorted(f"{n}.{s}" for n in want for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    every = {**mods, **tmods}
    for n, (down, up) in want.items():
        assert tuple(file[f"{n}.lora_down.weight"].shape) == down, n
        assert tuple(file[f"{n}.lora_up.weight"].shape) == up, n
        for s, p in every[n].lora_parameters().items():
            t = file[f"{n}.{s}"]
            assert t.dtype == TORCH_DTYPES[dtype], n
            np.testing.assert_array_equal(t.float().numpy(), torch.from_numpy(p.data).to(t.dtype).float().numpy())
        alpha = file[f"{n}.alpha"]
        assert alpha.ndim == 0 and alpha.dtype == torch.float32, n
        assert alpha.item() == (1.5 if down[-1] == 3 else 1.0), n

    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("4", "1.0")
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.5"}
    assert json.loads(md["ss_tag_frequency"]) == tags
    assert (md["ss_learning_rate"], md["ss_max_train_steps"]) == ("0.0001", "300")
    assert "ss_text_encoder_lr" not in md
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.sai_model_spec"].count(".") == 2 and md["modelspec.title"] == "my-lora"
    assert md["modelspec.implementation"] and md["modelspec.resolution"] == "512x512"
    assert abs(datetime.datetime.fromisoformat(md["modelspec.date"]) - datetime.datetime.now()).total_seconds() < 600
    raw = path.read_bytes()   # A1111's additional-networks hash: sha256 of everything after the header
    (n,) = struct.unpack("<Q", raw[:8])
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()


def test_without_conv_lora_only_transformer_layers(tmp_path):
    unet, te, mods, _ = small_models(conv_rank=0)
    assert sorted(mods) == sorted(kohya_reference(torch_unet(), 4, 0))
    assert not any("resnets" in k or "samplers" in k for k in mods)
    md = save_lora(tmp_path / "l.safetensors", mods)
    assert "ss_network_args" not in md   # kohya writes it only with network args


def test_text_encoder_names_follow_kohya():
    _, _, _, tmods = small_models(conv_rank=0)
    assert sorted(tmods) == sorted(TE_KEYS)


def test_load_and_apply_round_trip_and_errors(tmp_path):
    unet, te, mods, tmods = small_models()
    random_up(mods)
    random_up(tmods)
    for m in list(mods.values())[:3]:
        m.alpha = 0.75
    path = tmp_path / "l.safetensors"
    save_lora(path, {**mods, **tmods}, dtype="fp32")
    tensors, md = load_lora(path)
    assert md["ss_network_module"] == "networks.lora" and len(tensors) == 3 * (len(mods) + len(tmods))

    unet2, te2, mods2, tmods2 = small_models()    # a different draw of down weights
    applied = apply_lora(unet2, te2, path)
    assert set(applied) == set(mods) | set(tmods)
    for n, m in {**mods, **tmods}.items():
        m2 = applied[n]
        assert m2.alpha == m.alpha and m2.scale == m.scale, n
        for s, p in m.lora_parameters().items():
            np.testing.assert_array_equal(m2.lora_parameters()[s].data, p.data)

    with pytest.raises(LoRAError, match="not in the file"):            # te has LoRA, the file none
        apply_lora(unet2, te2, _save(tmp_path / "u.safetensors", mods))
    apply_lora(unet2, te2, tmp_path / "u.safetensors", strict=False)
    plain, _, _, _ = small_models(conv_rank=0)
    with pytest.raises(LoRAError, match="lora_unet_down_blocks_0_resnets_0_conv1"):  # file has LoCon
        apply_lora(plain, None, path)

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load_lora(path)[0].items()}
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({**tensors, "lora_unet_x.dora_scale": torch.ones(3)}, str(bad))
    with pytest.raises(LoRAError, match="dora_scale"):
        load_lora(bad)
    k = next(iter(mods))
    safetensors.torch.save_file({kk: v for kk, v in tensors.items() if kk != f"{k}.lora_up.weight"}, str(bad))
    with pytest.raises(LoRAError, match=f"{k}.lora_up.weight is missing"):
        load_lora(bad)
    with pytest.raises(LoRAError, match="save dtype"):
        save_lora(tmp_path / "x.safetensors", mods, dtype="int8")
    with pytest.raises(LoRAError, match="ss_network_dim"):
        save_lora(tmp_path / "x.safetensors", mods, {"ss_network_dim": 8})
    with pytest.raises(LoRAError, match="already has LoRA"):
        inject_lora(unet, 4, 1.0)


def _save(path, mods):
    save_lora(path, mods, dtype="fp16")
    return path


# ---------------------------------------------------------------- the layers


def test_layers_match_torch_with_bf16_base_weights():
    flame.manual_seed(int(rng.integers(1 << 30)))
    lin, conv = nn.Linear(24, 40), nn.Conv2d(6, 10, 3, stride=2, padding=1)
    w_lin, w_conv = lin.weight.data.copy(), conv.weight.data.copy()
    ll, lc = LoRALinear(lin, 4, 8.0, base_dtype="bf16"), LoRAConv2d(conv, 3, 1.5, base_dtype="bf16")
    for m in (ll, lc):
        assert m.weight.dtype.name == "bf16" and not m.weight.requires_grad and not m.bias.requires_grad
        assert m.lora_down.weight.dtype.name == "f32" and m.lora_down.weight.requires_grad
        assert not m.lora_up.weight.data.any()   # up starts at zero
        random_up({"m": m})
    x = rng.standard_normal((3, 5, 24)).astype(np.float32)
    xi = rng.standard_normal((2, 6, 9, 9)).astype(np.float32)

    def bf16(a):   # what the bf16-stored base weights hold
        return torch.from_numpy(np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32))
    tf, T = torch.nn.functional, torch.from_numpy
    want_l = tf.linear(T(x), bf16(w_lin), bf16(ll.bias.data)) + \
        tf.linear(tf.linear(T(x), T(ll.lora_down.weight.data)), T(ll.lora_up.weight.data)) * 2.0
    want_c = tf.conv2d(T(xi), bf16(w_conv), bf16(lc.bias.data), 2, 1) + \
        tf.conv2d(tf.conv2d(T(xi), T(lc.lora_down.weight.data), None, 2, 1), T(lc.lora_up.weight.data)) * 0.5
    assert rel_err(flame.compile(ll, x)(x), want_l.numpy()) < 1e-5
    assert rel_err(flame.compile(lc, xi)(xi), want_c.numpy()) < 1e-5


def test_down_is_kaiming_uniform_and_base_is_frozen():
    unet, te, mods, _ = small_models(seed=int(rng.integers(1 << 30)))
    m = mods["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"]   # fan_in 256
    d = np.concatenate([mm.lora_down.weight.data.ravel() for mm in mods.values() if mm.lora_down.weight.shape[1:] == (256,)])
    bound = 1 / np.sqrt(256)
    assert m.lora_down.weight.shape == (4, 256)
    assert np.abs(d).max() <= bound and np.abs(d).max() > 0.98 * bound
    assert abs(d.std() / (bound / np.sqrt(3)) - 1) < 0.1      # uniform on [-b, b]
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.{s}" for p in paths(unet) for s in ("lora_down.weight", "lora_up.weight")}
    with pytest.raises(LoRAError, match="rank"):
        LoRALinear(nn.Linear(4, 4), 0, 1.0)
