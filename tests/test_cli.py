"""flame-compile, run in-process through main(argv) (plus real runs of the console script and
of `python -m flame.cli.compile`)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from flame.cli import compile as cli
from flame.ir.interp import run_graph
from flame.ir.passes import optimize

MLP = os.path.join(cli.EXAMPLES, "mlp.py")
BLOCK = os.path.join(cli.EXAMPLES, "block.py")
MLP_ARGS = ["--arg", "x:f32[32,4]", "--arg", "y:f32[32,1]"]

USER_FILE = """\
import flame.nn as nn
import flame.nn.functional as F


def f(x, w):
    h = x @ w
    return F.silu(h)


def noop(x):
    return (x + 0.0) * 1.0


def broken(x, w):
    y = x * 2.0
    return y @ w


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x).tanh()
"""


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    """model.py in the current directory, so dumps name it `model.py:LINE`."""
    (tmp_path / "model.py").write_text(USER_FILE)
    monkeypatch.chdir(tmp_path)
    return "model.py"


def line_of(text: str, source: str = USER_FILE) -> int:
    return next(i for i, l in enumerate(source.splitlines(), 1) if text in l)


def compile_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def equations(dump: str) -> list:
    return [l for l in dump.splitlines() if l.startswith("  ") and " = " in l]


# ---------------------------------------------------------------- the built-in default


def test_default_is_the_mlp_training_step(capsys):
    rc, out, err = compile_cli(capsys)
    assert rc == 0 and err == ""
    assert out.startswith("def loss_grad(x:f32[32,4], y:f32[32,1]; fc1.weight:f32[8,4]@p, fc1.bias:f32[8]@p, "
                          "fc2.weight:f32[1,8]@p, fc2.bias:f32[1]@p):\n")
    assert "  # backward\n" in out
    for g in ("gx:f32[32,4]", "gy:f32[32,1]", "gfc1.weight:f32[8,4]", "gfc2.bias:f32[1]"):
        assert g in out
    assert re.search(r"matmul\[tb\] x, fc1.weight +# flame/examples/mlp\.py:\d+  fc1\n", out)
    assert "return (value, gx, gy, gfc1.weight, gfc1.bias, gfc2.weight, gfc2.bias)" in out
    # the note after the dump says what was shown and how to dump your own function
    assert out.endswith(cli.DEFAULT_NOTE)
    assert "flame-compile path.py:fn --arg x:f32[2,4] --grad" in cli.DEFAULT_NOTE
    # the same as spelling it out
    rc, explicit, _ = compile_cli(capsys, MLP + ":loss", *MLP_ARGS, "--grad")
    assert rc == 0 and out == explicit + cli.DEFAULT_NOTE


def test_default_training_step_matches_torch():
    """The graph the default dumps computes torch's loss and gradients."""
    graph, passes, default = cli.prepare(cli.make_parser().parse_args([]))
    graph = optimize(graph, passes)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((32, 4), np.float32), rng.standard_normal((32, 1), np.float32)
    feeds = {"x": x, "y": y, **{k: p.data for k, p in graph.params.items()}}
    outs = dict(zip(graph.output_names, run_graph(graph, feeds)))

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in feeds.items()}
    h = torch.nn.functional.silu(t["x"] @ t["fc1.weight"].T + t["fc1.bias"])
    loss = torch.nn.functional.mse_loss(h @ t["fc2.weight"].T + t["fc2.bias"], t["y"])
    loss.backward()
    np.testing.assert_allclose(outs["value"], loss.item(), rtol=1e-5)
    for k, v in t.items():
        np.testing.assert_allclose(outs["g" + k], v.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- functions and classes


def test_function_from_a_file(capsys, user_file):
    rc, out, err = compile_cli(capsys, "model.py:f", "--arg", "w:f32[4,3]", "--arg", "x:f32[2,4]")
    assert rc == 0 and err == ""
    assert out.startswith("def f(x:f32[2,4], w:f32[4,3]):\n")   # matched by name, in the signature's order
    eq = equations(out)
    assert [l.split(" = ")[1].split()[0] for l in eq] == ["matmul", "sigmoid", "mul"]
    assert eq[0].endswith(f"# model.py:{line_of('h = x @ w')}")
    assert eq[2].endswith(f"# model.py:{line_of('return F.silu(h)')}")
    assert "# backward" not in out


def test_module_class_with_grad_and_init(capsys, user_file):
    rc, out, err = compile_cli(capsys, "model.py:Net", "--init", "width=6", "--arg", "x:f32[5,4]",
                               "--grad", "--loss", "sum")
    assert rc == 0, err
    assert out.startswith("def Net_grad(x:f32[5,4]; fc.weight:f32[6,4]@p, fc.bias:f32[6]@p):\n")
    assert re.search(rf"tanh \S+ +# model.py:{line_of('.tanh()')}\n", out)
    assert "# flame/cli/compile.py:" in out   # the --loss reduction names where it was added
    assert "return (value, gx, gfc.weight, gfc.bias)" in out


def test_block_class_grad_has_every_parameter(capsys):
    rc, out, err = compile_cli(capsys, BLOCK + ":Block", "--arg", "x:f32[1,8,2,2]", "--grad", "--loss", "mean")
    assert rc == 0, err
    for p in ("conv.weight:f32[8,8,3,3]", "norm.weight:f32[8]", "to_q.weight:f32[8,8]", "to_out.bias:f32[8]"):
        assert f"  g{p} = " in out
    assert re.search(r"conv2d\[.*\] x, conv.weight +# flame/examples/block\.py:\d+  conv\n", out)


# ---------------------------------------------------------------- passes


def test_after_each_pass_keeps_scopes_and_lines(capsys):
    rc, out, err = compile_cli(capsys, "--after-each-pass")
    assert rc == 0, err
    sections = re.split(r"^# (traced|after \w+)\n", out, flags=re.M)[1:]
    heads, dumps = sections[0::2], sections[1::2]
    assert heads == ["traced"] + [f"after {p.__name__}" for p in cli.P.DEFAULT_PASSES]
    for head, dump in zip(heads, dumps):
        eq = equations(dump)
        assert eq, head
        for l in eq:   # every equation keeps its source line (forward) or rule (backward)
            assert re.search(r" # (flame/examples/mlp\.py:\d+|\[[\w.]+\])( |$)", l), f"{head}: {l}"
        assert re.search(r"matmul\[tb\] x, fc1.weight +# flame/examples/mlp\.py:\d+  fc1$", dump, re.M), head
        assert re.search(r"gfc2.weight:f32\[1,8\] = .* # \[matmul.rhs\]  fc2$", dump, re.M), head


@pytest.mark.parametrize("passes, kept", [
    (None, []),                                         # the default passes remove both identities
    ("cse", ["add", "mul"]),
    ("simplify,dce", []),
])
def test_passes_selects_by_name(capsys, user_file, passes, kept):
    extra = ["--passes", passes] if passes else []
    rc, out, err = compile_cli(capsys, "model.py:noop", "--arg", "x:f32[3]", *extra)
    assert rc == 0, err
    assert [l.split(" = ")[1].split()[0] for l in equations(out)] == kept


def test_passes_with_after_each_pass_headers(capsys, user_file):
    rc, out, _ = compile_cli(capsys, "model.py:f", "--arg", "x:f32[2,4]", "--arg", "w:f32[4,3]",
                             "--passes", "simplify,cse,dce", "--after-each-pass")
    assert rc == 0
    assert re.findall(r"^# (traced|after \w+)$", out, re.M) == ["traced", "after simplify", "after cse", "after dce"]


def test_no_opt_prints_the_graph_as_traced(capsys, user_file):
    rc, out, _ = compile_cli(capsys, "model.py:noop", "--arg", "x:f32[3]", "--no-opt")
    assert rc == 0 and [l.split(" = ")[1].split()[0] for l in equations(out)] == ["add", "mul"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, message", [
    (["model.py:f", "--arg", "x:f33[2,4]", "--arg", "w:f32[4,3]"], "bad --arg 'x:f33[2,4]': unknown dtype 'f33'"),
    (["model.py:f", "--arg", "x:f32[2,a]", "--arg", "w:f32[4,3]"], "bad --arg 'x:f32[2,a]'"),
    (["model.py:f", "--arg", "x:f32(2,4)", "--arg", "w:f32[4,3]"], "bad --arg 'x:f32(2,4)': expected NAME:DTYPE[d0,d1,...]"),
    (["model.py:f", "--arg", "xf32[2,4]", "--arg", "w:f32[4,3]"], "bad --arg 'xf32[2,4]'"),
    (["model.py:f", "--arg", "x:f32[-2]", "--arg", "w:f32[4,3]"], "bad --arg 'x:f32[-2]'"),
    (["model.py:f", "--arg", "x:f32[2,4]", "--arg", "z:f32[4,3]"], "f has no parameter 'z'; its parameters are: x, w"),
    (["model.py:f", "--arg", "x:f32[2,4]"], "f needs --arg w:"),
    (["model.py:f", "--arg", "x:f32[2,4]", "--arg", "w:f32[4,3]", "--grad"], "pass --loss sum or --loss mean"),
    (["model.py:f", "--arg", "x:f32[2,4]", "--arg", "w:f32[4,3]", "--passes", "cse,fuse"],
     "unknown pass 'fuse'; valid passes are: simplify, zero_centred_sums, constant_fold, cse, dce"),
    (["missing.py:f", "--arg", "x:f32[2]"], "missing.py: no such file"),
    (["model.py:g", "--arg", "x:f32[2]"], "model.py defines no 'g'"),
    (["model.py", "--arg", "x:f32[2]"], "expected FILE.py:NAME"),
    (["model.py:Net", "--init", "depth=2", "--arg", "x:f32[2,4]"], "cannot build Net(depth=2)"),
    (["model.py:Net", "--init", "width=eight", "--arg", "x:f32[2,4]"], "'eight' is not a Python literal"),
    (["model.py:f", "--init", "width=3", "--arg", "x:f32[2,4]", "--arg", "w:f32[4,3]"], "only applies to a module class"),
    (["--arg", "x:f32[2]"], "need a target"),
])
def test_command_line_errors(capsys, user_file, argv, message):
    rc, out, err = compile_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("flame-compile: error: ") and message in err, err


