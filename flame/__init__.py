"""flame: trace Python model code into a static graph, differentiate it, optimise it, run it."""
from .ir import dtypes
from .ir.dtypes import bf16, boolean, f16, f32, f64, i32, i64
from .ir.errors import FlameError, ShapeError, TraceError
from .ir.graph import Graph, Node
from .ir.tracer import spec, trace
from .ir.tensor import Tensor
from .ir.autodiff import grad, value_and_grad
from .ir.ops import (cat, concat, const, full, ones, rand_normal, rand_uniform, stack,
                     stop_gradient, where, zeros)
from .compile import compile, plan
from .nn.init import manual_seed
from . import nn

__version__ = "0.1.0"
from .ir.printer import dump
from .ir import passes
