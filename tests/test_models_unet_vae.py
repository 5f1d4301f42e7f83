"""The SD 1.x UNet and VAE in flame.nn against diffusers: small random models saved as real
files (a diffusers pipeline folder and an original-layout single file), loaded by
load_unet/load_vae, run by the reference interpreter, compared on fresh random inputs; the
full-size SD 1.5 key/shape layout, in both key layouts (the original one read back by diffusers'
own single-file converters); memory-mapped reading (no copy, one float32 copy after loading, the
mapping released); damaged and mismatched files."""
import gc
import json
import os
import shutil
import tracemalloc
import weakref

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
st = pytest.importorskip("safetensors.torch")

import flame  # noqa: E402
from flame.models import checkpoint, keymaps, load_unet, load_vae  # noqa: E402
from flame.models.checkpoint import CheckpointError  # noqa: E402
from flame.models.configs import (SD15_UNET, SD15_VAE, TINY_UNET, TINY_VAE, ConfigError,  # noqa: E402
                                  UNetConfig, VAEConfig)
from flame.models.unet import UNet2DConditionModel  # noqa: E402
from flame.models.vae import AutoencoderKL  # noqa: E402
from flame.nn import StateDictError  # noqa: E402
from flame.nn.init import shape_only  # noqa: E402

TOL = 1e-4


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def randomize(model, seed):
    """Every parameter random (diffusers zero-inits some, e.g. proj_out): weights ~ N(0, 1/fan_in),
    norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
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


def torch_unet(cfg=TINY_UNET, seed=0):
    return randomize(diffusers.UNet2DConditionModel(**cfg.to_diffusers()), seed)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tu, tv = torch_unet(), randomize(diffusers.AutoencoderKL(**TINY_VAE.to_diffusers()), 1)
    tu.save_pretrained(root / "pipe" / "unet", safe_serialization=True)
    tv.save_pretrained(root / "pipe" / "vae", safe_serialization=True)
    # the original layout, as one SD-style checkpoint holding both models
    ldm = {keymaps.UNET_PREFIX + k: v.contiguous() for k, v in
           keymaps.diffusers_to_ldm(tu.state_dict(), keymaps.unet_table(TINY_UNET)).items()}
    ldm.update({keymaps.VAE_PREFIX + k: v.contiguous() for k, v in
                keymaps.diffusers_to_ldm(tv.state_dict(), keymaps.vae_table(TINY_VAE)).items()})
    st.save_file(ldm, str(root / "tiny-sd.safetensors"))
    return {"root": root, "tu": tu, "tv": tv, "ldm": root / "tiny-sd.safetensors", "ldm_sd": ldm}


def test_tiny_original_layout_has_the_real_names(files):
    """The original-layout file is written through the table under test; these hand-written
    names (layers_per_block=1: two input and two output blocks per level) pin the table down."""
    sd, U, V = files["ldm_sd"], keymaps.UNET_PREFIX, keymaps.VAE_PREFIX
    expect = {U + "input_blocks.0.0.weight": (32, 4, 3, 3),
              U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
              U + "input_blocks.2.0.op.weight": (32, 32, 3, 3),
              U + "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
              U + "input_blocks.3.1.proj_in.weight": (64, 64, 1, 1),
              U + "input_blocks.4.0.op.weight": (64, 64, 3, 3),
              U + "input_blocks.5.0.emb_layers.1.weight": (64, 128),
              U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (64, 32),
              U + "middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
              U + "output_blocks.0.0.skip_connection.weight": (64, 128, 1, 1),
              U + "output_blocks.1.1.conv.weight": (64, 64, 3, 3),
              U + "output_blocks.3.2.conv.weight": (64, 64, 3, 3),
              U + "output_blocks.5.1.proj_out.weight": (32, 32, 1, 1),
              U + "output_blocks.4.0.in_layers.0.weight": (96,),
              U + "time_embed.2.weight": (128, 128), U + "out.2.weight": (4, 32, 3, 3),
              V + "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
              V + "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
              V + "encoder.mid.attn_1.q.weight": (64, 64, 1, 1),
              V + "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
              V + "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
              V + "decoder.up.0.block.1.conv1.weight": (32, 32, 3, 3),
              V + "decoder.norm_out.weight": (32,), V + "post_quant_conv.weight": (4, 4, 1, 1)}
    for k, shape in expect.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    assert U + "output_blocks.1.2.conv.weight" not in sd   # UpBlock2D: upsampler right after the resnet


def _inputs(seed, b=2):
    r = np.random.default_rng(seed)
    x = r.standard_normal((b, 4, 8, 8)).astype(np.float32)
    t = np.array([999.0, 17.3][:b], np.float32)
    c = r.standard_normal((b, 5, TINY_UNET.cross_attention_dim)).astype(np.float32)
    return x, t, c


def _torch_unet_out(tu, x, t, c):
    with torch.no_grad():
        return tu(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).sample.numpy()


@pytest.mark.parametrize("where", ["pipeline root", "unet folder", "original single file"])
def test_unet_matches_diffusers(files, where):
    path = {"pipeline root": files["root"] / "pipe", "unet folder": files["root"] / "pipe" / "unet",
            "original single file": files["ldm"]}[where]
    unet = load_unet(path, config=TINY_UNET if where == "original single file" else None)
    assert unet.config == TINY_UNET
    x, t, c = _inputs(hash(where) % 1000)
    got = flame.compile(unet, x, t, c, backend="interp")(x, t, c)
    assert rel_err(got, _torch_unet_out(files["tu"], x, t, c)) < TOL


@pytest.mark.parametrize("where", ["pipeline root", "original single file"])
def test_vae_matches_diffusers(files, where):
    path = files["root"] / "pipe" if where == "pipeline root" else files["ldm"]
    vae = load_vae(path, config=TINY_VAE if where != "pipeline root" else None)
    r = np.random.default_rng(3)
    img = r.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = r.standard_normal((1, 4, 8, 8)).astype(np.float32)
    mean, logvar = flame.compile(vae.encode, img)(img)
    dec = flame.compile(vae.decode, z)(z)
    with torch.no_grad():
        dist = files["tv"].encode(torch.from_numpy(img)).latent_dist
        ref_dec = files["tv"].decode(torch.from_numpy(z)).sample.numpy()
    assert rel_err(mean, dist.mean.numpy()) < TOL
    assert rel_err(logvar, dist.logvar.numpy()) < TOL
    assert rel_err(dec, ref_dec) < TOL


def test_vae_methods_trace_with_module_scopes(files):
    vae = load_vae(files["root"] / "pipe" / "vae")
    g = flame.trace(vae.encode, flame.spec((1, 3, 16, 16)))
    assert set(g.params) <= set(vae.state_dict()) and "quant_conv.weight" in g.params
    assert "encoder.mid_block.attentions.0.to_q" in {n.scope for n in g.nodes}


UNET_GRADS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
              "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
              "down_blocks.1.resnets.0.conv1.weight", "time_embedding.linear_1.weight",
              "mid_block.attentions.0.proj_in.weight"]


def test_unet_gradients_match_torch_autograd(files):
    unet = load_unet(files["root"] / "pipe" / "unet")
    x, t, c = _inputs(11)
    w = np.random.default_rng(12).standard_normal((2, 4, 8, 8)).astype(np.float32)
    params = dict(unet.named_parameters())

    def loss(x, t, c):
        return (unet(x, t, c) * w).sum()
    value, grads = flame.compile(flame.value_and_grad(loss, params={n: params[n] for n in UNET_GRADS}),
                                 x, t, c)(x, t, c)
    tu = files["tu"]
    tu.zero_grad()
    ref = (tu(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).sample * torch.from_numpy(w)).sum()
    ref.backward()
    tp = dict(tu.named_parameters())
    assert abs(float(value) - ref.item()) <= TOL * abs(ref.item())
    for n in UNET_GRADS:
        assert rel_err(grads[n], tp[n].grad.numpy()) < TOL, n


VAE_GRADS = ["decoder.mid_block.attentions.0.to_q.weight", "decoder.up_blocks.0.resnets.0.conv1.weight",
             "post_quant_conv.weight"]


def test_vae_decode_gradients_match_torch_autograd(files):
    vae = load_vae(files["root"] / "pipe" / "vae")
    r = np.random.default_rng(5)
    z = r.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = r.standard_normal((1, 3, 16, 16)).astype(np.float32)
    params = dict(vae.named_parameters())

    def loss(z):
        return (vae.decode(z) * w).sum()
    _, grads = flame.compile(flame.value_and_grad(loss, params={n: params[n] for n in VAE_GRADS}), z)(z)
    tv = files["tv"]
    tv.zero_grad()
    (tv.decode(torch.from_numpy(z)).sample * torch.from_numpy(w)).sum().backward()
    tp = dict(tv.named_parameters())
    for n in VAE_GRADS:
        assert rel_err(grads[n], tp[n].grad.numpy()) < TOL, n


def test_linear_projection_and_per_block_heads():
    """SD 2.x style: proj_in/proj_out as Linear, a head count per block."""
    cfg = UNetConfig(**{**TINY_UNET.__dict__, "use_linear_projection": True, "attention_head_dim": (2, 4, 8)})
    tu = torch_unet(cfg, seed=7)
    unet = UNet2DConditionModel(cfg)
    unet.load_state_dict({k: v.numpy() for k, v in tu.state_dict().items()})
    assert unet.state_dict()["down_blocks.0.attentions.0.proj_in.weight"].shape == (32, 32)
    x, t, c = _inputs(8, b=1)
    got = flame.compile(unet, x, t, c)(x, t, c)
    assert rel_err(got, _torch_unet_out(tu, x, t, c)) < TOL


# ---------------------------------------------------------------- the full-size layout

def _shapes(sd):
    return [(k, tuple(v.shape)) for k, v in sd.items()]


@pytest.fixture(scope="module")
def full_size():
    """diffusers' SD 1.5 models on torch's meta device and flame's built shape-only: neither
    allocates the 3.4 GB of weights (flame's parameters are zero-strided views of one zero)."""
    with torch.device("meta"):
        tu = diffusers.UNet2DConditionModel(**SD15_UNET.to_diffusers())
        tv = diffusers.AutoencoderKL(**SD15_VAE.to_diffusers())
    with shape_only():
        fu, fv = UNet2DConditionModel(SD15_UNET), AutoencoderKL(SD15_VAE)
    return tu, tv, fu, fv


def test_full_size_state_dicts_match_diffusers(full_size):
    tu, tv, fu, fv = full_size
    assert _shapes(fu.state_dict()) == _shapes(tu.state_dict())
    assert _shapes(fv.state_dict()) == _shapes(tv.state_dict())
    assert fu.num_parameters() == 859_520_964 == sum(p.numel() for p in tu.parameters())
    assert fv.num_parameters() == sum(p.numel() for p in tv.parameters())
    assert all(not any(p.data.strides) for p in fu.parameters() + fv.parameters())   # nothing allocated


SD15_LDM_KEYS = {   # real names and shapes from the original v1-5 checkpoint
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.input_blocks.9.0.op.bias": (1280,),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.0.in_layers.0.weight": (1280,),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.middle_block.2.out_layers.0.bias": (1280,),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm3.weight": (320,),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.out.0.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.bias": (512,),
    "first_stage_model.encoder.mid.attn_1.norm.weight": (512,),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.decoder.mid.block_2.norm2.weight": (512,),
    "first_stage_model.decoder.norm_out.weight": (128,),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
}


def _tagged(sd, first):
    """Each tensor of `sd` as a zero-strided torch view of one number of its own (first,
    first + 1, ...): full-size shapes for 4 bytes each, and a tag that says, after any renaming,
    which tensor a key ended up holding (shapes alone cannot tell two same-shaped tensors apart)."""
    return {k: torch.tensor(float(first + i)).expand(tuple(v.shape)) for i, (k, v) in enumerate(sd.items())}


def _tag(t):
    return t[(0,) * t.ndim].item()


def test_full_size_original_layout(full_size):
    """flame's SD 1.5 UNet and VAE, written in the original single-file layout by flame's key
    table, read back by diffusers' own single-file converters: the result is exactly diffusers'
    SD 1.5 key and shape lists, and every key holds the very tensor flame wrote under that name."""
    sf = pytest.importorskip("diffusers.loaders.single_file_utils")
    tu, tv, fu, fv = full_size
    ut, vt = keymaps.unet_table(SD15_UNET), keymaps.vae_table(SD15_VAE)
    tag_u, tag_v = _tagged(fu.state_dict(), 0), _tagged(fv.state_dict(), 10_000)
    unet, vae = keymaps.diffusers_to_ldm(tag_u, ut), keymaps.diffusers_to_ldm(tag_v, vt)
    ldm = {**{keymaps.UNET_PREFIX + k: v for k, v in unet.items()},
           **{keymaps.VAE_PREFIX + k: v for k, v in vae.items()}}
    assert len(ldm) == 686 + 248                         # one-to-one: no two keys collapse
    assert {k: tuple(ldm[k].shape) if k in ldm else None for k in SD15_LDM_KEYS} == SD15_LDM_KEYS
    assert not any(k.endswith("downsample.conv.weight") and ".decoder." in k for k in ldm)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ldm

    # diffusers' converters, given the whole checkpoint as a real single file holds it
    conv_u = sf.convert_ldm_unet_checkpoint(ldm, SD15_UNET.to_diffusers())
    conv_v = sf.convert_ldm_vae_checkpoint(ldm, SD15_VAE.to_diffusers())
    for conv, ref, tags in [(conv_u, tu, tag_u), (conv_v, tv, tag_v)]:
        assert sorted(_shapes(conv)) == sorted(_shapes(ref.state_dict()))   # exactly, nothing missing or extra
        assert {k: _tag(v) for k, v in conv.items()} == {k: _tag(v) for k, v in tags.items()}
        assert all(not any(v.stride()) for v in conv.values())                # still nothing allocated

    # and flame's own reader: the inverse recovers diffusers' keys, Linear shapes and tensors
    for sd, table, ref, tags in [(unet, ut, tu, tag_u), (vae, vt, tv, tag_v)]:
        back, unknown = keymaps.ldm_to_diffusers(sd, table)
        assert not unknown and _shapes(back) == _shapes(ref.state_dict())
        assert {k: _tag(v) for k, v in back.items()} == {k: _tag(v) for k, v in tags.items()}


# ---------------------------------------------------------------- memory mapping

def _mappings(arr):
    """The np.memmap objects in arr's .base chain, outermost first (the chain ends at the
    mmap.mmap object that np.memmap holds)."""
    out = []
    while isinstance(arr, np.ndarray):
        if isinstance(arr, np.memmap):
            out.append(arr)
        arr = arr.base
    return out


def _file_is_mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


# a UNet of the tiny one's structure, wide enough (5.8M parameters) that a copy of its weights
# stands far above the loader's own allocations
MID_UNET = UNetConfig(**{**TINY_UNET.__dict__, "block_out_channels": (64, 128, 128), "cross_attention_dim": 64})
LOW = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def mid_files(tmp_path_factory):
    """MID_UNET's random weights saved as fp32, fp16 and bf16 files, and the exact values."""
    root = tmp_path_factory.mktemp("mid")
    with shape_only():
        shapes = {k: v.shape for k, v in UNet2DConditionModel(MID_UNET).state_dict().items()}
    r = np.random.default_rng(4)
    out = {}
    for name, dt in LOW.items():
        sd = {k: r.standard_normal(s).astype(np.float32).astype(dt) for k, s in shapes.items()}
        path = root / f"unet-{name}.safetensors"
        checkpoint.save_safetensors(sd, str(path))
        out[name] = (path, sd)
    return out


@pytest.mark.parametrize("dtype", list(LOW))
def test_load_safetensors_maps_the_file_and_copies_nothing(mid_files, dtype):
    """Every tensor comes back as a read-only view, in the file's own dtype (no up-front cast
    for fp16/bf16 either), into one np.memmap of the file; reading allocates almost nothing."""
    path, saved = mid_files[dtype]
    tracemalloc.start()
    try:
        sd = checkpoint.load_safetensors(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = os.path.getsize(path)
    assert size > 11 << 20
    assert peak < size / 5, (peak, size)              # the header and the dict, no tensor data
    roots = {id(_mappings(v)[-1]) for v in sd.values()}
    assert len(roots) == 1                            # one mapping for the whole file
    mm = _mappings(next(iter(sd.values())))[-1]
    assert os.path.samefile(mm.filename, path) and mm.nbytes == size
    assert set(sd) == set(saved)
    for k, v in sd.items():
        assert v.dtype == np.dtype(LOW[dtype]) and v.shape == saved[k].shape, k
        assert not v.flags.writeable and np.shares_memory(v, mm), k
        np.testing.assert_array_equal(v, saved[k], err_msg=k)


@pytest.mark.parametrize("dtype", list(LOW))
def test_load_unet_keeps_one_float32_copy_and_releases_the_mapping(mid_files, dtype, monkeypatch):
    """The loaded UNet's weights are plain float32 arrays owning their memory (not views of
    the file); the loader's peak allocation is that one copy, not two (e.g. not the file read
    into memory, nor every tensor cast up front and then copied again); and once load_unet
    returns, the file's mapping is gone."""
    from flame.models import loading
    path, saved = mid_files[dtype]
    maps = []

    def spy(p):
        sd = checkpoint.load_safetensors(p)
        maps.extend(weakref.ref(m) for m in {id(ms[-1]): ms[-1] for ms in map(_mappings, sd.values())}.values())
        return sd
    monkeypatch.setattr(loading, "load_safetensors", spy)
    gc.collect()
    tracemalloc.start()
    try:
        unet = load_unet(path, config=MID_UNET)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    params = dict(unet.named_parameters())
    weights = sum(p.data.nbytes for p in params.values())
    assert weights == 4 * sum(v.size for v in saved.values())
    assert peak < 1.25 * weights, (peak, weights)
    assert set(params) == set(saved)
    for k, p in params.items():
        a = p.data
        assert type(a) is np.ndarray and a.dtype == np.float32 and a.flags.owndata, k
        assert a.flags.c_contiguous and a.flags.writeable, k
        np.testing.assert_array_equal(a, saved[k].astype(np.float32), err_msg=k)
    gc.collect()
    assert len(maps) == 1 and maps[0]() is None       # nothing holds the mapping any more
    if os.path.exists("/proc/self/maps"):
        assert not _file_is_mapped(path)


# ---------------------------------------------------------------- configs, dtypes, bad files

def test_configs_from_diffusers_json(files):
    cfg = json.loads((files["root"] / "pipe" / "unet" / "config.json").read_text())
    assert UNetConfig.from_dict(cfg) == TINY_UNET
    assert VAEConfig.from_dict(json.loads((files["root"] / "pipe" / "vae" / "config.json").read_text())) == TINY_VAE
    assert UNetConfig.from_dict(dict(files["tu"].config)) == TINY_UNET
    with pytest.raises(ConfigError, match="addition_embed_type"):   # SDXL's UNet
        UNetConfig.from_dict({**cfg, "addition_embed_type": "text_time"})
    with pytest.raises(ConfigError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict({**cfg, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_load_as_float32(files, tmp_path, dtype):
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(files["root"] / "pipe" / "unet" / "config.json", folder)
    low = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in files["tu"].state_dict().items()}
    st.save_file(low, str(folder / "diffusion_pytorch_model.safetensors"))
    sd = load_unet(folder).state_dict()
    for k, v in low.items():
        assert sd[k].dtype == np.float32
        np.testing.assert_array_equal(sd[k], v.float().numpy())


def test_pre_0_14_diffusers_vae_attention_names_load(files, tmp_path):
    """Older diffusers VAE files name the mid attention query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in files["tv"].state_dict().items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        sd[k] = v.contiguous()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in sd
    p = tmp_path / "old-vae.safetensors"
    st.save_file(sd, str(p))
    got = load_vae(p, config=TINY_VAE).state_dict()
    for k, v in files["tv"].state_dict().items():
        np.testing.assert_array_equal(got[k], v.numpy())


def test_pickle_checkpoints_are_refused(tmp_path):
    p = tmp_path / "v1-5-pruned.ckpt"
    p.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="pickle") as e:
        load_unet(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("magic", [b"\x80", b"PK"])
def test_safetensors_whose_header_length_looks_like_pickle_magic_loads(tmp_path, magic):
    """The 8-byte header length can begin with pickle's \\x80 or zip's PK (0x..80 or 0x4B50
    bytes): such a file is still safetensors, read as one (seen with a latent-cache file)."""
    x = np.random.default_rng().standard_normal((3, 5)).astype(np.float32)
    p = tmp_path / "t.safetensors"
    checkpoint.save_safetensors({"x": x}, str(p), {"pad": ""})
    n = int.from_bytes(p.read_bytes()[:8], "little")
    want = 0x180 if magic == b"\x80" else 0x4B50
    for pad in range(want - n - 8, want - n + 8):   # the writer may align the header
        checkpoint.save_safetensors({"x": x}, str(p), {"pad": "#" * pad})
        if p.read_bytes()[:len(magic)] == magic:
            break
    else:
        pytest.fail("no padding gave the wanted header length")
    np.testing.assert_array_equal(checkpoint.load_safetensors(str(p))["x"], x)


def test_truncated_file_is_named(files, tmp_path):
    p = tmp_path / "cut.safetensors"
    data = files["ldm"].read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_vae(p, config=TINY_VAE)
    assert str(p) in str(e.value)


def test_wrong_architecture_is_named(files, tmp_path):
    with pytest.raises(CheckpointError, match="holds a VAE"):
        load_unet(files["root"] / "pipe" / "vae")
    vae_only = tmp_path / "vae-only.safetensors"   # original-layout VAE without the prefix
    st.save_file({k[len(keymaps.VAE_PREFIX):]: v for k, v in files["ldm_sd"].items()
                  if k.startswith(keymaps.VAE_PREFIX)}, str(vae_only))
    with pytest.raises(CheckpointError, match="holds a VAE"):
        load_unet(vae_only, config=TINY_UNET)
    assert load_vae(vae_only, config=TINY_VAE).num_parameters() == files["tv"].num_parameters()
    with pytest.raises(CheckpointError, match="holds a UNet"):
        load_vae(files["root"] / "pipe" / "unet")


def test_missing_and_misshaped_tensors_are_listed(files, tmp_path):
    gone = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight", "conv_out.bias"]
    p = tmp_path / "partial.safetensors"
    st.save_file({k: v.contiguous() for k, v in files["tu"].state_dict().items() if k not in gone}, str(p))
    with pytest.raises(StateDictError) as e:
        load_unet(p, config=TINY_UNET)
    msg = str(e.value)
    assert str(p) in msg and "missing keys (2)" in msg and all(k in msg for k in gone)
    # the tiny original-layout file read with the default (SD 1.5) config
    with pytest.raises(StateDictError, match="wrong shape for conv_in.weight") as e:
        load_unet(files["ldm"])
    assert "pass config=" in str(e.value)
