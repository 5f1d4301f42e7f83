"""torch.nn.functional names and argument order, built from primitives at trace time."""
from __future__ import annotations

import math

import numpy as np

from ..ir import dtypes as dt
from ..ir import ops
from ..ir.errors import ShapeError
from ..ir.tensor import Tensor
from ..ir.tracer import user_location
from .module import as_tensor as _t


def linear(input, weight, bias=None):
    x, w = _t(input), _t(weight)
    lead = x.shape[:-1]
    y = ops.matmul_t(x.reshape(-1, x.shape[-1]), w, tb=True).reshape(lead + (w.shape[0],))
    return y if bias is None else y + _t(bias)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    x, w = _t(input), _t(weight)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            d = ops._pair(dilation)
            total = [d[i] * (w.shape[2 + i] - 1) for i in range(2)]
            padding = tuple(t // 2 for t in total)
            if any(t % 2 for t in total):   # even kernel: torch puts the extra row/col after
                x = x.pad_general([(0, 0, 0)] * 2 + [(0, t % 2, 0) for t in total])
        else:
            raise ValueError(f"{user_location()}: conv2d padding {padding!r}: use an int, a pair, 'valid' or 'same'")
    y = ops.conv2d_raw(x, w, stride, padding, dilation, groups)
    return y if bias is None else y + _t(bias).reshape(1, -1, 1, 1)


def relu(input):
    x = _t(input)
    return ops.where(x > 0.0, x, 0.0)


def sigmoid(input):
    return _t(input).sigmoid()


def tanh(input):
    return _t(input).tanh()


def silu(input):
    x = _t(input)
    return x * x.sigmoid()


def gelu(input, approximate="none"):
    x = _t(input)
    if approximate == "none":
        return 0.5 * x * (1.0 + (x * (1.0 / math.sqrt(2.0))).erf())
    if approximate == "tanh":
        return 0.5 * x * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)).tanh())
    raise ValueError(f"{user_location()}: gelu approximate={approximate!r}: use 'none' or 'tanh'")


def _dim(dim, fn):
    if dim is None:
        raise TypeError(f"{user_location()}: {fn} needs dim= (implicit dims are ambiguous)")
    return dim


def softmax(input, dim=None, dtype=None):
    x = _t(input)
    if dtype is not None:
        x = x.cast(dtype)
    return x.softmax(_dim(dim, "softmax"))


def log_softmax(input, dim=None, dtype=None):
    x = _t(input)
    if dtype is not None:
        x = x.cast(dtype)
    return x.log_softmax(_dim(dim, "log_softmax"))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = _t(input)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.shape[x.ndim - len(ns):] != ns:
        raise ShapeError(f"{user_location()}: layer_norm over {list(ns)} of {x.node.type_str}")
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    mean = x.mean(axes, keepdim=True)
    d = x - mean
    var = (d * d).mean(axes, keepdim=True)
    y = d * (var + eps).rsqrt()
    if weight is not None:
        y = y * _t(weight)
    if bias is not None:
        y = y + _t(bias)
    return y


