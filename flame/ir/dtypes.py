"""The dtypes a graph node can have, and their numpy storage types."""
from __future__ import annotations

import numpy as np
import ml_dtypes


class DType:
    """A named element type. Compared by identity: there is one object per dtype."""

    def __init__(self, name: str, np_dtype, is_float: bool):
        self.name = name
        self.np = np.dtype(np_dtype)
        self.is_float = is_float
        self.itemsize = self.np.itemsize

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self):  # keep identity across pickling/copying
        return (by_name, (self.name,))


f16 = DType("f16", np.float16, True)
bf16 = DType("bf16", ml_dtypes.bfloat16, True)
f32 = DType("f32", np.float32, True)
f64 = DType("f64", np.float64, True)
i32 = DType("i32", np.int32, False)
i64 = DType("i64", np.int64, False)
boolean = DType("bool", np.bool_, False)

ALL = (f16, bf16, f32, f64, i32, i64, boolean)
_BY_NAME = {d.name: d for d in ALL}
_ALIASES = {"float16": f16, "half": f16, "bfloat16": bf16, "float32": f32, "float": f32,
            "float64": f64, "double": f64, "int32": i32, "int64": i64, "long": i64, "bool_": boolean}
_BY_NP = {d.np: d for d in ALL}


def by_name(name: str) -> DType:
    return _BY_NAME[name]


def as_dtype(x) -> DType:
    """Accept a DType, a flame name ('f32'), a numpy name ('float32') or a numpy dtype."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str):
        d = _BY_NAME.get(x) or _ALIASES.get(x)
        if d is not None:
            return d
    try:
        d = _BY_NP.get(np.dtype(x))
    except TypeError:
        d = None
    if d is None:
        raise TypeError(f"unknown dtype {x!r}; flame knows {', '.join(_BY_NAME)}")
    return d


_FLOAT_RANK = {f16: 1, bf16: 1, f32: 2, f64: 3}


def promote(a: DType, b: DType) -> DType:
    """Result dtype of a binary op: like torch for tensor-tensor, floats win over ints."""
    if a is b:
        return a
    if a.is_float and b.is_float:
        if {a, b} == {f16, bf16}:
            return f32
        return a if _FLOAT_RANK[a] > _FLOAT_RANK[b] else b
    if a.is_float:
        return a
    if b.is_float:
        return b
    if boolean in (a, b):
        return b if a is boolean else a
    return i64
