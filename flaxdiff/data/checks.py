"""Checks of a data source made once, before training starts."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_finite"]


def check_finite(source: Any, name: str) -> None:
    """ValueError naming the source and the first bad example when an in-memory float source holds NaN or inf.

    Sources that decode files (image folders, TFDS) yield uint8 pixels, which are always finite; array sources
    (``.npz``, latent caches) are checked whole, in chunks, without copying them.
    """
    images = getattr(source, "images", None)
    if not isinstance(images, np.ndarray) or not np.issubdtype(images.dtype, np.floating):
        return
    chunk = 4096
    for start in range(0, len(images), chunk):
        finite = np.isfinite(images[start:start + chunk]).reshape(min(chunk, len(images) - start), -1).all(axis=1)
        if not finite.all():
            index = start + int(np.argmin(finite))
            count = sum(int((~np.isfinite(images[s:s + chunk]).reshape(min(chunk, len(images) - s), -1)
                                 .all(axis=1)).sum()) for s in range(0, len(images), chunk))
            raise ValueError(f"data.dataset {name}: {count} example(s) hold NaN or inf values (the first is example "
                             f"{index}); accepted: finite pixel values")
