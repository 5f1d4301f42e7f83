"""The static graph IR: typed nodes in topological order.

A node remembers where it came from: the module scope that created it
(`down_blocks.0.resnets.1.conv1`), the user's source line, and for backward
nodes the autodiff rule that emitted them (`matmul.rhs`). Passes copy these
fields onto every node they create in place of another, so they survive.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .dtypes import DType

_ids = itertools.count()


class Node:
    __slots__ = ("id", "op", "inputs", "attrs", "shape", "dtype", "scope", "loc", "rule")

    def __init__(self, op: str, inputs, attrs: dict, shape: tuple, dtype: DType,
                 scope: str = "", loc: str = "", rule: str | None = None):
        self.id = next(_ids)
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = attrs
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.scope = scope
        self.loc = loc
        self.rule = rule

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def type_str(self) -> str:
        return f"{self.dtype.name}[{','.join(map(str, self.shape))}]"

    def __repr__(self) -> str:
        return f"<Node {self.id} {self.op} {self.type_str}>"


@dataclass
class Graph:
    """inputs: 'input' nodes (attrs name, kind in arg|param|rng); nodes: every other node,
    topologically ordered; outputs: nodes returned, with optional names."""
    name: str
    inputs: list
    nodes: list
    outputs: list
    output_names: list = field(default_factory=list)
    out_tree: object = None  # how to rebuild the user's return structure (see flame.ir.tree)
    params: dict = field(default_factory=dict)  # param input name -> nn.Parameter

    def all_nodes(self):
        return list(self.inputs) + list(self.nodes)

    def users(self) -> dict:
        """node id -> list of nodes that read it."""
        out = {n.id: [] for n in self.all_nodes()}
        for n in self.nodes:
            for i in n.inputs:
                out[i.id].append(n)
        return out

    def replace(self, nodes=None, outputs=None, inputs=None) -> "Graph":
        return Graph(self.name, list(self.inputs if inputs is None else inputs),
                     list(self.nodes if nodes is None else nodes),
                     list(self.outputs if outputs is None else outputs),
                     list(self.output_names), self.out_tree, dict(self.params))

    def input_by_name(self, name: str) -> Node:
        for n in self.inputs:
            if n.attrs["name"] == name:
                return n
        raise KeyError(name)


def clone_node(n: Node, inputs, **changes) -> Node:
    """A copy of n reading `inputs`, keeping its scope, source line and rule."""
    fields = dict(op=n.op, attrs=n.attrs, shape=n.shape, dtype=n.dtype,
                  scope=n.scope, loc=n.loc, rule=n.rule)
    fields.update(changes)
    return Node(fields.pop("op"), inputs, **fields)
