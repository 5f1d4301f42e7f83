"""Generated source lives in content-hashed files under the user's cache directory, so
Numba's on-disk cache (which needs a real file) works across runs. The key covers the
source, the backend and architecture, and the flame and Numba versions."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys

_loaded = {}


def cache_dir() -> str:
    root = os.environ.get("FLAME_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flame")
    return os.path.join(root, "kernels")


def load(name: str, source: str, backend: str, arch: str = ""):
    """Write `source` to its content-hashed file (once) and return its function `name`."""
    import numba
    from .. import __version__
    key = hashlib.sha256("\0".join([source, backend, arch, __version__, numba.__version__]).encode()).hexdigest()[:20]
    if key in _loaded:
        return getattr(_loaded[key], name)
    d = os.path.join(cache_dir(), backend)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}_{key}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)   # atomic: a concurrent run sees the old file or the whole new one
    modname = f"flame_kernels_{backend}_{name}_{key}"
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    _loaded[key] = mod
    return getattr(mod, name)


def cached_path(key_parts, name: str, suffix: str, versioned: bool = True) -> str:
    """Where cached_text keeps the text for these key parts."""
    import numba
    from .. import __version__
    parts = list(key_parts) + ([__version__, numba.__version__] if versioned else [])
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), suffix, f"{name}_{key}.{suffix}")


def cached_text(key_parts, name: str, suffix: str, make, versioned: bool = True):
    """Text (or bytes) derived from generated source — PTX, cubins — kept under its own
    hash. versioned: the key also holds the flame and Numba versions (off where key_parts
    pin the compiler themselves)."""
    path = cached_path(key_parts, name, suffix, versioned)
    d = os.path.dirname(path)
    binary = suffix in ("cubin",)
    if os.path.exists(path):
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    data = make()
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb" if binary else "w") as f:
        f.write(data)
    os.replace(tmp, path)
    return data
