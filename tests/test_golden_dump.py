"""Golden dumps: the exact text flame-compile prints for the example models.

The dump is the spec (DESIGN.md): a change to tracing, autodiff, the passes or the printer
shows up here as a diff to read. When the change is intended, regenerate the files with

    FLAME_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_dump.py

and review `git diff tests/golden/` like code. Source lines of the examples print as
flame/examples/*.py wherever pytest runs (the tracer names files inside flame relative to
flame's parent directory), so the files do not depend on the working directory.
"""
import difflib
import os

import pytest

from flame.cli import compile as cli

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
UPDATE = os.environ.get("FLAME_UPDATE_GOLDEN") == "1"

CASES = {
    # the training step: loss, then gradients for x, y and the four parameters
    "mlp_train_step": [os.path.join(cli.EXAMPLES, "mlp.py") + ":loss",
                       "--arg", "x:f32[32,4]", "--arg", "y:f32[32,1]", "--grad"],
    # conv 3x3 -> group_norm -> silu -> 2-head self-attention -> residual, forward only
    "block_forward": [os.path.join(cli.EXAMPLES, "block.py") + ":Block", "--arg", "x:f32[2,8,4,4]"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_dump(name, capsys):
    rc = cli.main(CASES[name])
    out, err = capsys.readouterr()
    assert rc == 0, err
    path = os.path.join(GOLDEN, f"{name}.txt")
    if UPDATE:
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(out)
    assert os.path.exists(path), f"{path} is missing: run FLAME_UPDATE_GOLDEN=1 pytest {__file__}"
    with open(path) as f:
        want = f.read()
    if out != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), out.splitlines(True),
                                            f"golden/{name}.txt", "flame-compile output"))
        pytest.fail(f"the dump of {name} differs from its golden file "
                    f"(FLAME_UPDATE_GOLDEN=1 regenerates it if the change is intended):\n{diff}")