# groups at least this long take their statistics per channel row first: a GPU block holds
# a group of up to 1024 * 48 elements in registers (SD 1.5's at 64x64 latents: 10 channels x
# 4096), one that is longer would be summed in two stages, reading x three times.
LONG_GROUP = 1024 * 48 + 1


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    x = _t(input)
    n, c = x.shape[:2]
    if c % num_groups:
        raise ShapeError(f"{user_location()}: group_norm: {c} channels do not split into {num_groups} groups")
    # statistics and the per-channel affine in one grouped view [N, G, C/G, spatial]
    xg = x.reshape(n, num_groups, c // num_groups, -1)
    low = x.dtype in (dt.bf16, dt.f16)
    xs = xg.float() if low else xg    # statistics in float32 also for 16-bit activations
    hw, group = xg.shape[3], xg.shape[2] * xg.shape[3]
    if group >= LONG_GROUP:
        # exact two-level moments: each channel's mean and centred sum of squares over its
        # spatial row (one row kernel reads x once), then the group's (Chan et al.:
        # M2 = sum of the rows' M2 + hw * sum (row mean - group mean)^2); never E[x²] - E[x]²
        row_mean = xs.mean(3, keepdim=True)
        d = xs - row_mean
        row_m2 = (d * d).sum(3, keepdim=True)
        mean = row_mean.mean(2, keepdim=True)
        e = row_mean - mean
        var = (row_m2.sum(2, keepdim=True) + (e * e).sum(2, keepdim=True) * float(hw)) * (1.0 / group)
    else:   # the group's mean, then its centred variance: one row kernel with the normalisation
        mean = xs.mean((2, 3), keepdim=True)
        d = xs - mean
        var = (d * d).mean((2, 3), keepdim=True)
    y = (xs - mean) * (var + eps).rsqrt()
    cshape = (1, num_groups, c // num_groups, 1)
    if weight is not None:
        y = y * _t(weight).reshape(cshape)
    if bias is not None:
        y = y + _t(bias).reshape(cshape)
    if low:
        y = y.cast(x.dtype)
    return y.reshape(x.shape)


def dropout(input, p=0.5, training=True, inplace=False, seed=None):
    """Zero elements with probability p and scale the rest by 1/(1-p). The draw is
    counter-based: `seed` (int or 0-d Tensor), else the graph's rng_seed input."""
    x = _t(input)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{user_location()}: dropout probability {p} is not in [0, 1]")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    keep = ops.rand_uniform(x.shape, "f32", seed) >= p
    return ops.where(keep, x * (1.0 / (1.0 - p)), 0.0)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, seed=None):
    q, k, v = _t(query), _t(key), _t(value)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = ops.matmul_t(q, k, tb=True) * s
    L, S = scores.shape[-2:]
    if is_causal:
        tril = np.tril(np.ones((L, S), dtype=bool))
        scores = ops.where(Tensor.const(tril), scores, float("-inf"))
    if attn_mask is not None:
        m = _t(attn_mask)
        if m.dtype.name == "bool":
            scores = ops.where(m, scores, float("-inf"))
        else:
            scores = scores + m.cast(scores.dtype)
    attn = scores.softmax(-1)
    if dropout_p > 0.0:
        attn = dropout(attn, dropout_p, True, seed=seed)
    return ops.matmul_t(attn, v)


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None):
    x = _t(input)
    if mode != "nearest":
        raise NotImplementedError(f"{user_location()}: interpolate mode={mode!r}: only 'nearest' is built")
    h, w = x.shape[-2:]
    if size is not None:
        oh, ow = (size, size) if isinstance(size, int) else size
    elif scale_factor is not None:
        sh, sw = (scale_factor, scale_factor) if not isinstance(scale_factor, (tuple, list)) else scale_factor
        oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    else:
        raise ValueError(f"{user_location()}: interpolate needs size or scale_factor")
    if oh % h == 0 and ow % w == 0:
        return ops.upsample_nearest(x, (oh // h, ow // w))
    if h % oh == 0 and w % ow == 0:   # nearest downsampling picks every k-th pixel
        return x[..., ::h // oh, ::w // ow]
    raise NotImplementedError(f"{user_location()}: interpolate from {h}x{w} to {oh}x{ow}: "
                              "only integer scale factors are built")


def pad(input, pad, mode="constant", value=0.0):
    x = _t(input)
    if mode != "constant":
        raise NotImplementedError(f"{user_location()}: pad mode={mode!r}: only 'constant' is built")
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise ValueError(f"{user_location()}: pad {pad} needs pairs for at most {x.ndim} dims")
    lo, hi = [0] * x.ndim, [0] * x.ndim
    for i in range(len(pad) // 2):
        lo[x.ndim - 1 - i], hi[x.ndim - 1 - i] = pad[2 * i], pad[2 * i + 1]
    # negative widths crop
    starts = [max(-l, 0) for l in lo]
    stops = [s - max(-h, 0) for s, h in zip(x.shape, hi)]
    x = x.slice_general(starts, stops, [1] * x.ndim)
    return x.pad_general([(max(l, 0), max(h, 0), 0) for l, h in zip(lo, hi)], float(value))


def embedding(input, weight, padding_idx=None):
    idx, w = _t(input), _t(weight)
    out = ops.gather(w, idx)
    if padding_idx is not None:  # no gradient reaches the padding row
        pad_rows = (idx == int(padding_idx) % w.shape[0]).unsqueeze(-1)
        out = ops.where(pad_rows, out.detach(), out)
    return out


def mse_loss(input, target, reduction="mean"):
    d = _t(input) - _t(target)
    sq = d * d
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    if reduction == "none":
        return sq
    raise ValueError(f"{user_location()}: mse_loss reduction={reduction!r}: use 'mean', 'sum' or 'none'")
