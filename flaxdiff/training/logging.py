"""Observability on process 0: a tqdm bar, a JSONL metrics file, TensorBoard event files and PNG sample grids.

Every method is a no-op on other processes (``enabled=False``), so callers need no ``process_index`` checks.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "image_grid", "save_image_grid"]


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, C) images in [-1, 1] into one uint8 (rows H, columns W, C) image, row-major."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    count, height, width, channels = images.shape
    columns = columns or int(math.ceil(math.sqrt(count)))
    rows = int(math.ceil(count / columns))
    pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    grid = np.zeros((rows * height, columns * width, channels), np.uint8)
    for index in range(count):
        r, c = divmod(index, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[index]
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, columns: int | None = None) -> Path:
    """Write ``image_grid(images)`` as a PNG (grey for C = 1, RGB for C = 3)."""
    from PIL import Image

    grid = image_grid(images, columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


class MetricsLogger:
    """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard, and drives the progress bar.

    The bar shows loss, steps/s, images/s and the ETA (tqdm's own); rates are measured between ``log`` calls.
    """

    def __init__(self, workdir: str | Path | None, total_steps: int, initial_step: int = 0, global_batch: int = 1,
                 enabled: bool = True, progress: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled and workdir is not None
        self.global_batch = global_batch
        self._start_time = self._last_time = time.perf_counter()
        self._last_step = initial_step
        self._bar = None
        self._jsonl = None
        self._writer = None
        self.workdir = Path(workdir) if workdir is not None else None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.workdir / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> dict[str, float]:
        """Record scalars at ``step``; for "train" also add steps/s and images/s since the previous call and
        ``elapsed_s``, the wall time since this logger was created (the start of ``fit``, compilation included)."""
        if not self.enabled:
            return {}
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        if prefix == "train":
            now = time.perf_counter()
            elapsed, steps = now - self._last_time, step - self._last_step
            if elapsed > 0 and steps > 0:
                scalars["steps_per_s"] = steps / elapsed
                scalars["images_per_s"] = steps * self.global_batch / elapsed
            scalars["elapsed_s"] = now - self._start_time
            self._last_time, self._last_step = now, step
        record = {"step": step, **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(f"{prefix}/{key}", value, step)
        if self._bar is not None and prefix == "train":
            shown = {k: f"{scalars[k]:.4g}" for k in ("loss", "steps_per_s", "images_per_s") if k in scalars}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
        return scalars

    def log_images(self, step: int, images: np.ndarray, name: str = "samples") -> Path | None:
        """Save a PNG grid to ``<workdir>/<name>/step_<step>.png`` and add it to TensorBoard."""
        if not self.enabled:
            return None
        path = save_image_grid(images, self.workdir / name / f"step_{step:08d}.png")
        if self._writer is not None:
            self._writer.add_image(name, image_grid(images), step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
        self._bar = self._jsonl = self._writer = None
