"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in flame.nn.

    mean, logvar = vae.encode(image [B,3,H,W] in [-1, 1])      # each [B,4,H/8,W/8]
    image = vae.decode(latent)                                 # latent = unscaled mean/sample

The UNet works on `latent * SCALING_FACTOR` (and decode wants `latents / SCALING_FACTOR`).
state_dict() keys are diffusers' keys; models/keymaps.py maps them to the original layout.
"""
from __future__ import annotations

import flame.nn as nn
import flame.nn.functional as F
from flame.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, VAEAttention, module_method
from flame.models.configs import SD15_VAE, VAEConfig

SCALING_FACTOR = 0.18215   # SD 1.x: latents fed to the UNet are the VAE mean times this
EPS = 1e-6                 # every GroupNorm in the SD VAE


class EncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then the asymmetric-padding downsampler (but the last)."""

    def __init__(self, cin, cout, layers, groups, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, EPS)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)]) if add_downsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    """UpDecoderBlock2D: layers_per_block+1 resnets, then nearest-x2 upsampler (but the last)."""

    def __init__(self, cin, cout, layers, groups, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, EPS)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, self-attention, resnet."""

    def __init__(self, channels, groups, with_attention=True):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups, EPS)]) if with_attention else None
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, i < len(boc) - 1)
            for i in range(len(boc))])
        self.mid_block = VAEMidBlock(boc[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, boc[-1], eps=EPS)
        self.conv_out = nn.Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rboc, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rboc[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([   # before mid_block: diffusers' key order
            DecoderBlock(rboc[max(i - 1, 0)], rboc[i], cfg.layers_per_block + 1, g, i < len(rboc) - 1)
            for i in range(len(rboc))])
        self.mid_block = VAEMidBlock(rboc[0], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, rboc[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rboc[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode(x) -> (mean, logvar) of the latent Gaussian (logvar clamped to [-30, 20] as in
    diffusers' DiagonalGaussianDistribution); decode(z) -> image; forward(x) reconstructs
    from the mean."""

    def __init__(self, config: VAEConfig = SD15_VAE):
        super().__init__()
        self.config = config
        c2 = 2 * config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(c2, c2, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @module_method
    def encode(self, x):
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @module_method
    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x):
        return self.decode(self.encode(x)[0])
