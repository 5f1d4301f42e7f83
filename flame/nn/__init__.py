from . import functional, init
from .layers import (GELU, Conv2d, Dropout, Embedding, GroupNorm, Identity, LayerNorm, Linear,
                     ModuleList, Sequential, SiLU)
from .module import Module, Parameter, StateDictError
