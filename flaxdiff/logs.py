"""Logging set-up of flaxdiff's command-line entry points (``training.py``, ``flaxdiff``).

Libraries underneath (orbax, absl, grain, jax) log internal warnings that mean nothing to a user on a normal run
(e.g. orbax's "Metadata file does not exist" while reading a checkpoint). They go to the debug level: shown with
``FLAXDIFF_LOG_LEVEL=DEBUG`` (or ``--debug``), hidden otherwise.
"""
from __future__ import annotations

import logging
import os

__all__ = ["setup_logging", "QUIET_LIBRARIES"]

QUIET_LIBRARIES = ("absl", "orbax", "jax._src", "grain", "tensorstore", "etils")


def setup_logging(level: int | str | None = None, fmt: str = "%(asctime)s %(name)s: %(message)s",
                  datefmt: str | None = "%H:%M:%S", debug: bool = False) -> None:
    """Root handler at ``level`` (default INFO, or $FLAXDIFF_LOG_LEVEL); the storage and runtime libraries at
    ERROR unless debugging."""
    chosen = level if level is not None else os.environ.get("FLAXDIFF_LOG_LEVEL", "DEBUG" if debug else "INFO")
    logging.basicConfig(level=chosen, format=fmt, datefmt=datefmt)
    verbose = debug or str(chosen).upper() in ("DEBUG", str(logging.DEBUG))
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.DEBUG if verbose else absl_logging.ERROR)