def test_grad_with_loss_mean_is_accepted(capsys, user_file):
    rc, out, err = compile_cli(capsys, "model.py:f", "--arg", "x:f32[2,4]", "--arg", "w:f32[4,3]", "--grad", "--loss", "mean")
    assert rc == 0, err
    assert "return (value, gx, gw)" in out


def test_shape_error_names_the_users_line(capsys, user_file):
    rc, out, err = compile_cli(capsys, "model.py:broken", "--arg", "x:f32[2,4]", "--arg", "w:f32[3,3]")
    assert rc == 1 and out == ""
    assert f"model.py:{line_of('return y @ w')}: matmul of f32[2,4] and f32[3,3]" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- real processes


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_console_script_runs_the_default(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "flame-compile")
    assert os.path.exists(exe), "the flame-compile console script is missing: pip install -e ."
    r = _run([exe], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def loss_grad(") and r.stdout.endswith(cli.DEFAULT_NOTE)


def test_python_m_reports_a_shape_error_without_traceback(tmp_path):
    (tmp_path / "model.py").write_text(USER_FILE)
    r = _run([sys.executable, "-m", "flame.cli.compile", "model.py:broken", "--arg", "x:f32[2,4]",
              "--arg", "w:f32[3,3]"], tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"flame-compile: ShapeError: model.py:{line_of('return y @ w')}: matmul of f32[2,4] "
                        "and f32[3,3]: inner sizes 4 and 3 differ\n")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--arg", "--init", "--grad", "--loss", "--after-each-pass", "--passes", "--no-opt"):
        assert opt in out
    assert "exit status" in out
