"""Helpers shared by the benchmark scripts (each script runs with ``benchmarks/`` first on ``sys.path``).

Every benchmark reports the machine's load average next to its numbers, in its JSON (:func:`load_average`) and in
its printed lines (:func:`load_text`), so that a result measured on a busy machine can be told apart.
"""
from __future__ import annotations

import os

__all__ = ["load_average", "load_text"]


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``); ``json`` writes them as a list."""
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def load_text(sep: str = ", ", count: int = 3) -> str:
    """The first ``count`` load averages with two decimals joined by ``sep``, e.g. ``"1.23, 0.98, 0.75"``."""
    return sep.join(f"{value:.2f}" for value in load_average()[:count])
