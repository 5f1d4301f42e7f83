"""Flatten nested tuples/lists/dicts of leaves and rebuild them (a tiny pytree)."""
from __future__ import annotations


def flatten(x, path=""):
    """-> (leaves, treedef, paths). Leaves are anything not a tuple, list or dict."""
    if isinstance(x, (tuple, list)):
        leaves, defs, paths = [], [], []
        for i, v in enumerate(x):
            l, d, p = flatten(v, f"{path}.{i}" if path else str(i))
            leaves += l
            defs.append(d)
            paths += p
        return leaves, (type(x), defs), paths
    if isinstance(x, dict):
        leaves, defs, paths = [], [], []
        for k, v in x.items():
            l, d, p = flatten(v, f"{path}.{k}" if path else str(k))
            leaves += l
            defs.append((k, d))
            paths += p
        return leaves, (dict, defs), paths
    if x is None:
        return [], (None, None), []
    return [x], ("leaf", None), [path]


def unflatten(treedef, leaves):
    it = iter(leaves)
    out = _build(treedef, it)
    return out


def _build(d, it):
    kind, sub = d
    if kind == "leaf":
        return next(it)
    if kind is None:
        return None
    if kind is dict:
        return {k: _build(s, it) for k, s in sub}
    return kind(_build(s, it) for s in sub)


def count_leaves(d) -> int:
    kind, sub = d
    if kind == "leaf":
        return 1
    if kind is None:
        return 0
    if kind is dict:
        return sum(count_leaves(s) for _, s in sub)
    return sum(count_leaves(s) for s in sub)
