"""Shared test fixtures, and the XLA settings of the test session (set before jax is imported).

The suite is dominated by XLA:CPU compile time, not run time, so tests compile with LLVM optimisation level 0
(about 25% less CPU for the model tests) and share a persistent compilation cache between pytest-xdist workers and
the training subprocesses the tests launch. Neither changes what is computed.
"""
import contextlib
import os
import pathlib
import sys

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} --xla_backend_optimization_level=0"
if "xla_llvm_disable_expensive_passes" not in _flags:
    _flags = f"{_flags} --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_cache"))

import jax  # noqa: E402
import pytest  # noqa: E402


@contextlib.contextmanager
def _x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (restored afterwards)."""
    with _x64():
        yield


# the one-level unet-tiny (what these runs feed is the run directory and its CLI, not the architecture; a second
# U-Net level only doubles every compile of the model)
TINY_TRAINING_ARGS = ["--dataset", "digits", "--image-size", "16", "--model", "unet-tiny", "--model-config",
                      '{"channel_mult": [1]}',
                      "--batch-size", "16", "--steps", "2", "--log-every", "1", "--preview-per-class", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny class-conditional checkpoint written by training.py (2 steps of the one-level unet-tiny, 16x16 digits)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import training

    workdir = tmp_path_factory.mktemp("tiny_run")
    assert training.main([*TINY_TRAINING_ARGS, "--workdir", str(workdir)]) == 0
    return workdir


# pytest-xdist (`make test`: `-n 2 --dist worksteal`) splits the collection in two halves, one per worker, and an idle
# worker takes tests from the end of the other's queue. A file with an expensive module fixture that is split between
# the workers builds that fixture on both. These files run first, at the head of one worker's queue where nothing is
# stolen; the order within every file is unchanged and nothing is skipped.
RUN_FIRST = ("test_text_encoders.py", "test_training_script.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in RUN_FIRST)  # stable: every other test keeps its place
