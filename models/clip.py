"""The CLIP text encoder (transformers' CLIPTextModel; for SD 1.x, OpenAI CLIP ViT-L/14's text
tower) in flame.nn.

    encoder(input_ids int64|int32 [B, L<=77]) -> last_hidden_state [B, L, hidden_size]

Attribute names follow transformers, so `state_dict()` keys are those of the CLIPTextModel
checkpoints on the Hub (text_model.embeddings.token_embedding.weight,
text_model.encoder.layers.0.self_attn.q_proj.weight, ..., text_model.final_layer_norm.weight).
transformers 5 itself saves them without the `text_model.` prefix; models/loading_clip.py
accepts both.

clip_skip follows the A1111/kohya/ComfyUI convention, counted from the end:
  clip_skip=1: the last layer's output, then final_layer_norm (what SD 1.5 was trained with);
  clip_skip=k: the output of layer num_hidden_layers-k+1 (hidden_states[-k] in transformers'
               output_hidden_states numbering), then final_layer_norm. The later layers are
               not run (their weights are still loaded, and get zero gradients).
diffusers' pipelines count differently: their clip_skip=1 is this clip_skip=2.
"""
from __future__ import annotations

import numpy as np

import flame.nn as nn
import flame.nn.functional as F
from flame.ir.errors import ShapeError
from flame.ir.tracer import user_location
from flame.models.configs_clip import SD15_TEXT, CLIPTextConfig


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # the constant 0..n-1, not a weight: kept out of the state dict (as transformers >= 4.31
        # does); the loader drops the copy older checkpoints carry
        self.register_buffer("position_ids", np.arange(cfg.max_position_embeddings, dtype=np.int64)[None],
                             persistent=False)

    def forward(self, input_ids):
        n = input_ids.shape[-1]
        pos = self.buffer("position_ids")[:, :n]
        return F.embedding(input_ids, self.token_embedding.weight) + F.embedding(pos, self.position_embedding.weight)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with a causal mask; q/k/v/out projections with bias."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        # transformers' registration order, so state_dict() lists keys in the same order
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape

        def heads(t):   # [B, L, C] -> [B, H, L, C/H]
            return t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)), is_causal=True)
        return self.out_proj(y.permute(0, 2, 1, 3).reshape(b, n, c))


def quick_gelu(x):
    return x * (1.702 * x).sigmoid()


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, clip_skip=1):
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers[:len(self.encoder.layers) - (clip_skip - 1)]:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    """See the module docstring. `clip_skip` can be changed between traces."""

    def __init__(self, config: CLIPTextConfig = SD15_TEXT, clip_skip: int = 1):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.clip_skip = clip_skip

    def forward(self, input_ids):
        cfg = self.config
        if not 1 <= self.clip_skip <= cfg.num_hidden_layers:
            raise ValueError(f"{user_location()}: clip_skip={self.clip_skip}: use 1 (the last layer) "
                             f"to {cfg.num_hidden_layers}")
        if input_ids.dtype.name not in ("i32", "i64") or input_ids.ndim != 2 \
                or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ShapeError(f"{user_location()}: the text encoder takes token ids i64[B, L<="
                             f"{cfg.max_position_embeddings}] (or i32), got {input_ids.node.type_str}")
        return self.text_model(input_ids, self.clip_skip)

    def extra_repr(self):
        return f"layers={self.config.num_hidden_layers}, width={self.config.hidden_size}, clip_skip={self.clip_skip}"
