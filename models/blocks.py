"""Building blocks shared by the UNet and the VAE, named like diffusers' modules so that
state_dict() keys match diffusers' checkpoints key for key.

    ResnetBlock2D       norm1 conv1 [time_emb_proj] norm2 conv2 [conv_shortcut]
    Attention           to_q to_k to_v to_out.0            (tokens [B, L, C])
    VAEAttention        group_norm + Attention over the H*W pixels, residual
    FeedForward/GEGLU   ff.net.0.proj, ff.net.2
    BasicTransformerBlock, Transformer2DModel (the SD "spatial transformer")
    Downsample2D, Upsample2D
"""
from __future__ import annotations

import functools

import flame.nn as nn
import flame.nn.functional as F


def module_method(fn):
    """Trace a method other than forward (VAE.encode/decode) exactly as Module.__call__ traces
    forward (module scopes, parameter names): for the call, the method stands in as forward."""
    @functools.wraps(fn)
    def wrapped(self, *args, **kwargs):
        d = self.__dict__
        saved = d.get("forward")
        d["forward"] = functools.partial(fn, self)
        try:
            return nn.Module.__call__(self, *args, **kwargs)
        finally:
            if saved is None:
                del d["forward"]
            else:
                d["forward"] = saved
    return wrapped


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-(dropout)-conv,
    added to the input (through a 1x1 conv when the channel count changes)."""

    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-6,
                 dropout=0.0, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb)).reshape(h.shape[0], -1, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out * (1.0 / self.output_scale_factor)


class Attention(nn.Module):
    """Multi-head attention over tokens: x [B, L, query_dim], context [B, S, cross_dim]
    (self-attention when context is None). to_out is a list (Linear, Dropout) as in diffusers."""

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, bias=False,
                 dropout=0.0, norm_groups=None, norm_eps=1e-6):
        super().__init__()
        inner = heads * dim_head
        if norm_groups:   # VAEAttention's; made first to keep diffusers' key order
            self.group_norm = nn.GroupNorm(norm_groups, query_dim, eps=norm_eps)
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def attend(self, x, context=None):
        ctx = x if context is None else context
        b = x.shape[0]

        def split(t):   # [B, L, H*D] -> [B, H, L, D]
            return t.reshape(b, t.shape[1], self.heads, -1).permute(0, 2, 1, 3)

        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.permute(0, 2, 1, 3).reshape(b, x.shape[1], -1)
        return self.to_out[1](self.to_out[0](o))

    def forward(self, x, context=None):
        return self.attend(x, context)


class VAEAttention(Attention):
    """The VAE mid-block's single-head self-attention over all H*W pixels: GroupNorm, q/k/v
    (Linear with bias; 1x1 convs in the original layout), output projection, residual."""

    def __init__(self, channels, groups=32, eps=1e-6):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, norm_groups=groups, norm_eps=eps)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).permute(0, 2, 1)
        o = self.attend(t)
        return x + o.permute(0, 2, 1).reshape(b, c, h, w)


class GEGLU(nn.Module):
    """proj to 2*inner; the first half times gelu(second half)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text context, GEGLU feed-forward,
    each added back to its input."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim, dropout=0.0, eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, None, heads, dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """The spatial transformer: GroupNorm, proj_in (1x1 conv, or Linear with
    use_linear_projection), transformer blocks over the H*W tokens, proj_out, residual."""

    def __init__(self, heads, dim_head, in_channels, num_layers=1, cross_attention_dim=768,
                 groups=32, use_linear_projection=False, dropout=0.0, eps=1e-5):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, in_channels, eps=1e-6)
        proj = (lambda i, o: nn.Linear(i, o)) if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, dropout, eps)
             for _ in range(num_layers)])
        self.proj_out = proj(inner, in_channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.norm(x)

        def to_tokens(t):   # [B, C, H, W] -> [B, H*W, C]
            return t.permute(0, 2, 3, 1).reshape(b, h * w, t.shape[1])

        def to_image(t):
            return t.reshape(b, h, w, t.shape[-1]).permute(0, 3, 1, 2)

        if self.use_linear_projection:
            t = self.proj_in(to_tokens(t))
        else:
            t = to_tokens(self.proj_in(t))
        for blk in self.transformer_blocks:
            t = blk(t, context)
        if self.use_linear_projection:
            t = to_image(self.proj_out(t))
        else:
            t = self.proj_out(to_image(t))
        return t + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 is diffusers' VAE variant: pad right/bottom by one first."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
