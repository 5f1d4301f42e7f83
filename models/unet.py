"""The Stable Diffusion 1.x/2.x UNet (diffusers' UNet2DConditionModel) in flame.nn.

    unet(x [B,4,H,W], timesteps f32[B], context [B,77,768]) -> noise prediction [B,4,H,W]

Attribute names follow diffusers, so `state_dict()` keys are diffusers' keys
(down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight, ...); models/keymaps.py
maps them to the original CompVis/LDM layout.
"""
from __future__ import annotations

import math

import numpy as np

import flame.nn as nn
import flame.nn.functional as F
from flame.ir import ops
from flame.ir.errors import ShapeError
from flame.ir.tensor import Tensor
from flame.models.blocks import Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D
from flame.models.configs import SD15_UNET, UNetConfig


def timestep_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos=True, freq_shift=0.0,
                       max_period=10000) -> Tensor:
    """diffusers' get_timestep_embedding: [sin(t*f), cos(t*f)] (cos first when flipped) with
    f_i = max_period^(-i / (dim/2 - freq_shift)). The frequencies are float32 constants
    computed as torch computes them."""
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half - freq_shift)
    freqs = np.exp(exponent).astype(np.float32)
    args = timesteps.cast("f32").reshape(-1, 1) * Tensor.const(freqs.reshape(1, half))
    sin, cos = args.sin(), args.cos()
    emb = ops.concat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def _attn(cfg: UNetConfig, channels, heads, layers):
    return Transformer2DModel(heads, channels // heads, channels, layers, cfg.cross_attention_dim,
                              cfg.norm_num_groups, cfg.use_linear_projection, cfg.dropout, cfg.norm_eps)


def _resnet(cfg: UNetConfig, cin, cout, scale=1.0):
    return ResnetBlock2D(cin, cout, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps,
                         cfg.dropout, scale)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with_attention) or DownBlock2D: resnets[, attentions], then an
    optional stride-2 downsampler. Returns the output and every intermediate for the skips."""

    def __init__(self, cfg, cin, cout, heads, layers, with_attention, add_downsample):
        super().__init__()
        # attentions before resnets: diffusers' registration order, so state_dict() lists
        # the keys in the same order
        self.attentions = nn.ModuleList([_attn(cfg, cout, heads, layers)
                                         for _ in range(cfg.layers_per_block)]) if with_attention else None
        self.resnets = nn.ModuleList([_resnet(cfg, cin if i == 0 else cout, cout)
                                      for i in range(cfg.layers_per_block)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout, cfg.downsample_padding)]) if add_downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with_attention) or UpBlock2D: layers_per_block+1 resnets, each on
    the concatenation of the running output and one skip, then an optional upsampler."""

    def __init__(self, cfg, cin, prev_out, cout, heads, layers, with_attention, add_upsample):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.attentions = nn.ModuleList([_attn(cfg, cout, heads, layers)
                                         for _ in range(n)]) if with_attention else None
        self.resnets = nn.ModuleList([
            _resnet(cfg, (prev_out if i == 0 else cout) + (cin if i == n - 1 else cout), cout)
            for i in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_upsample else None

    def forward(self, x, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            x = resnet(ops.concat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, (spatial transformer, resnet) per transformer layer."""

    def __init__(self, cfg, channels, heads, layers):
        super().__init__()
        s = cfg.mid_block_scale_factor
        self.attentions = nn.ModuleList([_attn(cfg, channels, heads, layers)])
        self.resnets = nn.ModuleList([_resnet(cfg, channels, channels, s), _resnet(cfg, channels, channels, s)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UNet2DConditionModel(nn.Module):
    """The denoiser. `UNet2DConditionModel(config)`; the default config is SD 1.5."""

    def __init__(self, config: UNetConfig = SD15_UNET):
        super().__init__()
        cfg = self.config = config
        boc, heads, tlayers = cfg.block_out_channels, cfg.heads(), cfg.transformer_layers()
        n = len(boc)
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()    # registered here, filled below: diffusers' key order
        cout = boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, boc[i]
            self.down_blocks.append(DownBlock(cfg, cin, cout, heads[i], tlayers[i],
                                              kind == "CrossAttnDownBlock2D", i < n - 1))
        self.mid_block = MidBlock(cfg, boc[-1], heads[-1], tlayers[-1])
        rboc, rheads, rlayers = boc[::-1], heads[::-1], tlayers[::-1]
        cout = rboc[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout, cin = cout, rboc[i], rboc[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(cfg, cin, prev, cout, rheads[i], rlayers[i],
                                          kind == "CrossAttnUpBlock2D", i < n - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, boc[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, 3, padding=1)

    def forward(self, x, timesteps, context):
        b, _, h, w = x.shape
        k = 2 ** (len(self.down_blocks) - 1)
        if h % k or w % k:
            raise ShapeError(f"UNet input {h}x{w}: height and width must be multiples of {k}")
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = timesteps.reshape(1).expand(b)
        temb = self.time_embedding(timestep_embedding(
            timesteps, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift))
        x = self.conv_in(x)
        skips = [x]
        for blk in self.down_blocks:
            x, s = blk(x, temb, context)
            skips += s
        x = self.mid_block(x, temb, context)
        for blk in self.up_blocks:
            x = blk(x, skips, temb, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
