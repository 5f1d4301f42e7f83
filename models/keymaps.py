"""Key mapping between the original CompVis/LDM checkpoint layout and diffusers' layout, for
the UNet and the VAE. One table per model, built from the config, read in both directions.

A table maps module paths (diffusers -> LDM); a parameter key maps by its longest module-path
prefix found in the table, the rest of the key (".weight", ".transformer_blocks.0.attn1.to_q.weight")
kept as is. Original-layout UNet (openaimodel.py), with n = layers_per_block + 1:

    time_embed.0 / .2                 time_embedding.linear_1 / linear_2
    input_blocks.0.0                  conv_in
    input_blocks.{1 + n*i + j}.0 / .1 down_blocks.i.resnets.j / attentions.j
    input_blocks.{n*(i+1)}.0.op       down_blocks.i.downsamplers.0.conv
    middle_block.0 / .1 / .2          mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{n*i + j}.0 / .1    up_blocks.i.resnets.j / attentions.j
    output_blocks.{n*i + n-1}.{1|2}.conv   up_blocks.i.upsamplers.0.conv (2 after an attention)
    out.0 / out.2                     conv_norm_out / conv_out
    resnet: in_layers.0/.2 emb_layers.1 out_layers.0/.3 skip_connection
            = norm1/conv1 time_emb_proj norm2/conv2 conv_shortcut

Original-layout VAE: encoder.down.i.block.j / .downsample.conv, decoder.up.{N-1-i}.block.j /
.upsample.conv (the decoder's levels are numbered from the output end), mid.block_1 / attn_1 /
block_2, norm_out, nin_shortcut; the mid attention's norm/q/k/v/proj_out are 1x1 convs
([C,C,1,1]) where diffusers has group_norm/to_q/to_k/to_v/to_out.0 as Linear ([C,C]).
"""
from __future__ import annotations

from flame.models.configs import UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."   # inside a full SD checkpoint
VAE_PREFIX = "first_stage_model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(table, d, o, names=_RESNET):
    for a, b in names.items():
        table[f"{d}.{a}"] = f"{o}.{b}"


def unet_table(cfg: UNetConfig) -> dict[str, str]:
    """diffusers module path -> LDM module path (without the model.diffusion_model. prefix)."""
    t = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    n, last = cfg.layers_per_block + 1, len(cfg.block_out_channels) - 1
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(cfg.layers_per_block):
            _resnet(t, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + n * i + j}.0")
            if kind.startswith("CrossAttn"):
                t[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + n * i + j}.1"
        if i < last:
            t[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n * (i + 1)}.0.op"
    _resnet(t, "mid_block.resnets.0", "middle_block.0")
    t["mid_block.attentions.0"] = "middle_block.1"
    _resnet(t, "mid_block.resnets.1", "middle_block.2")
    for i, kind in enumerate(cfg.up_block_types):
        attn = kind.startswith("CrossAttn")
        for j in range(n):
            _resnet(t, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n * i + j}.0")
            if attn:
                t[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n * i + j}.1"
        if i < last:
            t[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n * i + n - 1}.{2 if attn else 1}.conv"
    return t


def vae_table(cfg: VAEConfig) -> dict[str, str]:
    """diffusers module path -> LDM module path (without the first_stage_model. prefix)."""
    t = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    levels = len(cfg.block_out_channels)
    for part in ("encoder", "decoder"):
        t[f"{part}.conv_in"] = f"{part}.conv_in"
        t[f"{part}.conv_out"] = f"{part}.conv_out"
        t[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        _resnet(t, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        _resnet(t, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
        for a, b in _VAE_ATTN.items():
            t[f"{part}.mid_block.attentions.0.{a}"] = f"{part}.mid.attn_1.{b}"
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            _resnet(t, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if i < levels - 1:
            t[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        o = levels - 1 - i
        for j in range(cfg.layers_per_block + 1):
            _resnet(t, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{o}.block.{j}", _VAE_RESNET)
        if i < levels - 1:
            t[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{o}.upsample.conv"
    return t


def is_vae_conv_attention(ldm_key: str) -> bool:
    """Keys whose LDM tensors are 1x1 conv weights [C,C,1,1] but Linear [C,C] in diffusers."""
    parts = ldm_key.split(".")
    return len(parts) >= 4 and parts[-3] == "attn_1" and parts[-2] in ("q", "k", "v", "proj_out") \
        and parts[-1] == "weight"


# diffusers' VAE attention before v0.14 (AttentionBlock), still found in files on the Hub,
# e.g. the SD 1.x repositories' vae/: diffusers renames these on load, and so do we
_DEPRECATED_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_vae_attention(sd: dict) -> dict:
    """mid_block.attentions.0.{query,key,value,proj_attn}.* -> {to_q,to_k,to_v,to_out.0}.*"""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 3 and parts[-3] == "0" and ".mid_block.attentions.0." in k and parts[-2] in _DEPRECATED_VAE_ATTN:
            k = ".".join(parts[:-2] + [_DEPRECATED_VAE_ATTN[parts[-2]], parts[-1]])
        out[k] = v
    return out


def map_key(key: str, table: dict[str, str]) -> str | None:
    """Rename `key` by its longest module-path prefix in `table`; None if none matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head]] + parts[cut:])
    return None


def invert(table: dict[str, str]) -> dict[str, str]:
    inv = {v: k for k, v in table.items()}
    assert len(inv) == len(table), "key table is not one-to-one"
    return inv


def ldm_to_diffusers(sd: dict, table: dict[str, str]) -> tuple[dict, list]:
    """(diffusers-keyed tensors, LDM keys that no table entry matches). Conv-shaped VAE
    attention weights are reshaped to Linear ones (a view, no copy)."""
    inv, out, unknown = invert(table), {}, []
    for k, v in sd.items():
        nk = map_key(k, inv)
        if nk is None:
            unknown.append(k)
            continue
        if is_vae_conv_attention(k) and v.ndim == 4:
            v = v.reshape(v.shape[:2])
        out[nk] = v
    return out, unknown


def diffusers_to_ldm(sd: dict, table: dict[str, str]) -> dict:
    """The other way (for writing original-layout files, and for the tests)."""
    out = {}
    for k, v in sd.items():
        nk = map_key(k, table)
        if nk is None:
            raise KeyError(f"{k}: no original-layout name for this key")
        if is_vae_conv_attention(nk) and v.ndim == 2:
            v = v.reshape(tuple(v.shape) + (1, 1))
        out[nk] = v
    return out
