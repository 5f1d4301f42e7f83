"""flame.nn layers against torch.nn with the same weights (forward and parameter gradients),
state_dict keys and loading, and the scope/source line/parameter names a traced graph carries."""
import inspect
import os

import numpy as np
import pytest
import torch

import flame
import flame.nn as nn

rng = np.random.default_rng()
NP = {"f64": np.float64, "f32": np.float32}
TOL = {"f64": 1e-6, "f32": 1e-4}


def r(*shape):
    return rng.standard_normal(shape)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


def randomize(module, dtype):
    """Fresh random weights (norm layers start at ones/zeros, which would hide mistakes)."""
    for _, p in module.named_parameters():
        p.data = r(*p.shape).astype(NP[dtype])
    return module


def to_torch_state(module):
    return {k: torch.tensor(np.asarray(v, np.float64)) for k, v in module.state_dict().items()}


# (id, flame module, torch module, input); flame modules are built in float64 and randomized
LAYERS = [
    ("linear", lambda d: nn.Linear(5, 4, dtype=d), lambda: torch.nn.Linear(5, 4), lambda: r(3, 2, 5)),
    ("linear_nobias", lambda d: nn.Linear(5, 4, bias=False, dtype=d),
     lambda: torch.nn.Linear(5, 4, bias=False), lambda: r(3, 5)),
    ("conv2d", lambda d: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=d),
     lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), lambda: r(2, 4, 7, 6)),
    ("conv2d_dilated_nobias", lambda d: nn.Conv2d(3, 2, (3, 2), padding=(2, 1), dilation=2, bias=False, dtype=d),
     lambda: torch.nn.Conv2d(3, 2, (3, 2), padding=(2, 1), dilation=2, bias=False), lambda: r(1, 3, 6, 6)),
    ("groupnorm", lambda d: nn.GroupNorm(3, 6, dtype=d), lambda: torch.nn.GroupNorm(3, 6), lambda: r(2, 6, 3, 4)),
    ("groupnorm_eps", lambda d: nn.GroupNorm(2, 4, eps=1e-3, dtype=d),
     lambda: torch.nn.GroupNorm(2, 4, eps=1e-3), lambda: r(3, 4, 5)),
    ("layernorm", lambda d: nn.LayerNorm(6, dtype=d), lambda: torch.nn.LayerNorm(6), lambda: r(2, 3, 6)),
    ("layernorm_2d", lambda d: nn.LayerNorm((3, 6), dtype=d), lambda: torch.nn.LayerNorm((3, 6)),
     lambda: r(2, 3, 6)),
    ("embedding", lambda d: nn.Embedding(7, 4, dtype=d), lambda: torch.nn.Embedding(7, 4),
     lambda: rng.integers(0, 7, (3, 5))),
    ("embedding_padding", lambda d: nn.Embedding(7, 4, padding_idx=1, dtype=d),
     lambda: torch.nn.Embedding(7, 4, padding_idx=1), lambda: np.array([[1, 3, 1, 0], [6, 1, 3, 2]])),
    ("sequential", lambda d: nn.Sequential(nn.Linear(4, 8, dtype=d), nn.SiLU(), nn.Linear(8, 3, dtype=d)),
     lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3)),
     lambda: r(5, 4)),
    ("sequential_list_gelu", lambda d: nn.Sequential([nn.Linear(4, 4, dtype=d), nn.GELU("tanh"), nn.LayerNorm(4, dtype=d)]),
     lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU("tanh"), torch.nn.LayerNorm(4)),
     lambda: r(2, 4)),
    ("dropout_eval", lambda d: nn.Sequential(nn.Linear(4, 4, dtype=d), nn.Dropout(0.5)).eval(),
     lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval(), lambda: r(3, 4)),
]


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("make,make_torch,make_x", [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS])
def test_layer_vs_torch(make, make_torch, make_x, dtype):
    m = randomize(make(dtype), dtype)
    tm = make_torch().double()
    tm.load_state_dict(to_torch_state(m))
    x = make_x()
    x = x.astype(NP[dtype]) if x.dtype.kind == "f" else x

    out = flame.compile(m, x)(x)
    want = tm(torch.tensor(x.astype(np.float64) if x.dtype.kind == "f" else x))
    assert rel_err(out, want.detach().numpy()) <= TOL[dtype]

    w = r(*want.shape)
    (want * torch.tensor(w)).sum().backward()
    _, grads = flame.value_and_grad(lambda x, w: (m(x) * w).sum(), params=m)(x, w.astype(NP[dtype]))
    tgrads = dict(tm.named_parameters())
    assert list(grads) == list(tgrads)
    for k, g in grads.items():
        assert g.dtype == NP[dtype]
        assert rel_err(g, tgrads[k].grad.numpy()) <= TOL[dtype], k


def test_dropout_module_train_and_eval():
    m = nn.Dropout(0.25)
    x = r(100, 200) + 3.0   # no zeros of its own
    y = flame.compile(m, x)(x, seed=5)
    keep = y != 0
    assert abs(keep.mean() - 0.75) < 5 * np.sqrt(0.25 * 0.75 / keep.size)
    np.testing.assert_allclose(y[keep], x[keep] / 0.75, rtol=1e-12)
    np.testing.assert_array_equal(flame.compile(m.eval(), x)(x, seed=5), x)


