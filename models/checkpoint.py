"""Reading checkpoint files: safetensors only, memory-mapped, every error naming the file.

The safetensors layout is read directly (8-byte header length, JSON header, raw data), so
bf16 tensors come back as ml_dtypes.bfloat16 views of the mapped file (the safetensors
package's numpy API has no bf16), and nothing is copied until a tensor is used.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct

import ml_dtypes
import numpy as np

from flame.ir.errors import FlameError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class CheckpointError(FlameError):
    pass


def refuse_pickle(path: str):
    raise CheckpointError(
        f"{path}: this is a pickle checkpoint ({os.path.splitext(path)[1]}), which can run arbitrary "
        "code when loaded, so flame does not open it. Convert it to safetensors once, in an "
        "environment you trust, e.g.:\n"
        "  python -c \"import torch, safetensors.torch as st; sd = torch.load('model.ckpt', "
        "map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        "st.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, "
        "'model.safetensors')\"")


def read_header(path: str) -> tuple[dict, int]:
    """(header, data offset). Raises CheckpointError naming the file on any damage."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        refuse_pickle(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        first = f.read(1)
        # a safetensors header is JSON right after its length; only without one do the pickle
        # and zip magic bytes mean anything (a header of 0x..80 bytes starts with \x80 too)
        if (n > size - 8 or first != b"{") and (head[:2] == b"PK" or head[:1] == b"\x80"):
            refuse_pickle(path)
        f.seek(8)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_start = 8 + n
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if v.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {k!r} has dtype {v.get('dtype')!r}, which flame cannot read")
        b, e = v["data_offsets"]
        count = int(np.prod(v["shape"])) if v["shape"] else 1
        if e - b != count * np.dtype(DTYPES[v["dtype"]]).itemsize:
            raise CheckpointError(f"{path}: tensor {k!r} has {e - b} bytes for shape {v['shape']}")
        end = max(end, e)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {data_start + end} bytes, the file has {size}")
    return header, data_start


def load_safetensors(path: str) -> dict:
    """name -> numpy array, memory-mapped read-only (no copy until used)."""
    header, start = read_header(path)
    out = {}
    if not any(k != "__metadata__" for k in header):
        return out
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = mm[start + b: start + e].view(DTYPES[v["dtype"]]).reshape(v["shape"])
    return out


def metadata(path: str) -> dict:
    return read_header(path)[0].get("__metadata__", {})


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None):
    """Write tensors (numpy arrays) atomically: a crash never leaves a half-written file."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for k, v in tensors.items():
        a = np.ascontiguousarray(v).reshape(np.shape(v))   # ascontiguousarray makes 0-d arrays 1-d
        if a.dtype not in names:
            raise CheckpointError(f"{path}: cannot save {k!r} of dtype {a.dtype}")
        header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            for a in blobs:
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:   # a full disk, say: the previous file stays as it was
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise CheckpointError(f"{path}: could not be written ({e.strerror or e}); "
                              "the previous file, if any, is unchanged") from None
