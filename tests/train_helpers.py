"""flame-train's command line run in-process by the trainer's tests."""
import contextlib
import io
import os

from flame.cli import train as cli


@contextlib.contextmanager
def cache_dir(path):
    """FLAME_CACHE_DIR set to `path` inside the block, restored after."""
    old = os.environ.get("FLAME_CACHE_DIR")
    os.environ["FLAME_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLAME_CACHE_DIR")
        else:
            os.environ["FLAME_CACHE_DIR"] = old


def run_cli(argv, cache) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `flame-train ARGV` with FLAME_CACHE_DIR = cache."""
    out, err = io.StringIO(), io.StringIO()
    with cache_dir(cache), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()
