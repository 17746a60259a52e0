"""A tiny Linen conv denoiser with the flaxdiff model call contract, shared by the trainer tests and helpers."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class TinyDenoiser(nn.Module):
    """conv -> + noise/label embedding -> silu -> dropout -> conv; a few hundred parameters."""

    features: int = 8
    num_classes: int = 0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Any, c_noise: Any, cond: Any = None, train: bool = False) -> Any:
        h = nn.Conv(self.features, (3, 3))(x)
        emb = nn.Dense(self.features)(jnp.stack([jnp.sin(c_noise / 100.0), jnp.cos(c_noise / 100.0)], -1))
        if self.num_classes and cond is not None and "label" in cond:
            emb = emb + nn.Embed(self.num_classes + 1, self.features)(cond["label"])
        h = nn.silu(h + emb[:, None, None, :].astype(h.dtype))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Conv(x.shape[-1], (3, 3))(h)


MODEL_CONFIG = {"name": "tiny_test_denoiser", "features": 8}


def toy_batches(seed: int, batch: int, size: int = 8, channels: int = 1, num_classes: int = 0):
    """An endless, resumable iterator of deterministic toy batches (position = number of batches drawn)."""
    return ToyIterator(seed, batch, size, channels, num_classes)


class ToyIterator:
    def __init__(self, seed: int, batch: int, size: int, channels: int, num_classes: int) -> None:
        self.seed, self.batch, self.size, self.channels, self.num_classes = seed, batch, size, channels, num_classes
        self.position = 0
        self.nan_at: set[int] = set()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.position])
        base = np.linspace(-1, 1, self.size, dtype=np.float32)
        image = np.tanh(base[None, :, None, None] * rng.normal(1.0, 0.3, (self.batch, 1, 1, self.channels))
                        + rng.normal(0, 0.1, (self.batch, self.size, self.size, self.channels))).astype(np.float32)
        if self.position in self.nan_at:
            image[0, 0, 0, 0] = np.nan
        self.position += 1
        out = {"image": image}
        if self.num_classes:
            out["label"] = rng.integers(0, self.num_classes, (self.batch,)).astype(np.int32)
        return out

    def get_state(self) -> bytes:
        return str(self.position).encode()

    def set_state(self, state: bytes) -> None:
        self.position = int(state.decode())
