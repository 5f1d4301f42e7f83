"""Bad input gets an error that says what is wrong and where: this file's name and the line
of the offending expression, the unknown dtype or state-dict key by name."""
import inspect
import os

import numpy as np
import pytest

import flame
import flame.nn as nn
import flame.nn.functional as F

rng = np.random.default_rng()
HERE = os.path.basename(__file__)


def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def line_of(fn, marker):
    """Absolute line number of the source line of fn that holds `marker`."""
    src, first = inspect.getsourcelines(fn)
    return first + next(i for i, s in enumerate(src) if marker in s)


def bad_add(x, y):
    z = x * 2.0
    return z + y  # BAD


def bad_matmul(x, y):
    h = x.sum(-1, keepdim=True) * x
    return h @ y  # BAD


def bad_conv(x, w):
    x = F.silu(x)
    return F.conv2d(x, w, padding=1)  # BAD


class BadBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        h = self.proj(x)
        return h + x  # BAD


@pytest.mark.parametrize("fn,args,words", [
    (bad_add, (r(3, 4), r(5, 4)), ["broadcast", "[3,4]", "[5,4]"]),
    (bad_matmul, (r(3, 4), r(5, 2)), ["matmul", "4", "5"]),
    (bad_conv, (r(1, 3, 6, 6), r(2, 4, 3, 3)), ["conv2d", "3 channels", "4"]),
], ids=["add", "matmul", "conv_channels"])
def test_shape_error_names_file_and_line(fn, args, words):
    with pytest.raises(flame.ShapeError) as e:
        flame.compile(fn, *args)
    msg = str(e.value)
    assert f"{HERE}:{line_of(fn, '# BAD')}:" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_shape_error_inside_module_names_the_forward_line():
    m = BadBlock()
    with pytest.raises(flame.ShapeError) as e:
        flame.trace(m, r(2, 4))
    assert f"{HERE}:{line_of(BadBlock.forward, '# BAD')}:" in str(e.value), str(e.value)


def test_shape_error_from_spec():
    with pytest.raises(flame.ShapeError) as e:
        flame.trace(bad_add, flame.spec((2, 3)), flame.spec((3, 2)))
    assert f"{HERE}:{line_of(bad_add, '# BAD')}:" in str(e.value)


def test_unknown_dtype_lists_the_known_ones():
    with pytest.raises(TypeError) as e:
        flame.spec((2,), "f17")
    msg = str(e.value)
    assert "f17" in msg
    for known in ("f16", "bf16", "f32", "f64", "i32", "i64", "bool"):
        assert known in msg


def test_gradient_of_non_scalar_says_where_and_to_reduce():
    def f(x):
        return x * 2.0
    vg = flame.value_and_grad(f)
    with pytest.raises(flame.ShapeError) as e:
        vg(r(2, 3))  # GRAD
    msg = str(e.value)
    assert f"{HERE}:{line_of(test_gradient_of_non_scalar_says_where_and_to_reduce, '# GRAD')}" in msg, msg
    assert "scalar" in msg and "reduce" in msg and "[2,3]" in msg


def test_module_called_outside_a_trace():
    with pytest.raises(flame.TraceError) as e:
        nn.Linear(2, 3)(r(4, 2))
    msg = str(e.value)
    assert "Linear" in msg and "outside a trace" in msg and "flame.compile" in msg


def test_missing_state_dict_key_is_named():
    m = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    sd = dict(m.state_dict())
    del sd["1.weight"]
    with pytest.raises(nn.StateDictError) as e:
        m.load_state_dict(sd)
    assert "1.weight" in str(e.value) and "missing" in str(e.value)
    assert isinstance(e.value, KeyError)   # except KeyError still catches it


def test_unknown_backend_is_named():
    with pytest.raises(ValueError) as e:
        flame.compile(lambda x: x * 2.0, r(3), backend="tpu")
    assert "tpu" in str(e.value) and "interp" in str(e.value)


def _have_gpu():
    try:
        from cuda.bindings import driver
        return int(driver.cuInit(0)[0]) == 0 and driver.cuDeviceGetCount()[1] > 0
    except Exception:
        return False


@pytest.mark.skipif(_have_gpu(), reason="a GPU is present: backend='cuda' works here")
def test_cuda_backend_without_gpu_says_so():
    with pytest.raises(RuntimeError) as e:
        flame.compile(lambda x: x * 2.0, r(3), backend="cuda")
    msg = str(e.value)
    assert "backend='cuda'" in msg and "GPU" in msg
