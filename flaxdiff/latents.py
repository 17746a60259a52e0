"""Latent diffusion: train the KL autoencoder, cache scaled latents of a dataset, encode and decode.

Autoencoder objective (per example, D = H W C pixels), z ~ q(z | x) = N(mean, exp(logvar)):

    L(x) = ||x - Dec(z)||^2 / D + kl_weight * KL(q(z | x) || N(0, I)) / D

After training, the latent scale is estimated from data, ``scaling_factor = 1 / std(mean(q(z | x)))`` over up to
``scale_images`` training images, and saved in the exported config, so diffusion runs on unit-variance latents

    latents = (z - shift_factor) * scaling_factor,      x = Dec(latents / scaling_factor + shift_factor).

The autoencoder is written with :func:`flaxdiff.interop.export_params` (``config.json`` + ``model.safetensors``),
which :func:`flaxdiff.interop.load_autoencoder` reads. :func:`cache_latents` encodes a whole source once into an
``.npz`` (``latents`` (N, h, w, c) float32 scaled, ``labels``, optional ``captions``, ``scaling_factor``,
``latent_std``, ``autoencoder``); :func:`latent_source` reads it back through the data layer with the latents
passed through unchanged (``value_range = (-1, 1)`` makes the [-1, 1] rescaling the identity).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import data, interop, models

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = ["LatentCodec", "autoencoder_loss", "cache_latents", "load_codec", "latent_source", "read_cache_info",
           "train_autoencoder"]


@dataclasses.dataclass(frozen=True)
class LatentCodec:
    """A frozen autoencoder as two jitted maps: ``encode(images in [-1, 1]) -> scaled latents`` (posterior mean)
    and ``decode(scaled latents) -> images`` clipped to [-1, 1]."""

    module: Any
    params: Any
    config: models.AutoencoderConfig
    path: str
    encode: Callable[[Array], Array]
    decode: Callable[[Array], Array]

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(h, w, c) of the latents of an (H, W, C) image."""
        factor = self.config.downsample_factor
        return image_shape[0] // factor, image_shape[1] // factor, self.config.latent_channels


def load_codec(path: str | Path) -> LatentCodec:
    """The :class:`LatentCodec` of any directory :func:`flaxdiff.interop.load_autoencoder` reads."""
    module, params, config = interop.load_autoencoder(path)
    params = jax.tree.map(jnp.asarray, params)

    @jax.jit
    def encode(images: Array) -> Array:
        mean, _ = module.apply({"params": params}, images, method=models.AutoencoderKL.encode)
        return models.scale_latents(config, mean)

    @jax.jit
    def decode(latents: Array) -> Array:
        images = module.apply({"params": params}, models.unscale_latents(config, latents),
                              method=models.AutoencoderKL.decode)
        return jnp.clip(images, -1.0, 1.0)

    return LatentCodec(module, params, config, str(Path(path).absolute()), encode, decode)


def autoencoder_loss(module: models.AutoencoderKL, params: Any, images: Array, key: Array,
                     kl_weight: float) -> tuple[Array, dict[str, Array]]:
    """Batch mean of ``||x - Dec(z)||^2 / D + kl_weight KL / D`` with z a posterior sample drawn from ``key``
    (:class:`flaxdiff.objectives.AutoencoderLoss` applied to ``module``)."""
    from flaxdiff.objectives import AutoencoderLoss

    def apply_fn(p: Any, *inputs: Any, **kwargs: Any) -> Any:
        return module.apply({"params": p}, *inputs, **kwargs)

    return AutoencoderLoss(kl_weight)(apply_fn, params, {"image": images}, key)


