"""Shared test fixtures, and the XLA settings of the test session (set before jax is imported).

The suite is dominated by XLA:CPU compile time, not run time, so tests compile with LLVM optimisation level 0
(about 25% less CPU for the model tests) and with XLA:CPU's classic elemental emitters instead of its MLIR fusion
emitters (about 40% less compile time for a tiny U-Net / DiT train step, the same run time), and share a persistent
compilation cache between pytest-xdist workers and the training subprocesses the tests launch. None of this changes
what is computed beyond float rounding.
"""
import contextlib
import os
import pathlib
import subprocess
import sys

_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")  # before the test session's settings below
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} --xla_backend_optimization_level=0"
if "xla_llvm_disable_expensive_passes" not in _flags:
    _flags = f"{_flags} --xla_llvm_disable_expensive_passes=true"
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags = f"{_flags} --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_cache"))

import jax  # noqa: E402
import pytest  # noqa: E402


def optimised_subprocess_env() -> dict[str, str]:
    """This environment with XLA's default optimisation (the caller's XLA_FLAGS, not the session's settings), for a
    subprocess dominated by run time rather than compile time (training the digit classifier: about half the CPU)."""
    env = dict(os.environ)
    if _USER_XLA_FLAGS is None:
        env.pop("XLA_FLAGS", None)
    else:
        env["XLA_FLAGS"] = _USER_XLA_FLAGS
    return env


def host_devices_env(count: int) -> dict[str, str]:
    """This environment for a CPU subprocess with ``count`` host devices: the session's XLA settings plus
    ``--xla_force_host_platform_device_count``, so its compiles keep the test settings."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="session")
def mnist_classifier_dir(tmp_path_factory):
    """A cache directory holding the default MNIST classifier (32 px), trained from scratch by
    ``flaxdiff.metrics.get_mnist_classifier`` (tests/test_metrics.py checks its accuracy).

    The training runs in a subprocess at XLA's default optimisation: it is run-time bound, and the session's
    settings would double its CPU time. One directory per test run: pytest-xdist workers share the parent of their
    base temp dir, and the classifier's file lock makes a concurrent caller wait for the first one's training."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        directory = tmp_path_factory.getbasetemp().parent / "flaxdiff_classifier_cache"
    else:
        directory = tmp_path_factory.mktemp("classifier_cache")
    trainer = "import sys; from flaxdiff import metrics; metrics.get_mnist_classifier(32, cache_dir=sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", trainer, str(directory)], capture_output=True, text=True,
                          env=optimised_subprocess_env(), timeout=900)
    assert proc.returncode == 0, f"training the MNIST classifier failed:\n{proc.stderr[-3000:]}"
    return directory


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
# stolen; the order within every file is unchanged and nothing is skipped. test_metrics.py trains the digit classifier
# (mnist_classifier_dir) into the run's shared cache, where test_cli.py's eval then finds it instead of training it.
RUN_FIRST = ("test_metrics.py", "test_text_encoders.py", "test_training_script.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in RUN_FIRST)  # stable: every other test keeps its place
