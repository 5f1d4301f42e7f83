"""The generator that layer initialisation draws from, and the shape-only mode."""
from contextlib import contextmanager

import numpy as np

_rng = np.random.default_rng(0)


def manual_seed(seed: int):
    global _rng
    _rng = np.random.default_rng(seed)


def rng() -> np.random.Generator:
    return _rng


_shape_only = False


@contextmanager
def shape_only():
    """Build modules without allocating their weights: each Parameter made inside holds a
    read-only zero-strided view of one zero (np.broadcast_to), so a full-size model's
    state_dict() keys, shapes and num_parameters() cost no memory (like torch's meta device).
    load_state_dict replaces the views with real arrays."""
    global _shape_only
    saved, _shape_only = _shape_only, True
    try:
        yield
    finally:
        _shape_only = saved


def shape_only_active() -> bool:
    return _shape_only