# ---- a nested model, built the same way in both frameworks

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.fc(x)  # FC_LINE
        return x + self.norm(h)  # NORM_LINE


class Net(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.embed = nn.Embedding(11, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, 3))

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        return x + self.norm(self.fc(x))


class TNet(torch.nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.embed = torch.nn.Embedding(11, d)
        self.blocks = torch.nn.ModuleList([TBlock(d) for _ in range(n)])
        self.head = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.SiLU(), torch.nn.Linear(2 * d, 3))

    def forward(self, idx):
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _torch_net():
    tn = TNet()
    with torch.no_grad():   # LayerNorm starts at ones/zeros; make every weight random
        for p in tn.parameters():
            p.copy_(torch.randn(p.shape))
    return tn


def _numpy_state(tn):
    return {k: v.detach().numpy() for k, v in tn.state_dict().items()}


def _line(marker):
    src, first = inspect.getsourcelines(Block.forward)
    return first + next(i for i, s in enumerate(src) if marker in s)


def test_state_dict_keys_match_torch():
    net = Net()
    assert list(net.state_dict()) == list(TNet().state_dict())
    for k, v in net.state_dict().items():
        assert v.shape == tuple(TNet().state_dict()[k].shape), k


def test_load_torch_state_dict_reproduces_torch():
    tn = _torch_net()
    net = Net()
    assert net.load_state_dict(_numpy_state(tn)) == ([], [])
    idx = rng.integers(0, 11, (4, 5))
    out = flame.compile(net, idx)(idx)
    want = tn(torch.tensor(idx)).detach().numpy()
    assert rel_err(out, want) <= 1e-5


def _broken_state():
    sd = _numpy_state(_torch_net())
    del sd["blocks.1.norm.bias"]
    sd["blocks.7.fc.weight"] = r(8, 8).astype(np.float32)
    sd["head.2.weight"] = r(3, 15).astype(np.float32)
    return sd


def test_load_state_dict_strict_names_every_bad_key():
    net = Net()
    with pytest.raises(nn.StateDictError) as e:
        net.load_state_dict(_broken_state())
    msg = str(e.value)
    for key in ("blocks.1.norm.bias", "blocks.7.fc.weight", "head.2.weight"):
        assert key in msg
    assert "[3, 16]" in msg and "[3, 15]" in msg   # model's shape and the state dict's


def test_load_state_dict_non_strict():
    net = Net()
    with pytest.raises(nn.StateDictError, match=r"head\.2\.weight"):   # mis-shaped: always refused
        net.load_state_dict(_broken_state(), strict=False)
    sd = _broken_state()
    sd["head.2.weight"] = r(3, 16).astype(np.float32)
    before = net.state_dict()["blocks.1.norm.bias"].copy()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert missing == ["blocks.1.norm.bias"] and unexpected == ["blocks.7.fc.weight"]
    got = net.state_dict()
    np.testing.assert_array_equal(got["head.2.weight"], sd["head.2.weight"])
    np.testing.assert_array_equal(got["blocks.0.fc.bias"], sd["blocks.0.fc.bias"])
    np.testing.assert_array_equal(got["blocks.1.norm.bias"], before)


def test_nested_gradients_match_torch():
    tn = _torch_net().double()
    net = Net()
    net.load_state_dict(_numpy_state(tn))
    idx = rng.integers(0, 11, (3, 4))
    w = r(3, 4, 3)
    (tn(torch.tensor(idx)) * torch.tensor(w)).sum().backward()
    _, grads = flame.value_and_grad(lambda i, w: (net(i) * w).sum(), params=net)(idx, w.astype(np.float32))
    tgrads = dict(tn.named_parameters())
    assert list(grads) == list(tgrads)
    for k, g in grads.items():
        assert rel_err(g, tgrads[k].grad.numpy()) <= 1e-4, k


def test_graph_carries_scope_source_line_and_param_names():
    net = Net()
    g = flame.trace(net, flame.spec((2, 5), "i64"))
    here = os.path.abspath(__file__)

    def nodes(scope):
        ns = [n for n in g.nodes if n.scope == scope]
        assert ns, f"no node with scope {scope!r}"
        return ns

    for scope, marker in (("blocks.1.norm", "# NORM_LINE"), ("blocks.2.fc", "# FC_LINE")):
        for n in nodes(scope):
            path, line = n.loc.rsplit(":", 1)
            assert os.path.abspath(path) == here and int(line) == _line(marker), (scope, n.loc)
    nodes("head.0")
    nodes("embed")

    params = {n.attrs["name"]: n for n in g.inputs if n.attrs["kind"] == "param"}
    assert set(params) == set(net.state_dict())
    assert params["blocks.1.norm.weight"].shape == (8,)
    assert g.params["blocks.0.fc.weight"] is net.blocks[0].fc.weight
    args = [n.attrs["name"] for n in g.inputs if n.attrs["kind"] == "arg"]
    assert args == ["idx"]
