import pytest


@pytest.fixture(scope="session")
def train_cache_dir(tmp_path_factory):
    """One FLAME_CACHE_DIR for the trainer's end-to-end tests: compiled kernels of the
    quickstart's training step are reused by the later runs instead of compiled again."""
    return tmp_path_factory.mktemp("flame-cache")
