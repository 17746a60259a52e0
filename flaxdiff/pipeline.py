"""Generate images from a training checkpoint directory with its own saved config.

    from flaxdiff.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("runs/mnist")               # run dir or its checkpoints/ dir; EMA params
    images = pipe.generate(labels=[0, 1, 2], guidance_scale=2.0, seed=0)   # uint8 (3, 32, 32, 1)
    floats = pipe.generate(num_images=8, output="float")                    # float32 in [-1, 1]

Sampling runs ``flaxdiff.samplers.sample_model`` on the checkpoint's schedule and predictor. Row i of a call
uses only the key ``fold_in(PRNGKey(seed), i)`` (noise and any sampler randomness), so an image does not depend on
the batch it was drawn in. A checkpoint trained on autoencoder latents (``config["data"]["latent_autoencoder"]``)
is decoded with that frozen autoencoder: ``x = decode(latents / scaling_factor + shift_factor)``. A checkpoint
trained on captions (``config["data"]["text_encoder"]``) takes ``prompts=[...]``, encoded by that frozen text
encoder; its guidance null is ``flaxdiff.data.captions.NULL_TEXT_COND`` (zeros, all-False mask).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.training import checkpoint as checkpoint_lib

logger = logging.getLogger(__name__)

__all__ = ["Pipeline", "resolve_checkpoint_dir", "to_uint8"]


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The orbax directory holding numbered steps: ``path`` itself or ``path/checkpoints`` (a training run dir)."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {path} does not exist")
    for candidate in (path, path / "checkpoints"):
        if candidate.is_dir() and any(child.is_dir() and child.name.isdigit() for child in candidate.iterdir()):
            return candidate
    raise ValueError(f"{path} holds no checkpoint steps (expected numbered step directories in it or in "
                     f"{path / 'checkpoints'})")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels: round(127.5 (x + 1)) clipped to [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Pipeline:
    """A model, its params, schedule and predictor (and optional latent decoder) ready to sample.

    model: the Linen module; params: its parameters; schedule / predictor: the training pair.
    sample_shape: (H, W, C) of the diffusion space (latents when ``decode`` is set).
    num_classes: > 0 for class-conditional models (label ``num_classes`` is the null class).
    decode: optional ``latents -> images in [-1, 1]``; config: the checkpoint's full JSON config.
    """

    def __init__(self, model: Any, params: Any, schedule: Any, predictor: Any, sample_shape: Sequence[int],
                 num_classes: int = 0, null_cond: dict[str, Any] | None = None,
                 decode: Callable[[jax.Array], jax.Array] | None = None, config: dict[str, Any] | None = None,
                 step: int | None = None, text: Any = None) -> None:
        self.model = model
        self.params = params
        self.schedule = schedule
        self.predictor = predictor
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.num_classes = int(num_classes)
        self.null_cond = null_cond if null_cond is not None else (
            {"label": self.num_classes} if self.num_classes > 0 else None)
        self.decode = decode
        self.config = config or {}
        self.step = step
        self.text = text

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, step: int | None = None, ema: bool = True) -> "Pipeline":
        """Load a training run directory (or its ``checkpoints/``): latest step unless ``step``; EMA params unless
        ``ema=False``."""
        directory = resolve_checkpoint_dir(checkpoint_dir)
        components = checkpoint_lib.load_components(directory, step)
        config = components["config"]
        if components["model"] is None:
            raise ValueError(f"checkpoint {directory} has no model config; it cannot be sampled")
        if step is None:
            step = max(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
        params = jax.tree.map(jnp.asarray, checkpoint_lib.load_params(directory, step, ema=ema))
        data = config.get("data", {})
        image_key = data.get("image_key", "image")
        shapes = data.get("shapes", {})
        if image_key not in shapes:
            raise ValueError(f"checkpoint {directory} config has no shape for {image_key!r}; keys: {sorted(shapes)}")
        model_config = config["model"]
        num_classes = int(data.get("num_classes", model_config.get("num_classes", 0)) or 0)
        null_cond = components["train"].null_cond
        decode = None
        if data.get("latent_autoencoder"):
            decode = _latent_decoder(data["latent_autoencoder"])
        text = None
        if data.get("text_encoder"):
            from flaxdiff.data.captions import TextConditioner

            text = TextConditioner.create(data["text_encoder"])
        logger.info("loaded step %d of %s (%s params)", step, directory, "EMA" if ema else "raw")
        return cls(components["model"], params, components["schedule"], components["predictor"],
                   shapes[image_key]["shape"], num_classes, dict(null_cond) if null_cond else None, decode,
                   config, step, text)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of generated images (decoded when the model works on latents)."""
        if self.decode is None:
            return self.sample_shape
        latent = jnp.zeros((1,) + self.sample_shape)
        return tuple(jax.eval_shape(self.decode, latent).shape[1:])

    def _apply(self, params: Any, x: jax.Array, c_noise: jax.Array, cond: Any) -> jax.Array:
        return self.model.apply({"params": params}, x, c_noise, cond, train=False)

    def generate(self, num_images: int | None = None, labels: Sequence[int] | np.ndarray | None = None,
                 prompts: Sequence[str] | None = None, sampler: str = "unipc", steps: int = 20, guidance_scale: float | None = None, seed: int = 0,
                 output: str = "uint8", batch_size: int = 256, **sampler_options: Any) -> np.ndarray:
        """Images (N, H, W, C): uint8 pixels (``output="uint8"``) or float32 in [-1, 1] (``output="float"``).

        labels: class of every image (class-conditional models); num_images alone draws labels i mod num_classes
        (unconditional models take only num_images); prompts: the text of every image (text-conditioned models; one
        prompt with num_images repeats it). guidance_scale: classifier-free guidance weight w
        (D = D_null + w (D_cond - D_null); None or 1 -> plain conditional). batch_size bounds one forward batch.
        """
        if output not in ("uint8", "float"):
            raise ValueError(f"output={output!r}; accepted: uint8, float")
        prompt_list = self._prompts(num_images, labels, prompts)
        labels_array = self._labels(num_images, labels) if prompt_list is None else None
        count = len(prompt_list) if prompt_list is not None else (
            len(labels_array) if labels_array is not None else int(num_images))
        if guidance_scale is not None and self.null_cond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a conditional model; this one is unconditional")
        if guidance_scale is not None and float(guidance_scale) == 1.0:
            guidance_scale = None
        if not steps >= 1:
            raise ValueError(f"steps={steps!r} must be >= 1")
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(count))
        chunk = max(1, min(int(batch_size), count))
        pieces = []
        for start in range(0, count, chunk):
            rows = min(chunk, count - start)
            pad = chunk - rows
            chunk_keys = jnp.concatenate([keys[start:start + rows], keys[:pad]]) if pad else keys[start:start + rows]
            cond = None
            if labels_array is not None:
                chunk_labels = labels_array[start:start + rows]
                chunk_labels = np.concatenate([chunk_labels, np.zeros(pad, np.int32)]) if pad else chunk_labels
                cond = {"label": jnp.asarray(chunk_labels)}
            if prompt_list is not None:
                cond = self.text.encode(prompt_list[start:start + rows] + prompt_list[:pad])
            images = self._sample(chunk_keys, cond, sampler, steps, guidance_scale, sampler_options)
            pieces.append(np.asarray(images)[:rows])
        images = np.concatenate(pieces)
        return to_uint8(images) if output == "uint8" else images

    def _prompts(self, num_images: int | None, labels: Any, prompts: Sequence[str] | None) -> list[str] | None:
        if self.text is None:
            if prompts is not None:
                raise ValueError("prompts given but this model is not text-conditioned; pass labels or num_images")
            return None
        if labels is not None:
            raise ValueError("labels given but this model is text-conditioned; pass prompts=[...]")
        if prompts is None or isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"this model is text-conditioned; pass prompts as a non-empty list of strings, got "
                             f"{prompts!r}")
        prompt_list = [str(p) for p in prompts]
        if num_images is not None and int(num_images) != len(prompt_list):
            if len(prompt_list) != 1:
                raise ValueError(f"num_images={num_images} but {len(prompt_list)} prompts were given")
            prompt_list = prompt_list * int(num_images)
        return prompt_list

    def _labels(self, num_images: int | None, labels: Sequence[int] | np.ndarray | None) -> np.ndarray | None:
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("labels given but this model is unconditional (num_classes=0); pass num_images")
            if num_images is None or int(num_images) < 1:
                raise ValueError(f"num_images={num_images!r} must be a positive integer")
            return None
        if labels is None:
            if num_images is None or int(num_images) < 1:
                raise ValueError(f"give labels or a positive num_images (got num_images={num_images!r})")
            return (np.arange(int(num_images)) % self.num_classes).astype(np.int32)
        labels_array = np.asarray(labels, np.int64).reshape(-1)
        if labels_array.size == 0:
            raise ValueError("labels is empty")
        if num_images is not None and int(num_images) != labels_array.size:
            raise ValueError(f"num_images={num_images} but {labels_array.size} labels were given")
        bad = labels_array[(labels_array < 0) | (labels_array >= self.num_classes)]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} is outside 0..{self.num_classes - 1}")
        return labels_array.astype(np.int32)

    def _sample(self, keys: jax.Array, cond: Any, sampler: str, steps: int, guidance_scale: float | None,
                sampler_options: dict[str, Any]) -> jax.Array:
        from flaxdiff import samplers

        options = dict(sampler_options)
        if guidance_scale is not None:
            options.update(guidance_scale=float(guidance_scale), null_cond=self.null_cond)
        samples, _ = samplers.sample_model(self._apply, self.params, self.schedule, self.predictor, cond=cond,
                                           sampler=sampler, steps=int(steps), sample_keys=keys,
                                           shape=(keys.shape[0],) + self.sample_shape, **options)
        if self.decode is not None:
            samples = self.decode(samples)
        return jnp.clip(samples, -1.0, 1.0)


def _latent_decoder(path: str) -> Callable[[jax.Array], jax.Array]:
    """``latents -> images`` through the frozen autoencoder at ``path`` (unscaling first)."""
    from flaxdiff import interop, models

    module, params, ae_config = interop.load_autoencoder(path)

    @jax.jit
    def decode(latents: jax.Array) -> jax.Array:
        images = module.apply({"params": params}, models.unscale_latents(ae_config, latents),
                              method=models.AutoencoderKL.decode)
        return jnp.clip(images, -1.0, 1.0)

    return decode
