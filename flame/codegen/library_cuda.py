"""CUDA source for the data-movement halves of library ops: im2col and col2im around the
cuBLAS GEMMs of conv2d, and the row gather of embeddings. Shapes are baked in as
constants, like every generated kernel; the source is printable and cached the same way."""
from __future__ import annotations

from ..ir import dtypes as dt
from .kernel import div_mod, literal, split_flat

HEAD = "import math\nimport numpy as np\nimport numba\nfrom numba import cuda\n\n\n"
BLOCK = 256


def conv_geometry(x_shape, w_shape, a):
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return dict(N=n, C=c, H=h, W=w, O=o, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                OH=oh, OW=ow, L=oh * ow, G=a["groups"], K=cg * kh * kw)


def im2col(name: str, g: dict, d: dt.DType) -> tuple:
    """col[n, c, i, j, l] = x[n, c, y*SH + i*DH - PH, x*SW + j*DW - PW] (0 outside)."""
    from .prelude import CUDA_PRELUDE
    total = g["N"] * g["C"] * g["KH"] * g["KW"] * g["L"]
    n, c, i, j, l = split_flat("t", (g["N"], g["C"], g["KH"], g["KW"], g["L"]))
    div, mod = div_mod(total)
    src = CUDA_PRELUDE + "\n" + f'''@cuda.jit
def {name}(x, col):
    t = cuda.grid(1)
    if t >= {total}:
        return
    n = {n}
    c = {c}
    i = {i}
    j = {j}
    l = {l}
    y = {div("l", g["OW"])} * {g["SH"]} + i * {g["DH"]} - {g["PH"]}
    xx = {mod("l", g["OW"])} * {g["SW"]} + j * {g["DW"]} - {g["PW"]}
    v = {"np.uint16(0)" if d is dt.bf16 else literal(0.0, d)}
    if y >= 0 and y < {g["H"]} and xx >= 0 and xx < {g["W"]}:
        v = x[((n * {g["C"]} + c) * {g["H"]} + y) * {g["W"]} + xx]
    col[t] = v
'''
    return src, (total + BLOCK - 1) // BLOCK, BLOCK


def col2im(name: str, g: dict, d: dt.DType) -> tuple:
    """dx[n, c, h, w] = sum of dcol over the kernel taps that read (h, w): a gather, so no
    atomics and a deterministic sum."""
    total = g["N"] * g["C"] * g["H"] * g["W"]
    from .prelude import CUDA_PRELUDE
    n, c, h, w = split_flat("t", (g["N"], g["C"], g["H"], g["W"]))
    div, mod = div_mod(total)
    load, store = ("_bf16_load", "_bf16_bits") if d is dt.bf16 else ("", "")
    src = CUDA_PRELUDE + "\n" + f'''@cuda.jit
def {name}(dcol, dx):
    t = cuda.grid(1)
    if t >= {total}:
        return
    n = {n}
    c = {c}
    h = {h}
    w = {w}
    acc = {literal(0.0, d)}
    for i in range({g["KH"]}):
        yy = h + {g["PH"]} - i * {g["DH"]}
        if yy >= 0 and {mod("yy", g["SH"])} == 0 and {div("yy", g["SH"])} < {g["OH"]}:
            for j in range({g["KW"]}):
                xx = w + {g["PW"]} - j * {g["DW"]}
                if xx >= 0 and {mod("xx", g["SW"])} == 0 and {div("xx", g["SW"])} < {g["OW"]}:
                    acc = acc + {load}(dcol[(((n * {g["C"]} + c) * {g["KH"]} + i) * {g["KW"]} + j) * {g["L"]} + {div("yy", g["SH"])} * {g["OW"]} + {div("xx", g["SW"])}])
    dx[t] = {store}(acc)
'''
    return src, (total + BLOCK - 1) // BLOCK, BLOCK


def gather(name: str, n_idx: int, rows: int, width: int) -> tuple:
    """out[k, :] = table[idx[k], :]; an index out of range reads row 0 (indices are
    validated on the host before upload)."""
    total = n_idx * width
    src = HEAD + f'''@cuda.jit
def {name}(table, idx, out):
    t = cuda.grid(1)
    if t >= {total}:
        return
    k = t // {width}
    j = t % {width}
    r = idx[k]
    if r < 0:
        r = r + {rows}
    out[t] = table[r * {width} + j]
'''
    return src, (total + BLOCK - 1) // BLOCK, BLOCK


def scatter_add(name: str, n_idx: int, rows: int, width: int, d: dt.DType) -> tuple:
    """out[r, :] = sum of src[k, :] over the k with idx[k] == r: written as a gather (each
    output element loops over the indices), so the sum is deterministic and needs no atomics.
    Its cost grows with rows x indices, fine for embedding gradients of a few hundred tokens."""
    from .prelude import CUDA_PRELUDE
    total = rows * width
    load, store = ("_bf16_load", "_bf16_bits") if d is dt.bf16 else ("", "")
    src = CUDA_PRELUDE + "\n" + f'''@cuda.jit
def {name}(src, idx, out):
    t = cuda.grid(1)
    if t >= {total}:
        return
    r = t // {width}
    j = t % {width}
    acc = {literal(0.0, d)}
    for k in range({n_idx}):
        q = idx[k]
        if q < 0:
            q = q + {rows}
        if q == r:
            acc = acc + {load}(src[k * {width} + j])
    out[t] = {store}(acc)
'''
    return src, (total + BLOCK - 1) // BLOCK, BLOCK
