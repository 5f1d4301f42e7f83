"""Model configurations as data: the real Stable Diffusion 1.5 UNet and VAE, small ("tiny")
ones of the same structure for tests and the quickstart, and conversion from/to the
`config.json` dicts diffusers writes next to its weights.

Field names and meanings are diffusers' own, so a `config.json` reads straight in. One
historical quirk is kept as is: for SD 1.x/2.x `attention_head_dim` is really the number of
attention *heads* per block (diffusers reads `num_attention_heads or attention_head_dim` as the
head count); `UNetConfig.heads()` gives the resolved numbers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flame.ir.errors import FlameError


class ConfigError(FlameError, ValueError):
    pass


DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys flame does not build, with the value that means "feature off".
# A config.json asking for anything else is refused by name rather than silently mis-built.
_UNET_OFF = {
    "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_class_embeds": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "act_fn": "silu", "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
    "projection_class_embeddings_input_dim": None, "addition_time_embed_dim": None,
}
_VAE_OFF = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _from_dict(cls, d: dict, off: dict, what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    bad = [f"{k}={d[k]!r}" for k, v in off.items() if k in d and d[k] != v]
    if bad:
        raise ConfigError(f"{what} config asks for features flame does not build: {', '.join(bad)}")
    return cls(**{k: _tuple(v) for k, v in d.items() if k in names})


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel configuration (SD 1.x / 2.x family). Defaults are SD 1.5."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 2
    attention_head_dim: int | tuple = 8        # number of heads, see the module docstring
    num_attention_heads: int | tuple | None = None
    transformer_layers_per_block: int | tuple = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False        # SD 2.x: proj_in/proj_out are Linear
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    upcast_attention: bool = False             # float32 everywhere here: nothing to upcast
    sample_size: int = 64                      # latent side (64 = 512 px)

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"UNet config: {n} block_out_channels but {len(self.down_block_types)} "
                              f"down and {len(self.up_block_types)} up block types")
        for t in self.down_block_types:
            if t not in DOWN_BLOCKS:
                raise ConfigError(f"UNet config: down block {t!r} is not built (only {', '.join(DOWN_BLOCKS)})")
        for t in self.up_block_types:
            if t not in UP_BLOCKS:
                raise ConfigError(f"UNet config: up block {t!r} is not built (only {', '.join(UP_BLOCKS)})")
        if self.mid_block_type not in MID_BLOCKS:
            raise ConfigError(f"UNet config: mid block {self.mid_block_type!r} is not built")
        if not isinstance(self.layers_per_block, int):
            raise ConfigError("UNet config: layers_per_block must be one int (as in SD 1.x/2.x)")

    def _per_block(self, v, what):
        v = v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)
        if len(v) != len(self.block_out_channels):
            raise ConfigError(f"UNet config: {what} has {len(v)} entries for {len(self.block_out_channels)} blocks")
        return v

    def heads(self) -> tuple:
        """Attention heads per down block (diffusers: num_attention_heads or attention_head_dim)."""
        return self._per_block(self.num_attention_heads or self.attention_head_dim, "attention heads")

    def transformer_layers(self) -> tuple:
        return self._per_block(self.transformer_layers_per_block, "transformer_layers_per_block")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsampling(self) -> int:
        """Latent pixels per side of the lowest resolution (a 2x downsampler per block but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """From a diffusers unet/config.json dict (unknown bookkeeping keys are ignored)."""
        return _from_dict(cls, d, _UNET_OFF, "UNet")

    def to_diffusers(self) -> dict:
        """kwargs for diffusers.UNet2DConditionModel(**...) (used by the tests)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL configuration. Defaults are SD 1.x's VAE."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215            # latents = mean * scaling_factor for the UNet
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512
    force_upcast: bool = True                  # diffusers runs it in float32; so does flame

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n or self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ConfigError("VAE config: only DownEncoderBlock2D/UpDecoderBlock2D blocks are built, "
                              "one per block_out_channels entry")

    @property
    def downsampling(self) -> int:
        """Image pixels per latent side: 8 for SD's VAE (three downsamplings)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From a diffusers vae/config.json dict."""
        return _from_dict(cls, d, _VAE_OFF, "VAE")

    def to_diffusers(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


SD15_UNET = UNetConfig()
SD15_VAE = VAEConfig()

# Same block types and wiring as SD 1.5 (cross-attention down blocks then a plain one,
# mirrored on the way up), a few thousand times smaller: for tests and the quickstart.
TINY_UNET = UNetConfig(
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8,
    sample_size=8)
TINY_VAE = VAEConfig(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
    sample_size=16)