class _Images:
    """The ``image`` entries of a loader's batches, with the loader's data position (get_state / set_state)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> "_Images":
        return self

    def __next__(self) -> dict[str, Any]:
        return {"image": next(self.loader)["image"]}

    def get_state(self) -> Any:
        return self.loader.get_state()

    def set_state(self, state: Any) -> None:
        self.loader.set_state(state)


def train_autoencoder(source: Any, out_dir: str | Path, *, model: str = "autoencoder-tiny",
                      model_config: Mapping[str, Any] | None = None, image_size: int = 32,
                      channels: int | None = None, batch_size: int = 64, steps: int = 500,
                      learning_rate: float = 1e-3, kl_weight: float = 1e-3, seed: int = 0,
                      scale_images: int = 512, log_every: int = 50, checkpoint_every: int = 1000,
                      resume: bool = True) -> Path:
    """Train an autoencoder preset on ``source`` with :class:`flaxdiff.objectives.AutoencoderLoss` through the
    :class:`flaxdiff.training.Trainer` (AdamW, warm-up then cosine decay to 5% of ``learning_rate``, gradient
    clipping at 1, no EMA) and export it (with the data-estimated scaling_factor) to ``out_dir``; returns
    ``out_dir``. ``batch_size`` is per process. Checkpoints (every ``checkpoint_every`` steps and at the end) go
    to ``out_dir/checkpoints``, and with ``resume`` a run continues from the latest one (its config must match);
    metrics go to ``out_dir/metrics.jsonl`` and TensorBoard, the logged history to ``out_dir/run_config.json``."""
    from flaxdiff.objectives import AutoencoderLoss
    from flaxdiff.training import Trainer, TrainConfig

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    if kl_weight < 0:
        raise ValueError(f"kl_weight={kl_weight} must be >= 0")
    loader = data.make_loader(source, batch_size, image_size, seed=seed, channels=channels)
    start_position = loader.get_state()
    first = next(loader)
    loader.set_state(start_position)
    overrides = dict(model_config or {})
    overrides.setdefault("in_channels", first["image"].shape[-1])
    overrides.setdefault("out_channels", first["image"].shape[-1])
    config = models.get_config(model, **overrides)
    if not isinstance(config, models.AutoencoderConfig):
        raise ValueError(f"autoencoder model {model!r} is not an autoencoder preset; use autoencoder-tiny or "
                         f"autoencoder")
    train_config = TrainConfig(learning_rate=learning_rate, warmup_steps=min(50, steps // 10 + 1),
                               lr_decay="cosine", end_lr_fraction=0.05, weight_decay=1e-4, grad_clip=1.0,
                               ema_decay=0.0, seed=seed, total_steps=steps, log_every=log_every,
                               checkpoint_every=checkpoint_every)
    trainer = Trainer(config.make(), config.to_config(), train_config=train_config,
                      example_batch={"image": first["image"]}, loss=AutoencoderLoss(kl_weight), workdir=out_dir,
                      data_config={"image_size": image_size, "channels": channels})
    start = time.perf_counter()
    trainer.fit(_Images(loader), resume=resume)
    trainer.close()
    params = jax.device_get(trainer.state.params)     # replicated (fsdp = 1): every process holds all of it
    history = [{k: h[k] for k in ("step", "loss", "mse", "kl", "grad_norm", "lr") if k in h} for h in trainer.history]
    for entry in history:
        logger.info("autoencoder step %d: loss %.5f mse %.5f kl %.4f", entry["step"], entry["loss"], entry["mse"],
                    entry["kl"])
    scale_loader = data.make_loader(source, min(scale_images, len(source)), image_size, seed=seed + 1,
                                    channels=channels, num_epochs=1)
    sample = jnp.asarray(next(scale_loader)["image"])
    scaling = models.estimate_latent_scale(trainer.model, params, sample)
    config = config.replace(scaling_factor=float(scaling), shift_factor=None)
    if jax.process_index() == 0:
        interop.export_params(params, config, out_dir,
                              run_config={"history": history, "kl_weight": kl_weight, "steps": steps,
                                          "batch_size": batch_size, "image_size": image_size,
                                          "train_seconds": time.perf_counter() - start})
    logger.info("autoencoder: scaling_factor %.4f estimated from %d images; exported to %s", scaling,
                sample.shape[0], out_dir)
    return Path(out_dir)


def cache_latents(autoencoder: str | Path | LatentCodec, source: Any, out_path: str | Path, image_size: int,
                  channels: int | None = None, batch_size: int = 256) -> Path:
    """Encode every example of ``source`` (resized to ``image_size``) into scaled latents and write the cache
    ``.npz`` described in the module docstring; returns its path."""
    codec = autoencoder if isinstance(autoencoder, LatentCodec) else load_codec(autoencoder)
    if channels is None:
        channels = codec.config.in_channels
    loader = data.make_loader(source, batch_size, image_size, shuffle=False, num_epochs=1, drop_remainder=False,
                              channels=channels, shard_index=0, shard_count=1)
    latents, labels, captions = [], [], []
    for batch in loader:
        latents.append(np.asarray(codec.encode(jnp.asarray(batch["image"]))))
        labels.append(np.asarray(batch["label"]))
        if "caption" in batch:
            captions.extend(str(c) for c in np.asarray(batch["caption"]).reshape(-1))
    stacked = np.concatenate(latents).astype(np.float32)
    arrays = {"latents": stacked, "labels": np.concatenate(labels).astype(np.int32),
              "scaling_factor": np.float64(codec.config.scaling_factor),
              "latent_std": np.float32(stacked.std()), "autoencoder": np.asarray(codec.path),
              "image_size": np.int32(image_size)}
    if captions:
        arrays["captions"] = np.asarray(captions)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **arrays)
    logger.info("cached %d latents %s (std %.3f after scaling) to %s", len(stacked), stacked.shape[1:],
                float(stacked.std()), out_path)
    return out_path


def read_cache_info(path: str | Path) -> dict[str, Any]:
    """{"autoencoder", "scaling_factor", "latent_std", "image_size", "count", "shape"} of a latent cache."""
    with np.load(path, allow_pickle=False) as cache:
        if "latents" not in cache:
            raise ValueError(f"{path} is not a latent cache (no 'latents' array; it has {sorted(cache.keys())})")
        return {"autoencoder": str(cache["autoencoder"]), "scaling_factor": float(cache["scaling_factor"]),
                "latent_std": float(cache["latent_std"]), "image_size": int(cache["image_size"]),
                "count": int(cache["latents"].shape[0]), "shape": tuple(cache["latents"].shape[1:])}


def latent_source(path: str | Path) -> data.ArraySource:
    """The cache as a data source whose ``image`` entries are the scaled latents, unchanged by the loader
    (``make_loader(source, batch, image_size=None)``)."""
    read_cache_info(path)
    return data.npz_source(path, image_key="latents", value_range=(-1.0, 1.0))
