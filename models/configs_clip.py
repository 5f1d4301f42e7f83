"""CLIP text encoder configurations as data: SD 1.x's (OpenAI CLIP ViT-L/14's text tower), a
tiny one of the same structure for tests and the quickstart, and conversion from/to the
`config.json` that transformers writes next to `text_encoder/model.safetensors`.

Field names are transformers' CLIPTextConfig's, so a config.json reads straight in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flame.models.configs import ConfigError

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults are SD 1.5's text encoder (openai/clip-vit-large-patch14)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"CLIP text config: hidden_act={self.hidden_act!r} is not built "
                              f"(only {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIP text config: hidden_size {self.hidden_size} does not split into "
                              f"{self.num_attention_heads} heads")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """From a transformers config.json (a CLIPTextConfig, or a full CLIPConfig's text_config);
        the keys flame has no use for (dropout, initializer range, projection_dim, ...) are ignored."""
        d = d.get("text_config", d)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_transformers(self) -> dict:
        """Keyword arguments for transformers.CLIPTextConfig."""
        return dataclasses.asdict(self)


SD15_TEXT = CLIPTextConfig()
# vocab as large as the real tokenizer's, so its ids are valid; width 32 = TINY_UNET's
# cross_attention_dim
TINY_TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)
