"""A small diffusion-UNet-style block: conv, group norm, SiLU, self-attention, residual.

    flame-compile flame/examples/block.py:Block --arg x:f32[2,8,4,4]
"""
import flame.nn as nn
import flame.nn.functional as F


class Block(nn.Module):
    """Conv2d 3x3 -> GroupNorm -> SiLU -> multi-head self-attention over the H*W positions
    (diffusers' to_q/to_k/to_v/to_out naming) -> + x."""

    def __init__(self, channels=8, groups=4, heads=2):
        super().__init__()
        if channels % heads:
            raise ValueError(f"Block: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.conv(x)
        t = self.norm(t)
        t = F.silu(t)
        t = t.reshape(n, c, h * w).transpose(1, 2)                  # [n, positions, c]
        q = self.split_heads(self.to_q(t))
        k = self.split_heads(self.to_k(t))
        v = self.split_heads(self.to_v(t))
        a = F.scaled_dot_product_attention(q, k, v)                 # [n, heads, positions, c/heads]
        a = a.transpose(1, 2).reshape(n, h * w, c)
        out = self.to_out(a).transpose(1, 2).reshape(n, c, h, w)
        return x + out

    def split_heads(self, t):
        n, p, c = t.shape
        return t.reshape(n, p, self.heads, c // self.heads).transpose(1, 2)
