"""Generate images from a training run with its own saved config and sampling settings.

    from flaxdiff.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("runs/mnist")               # run dir or its checkpoints/ dir
    images = pipe.generate(labels=[0, 1, 2], seed=0)            # uint8 (3, 32, 32, 1), the run's sample settings
    floats = pipe.generate(num_images=8, guidance_scale=1.0, output="float")   # override: no guidance

Sampling runs ``flaxdiff.samplers.sample_model`` on the run's schedule and predictor. Every sampling argument left
out (sampler, steps, grid, guidance scale and interval) comes from the run's ``sample`` section
(``flaxdiff.config.SampleConfig``), so a model is sampled the way it was measured. Guidance has one meaning:
``D = D_uncond + w (D_cond - D_uncond)``, ``w = 1`` is the plain conditional model (no extra forward).
Row i of a call uses only the key ``fold_in(PRNGKey(seed), i)`` (noise and any sampler randomness), so an image
does not depend on the batch it was drawn in. A run trained on autoencoder latents is decoded with that frozen
autoencoder; a caption-conditioned run takes ``prompts=[...]`` encoded by its frozen text encoder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import checkpoints
from flaxdiff.config import SampleConfig, guidance_or_none

logger = logging.getLogger(__name__)

__all__ = ["Pipeline", "resolve_checkpoint_dir", "to_uint8"]


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The orbax directory holding numbered steps: ``path`` itself or ``path/checkpoints`` (a training run dir)."""
    return checkpoints.find_checkpoints(path)[1]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels: round(127.5 (x + 1)) clipped to [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Pipeline:
    """A model, its params, schedule and predictor (and optional latent decoder) ready to sample.

    model: the Linen module; params: its parameters; schedule / predictor: the training pair.
    sample_shape: (H, W, C) of the diffusion space (latents when ``decode`` is set).
    num_classes: > 0 for class-conditional models (label ``num_classes`` is the null class).
    decode: optional ``latents -> images in [-1, 1]``; config: the run's RunConfig (or stored dict).
    sample: the default sampling settings (the run's ``sample`` section).
    """

    def __init__(self, model: Any, params: Any, schedule: Any, predictor: Any, sample_shape: Sequence[int],
                 num_classes: int = 0, null_cond: dict[str, Any] | None = None,
                 decode: Callable[[jax.Array], jax.Array] | None = None, config: Any = None,
                 step: int | None = None, text: Any = None, sample: SampleConfig | None = None) -> None:
        self.model = model
        self.params = params
        self.schedule = schedule
        self.predictor = predictor
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.num_classes = int(num_classes)
        self.null_cond = null_cond if null_cond is not None else (
            {"label": self.num_classes} if self.num_classes > 0 else None)
        self.decode = decode
        self.config = config if config is not None else {}
        self.step = step
        self.text = text
        if sample is None:
            sample = getattr(config, "sample", None) or SampleConfig()
        self.sample = sample
        self._apply = _make_apply(model)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, step: int | None = None,
                        ema: bool | None = None) -> "Pipeline":
        """Load a training run directory (or its ``checkpoints/``): latest step unless ``step``; EMA params unless
        ``ema=False`` (default: the run's ``sample.ema``)."""
        run = checkpoints.load_run(checkpoint_dir, step, ema)
        return cls(run.model, run.params, run.schedule, run.predictor, run.sample_shape, run.num_classes,
                   run.null_cond, run.decode, run.config if run.config is not None else run.raw_config, run.step,
                   run.text, run.sample)

    @classmethod
    def from_diffusers(cls, path: str | Path, dtype: str = "float32") -> Any:
        """A diffusers StableDiffusion / SDXL / DiT pipeline directory ready to sample with any flaxdiff sampler:
        a :class:`flaxdiff.interop.diffusers_pipeline.DiffusersPipeline` (``generate(prompts=...)`` /
        ``generate(labels=...)``; see docs/diffusers.md)."""
        from flaxdiff.interop.diffusers_pipeline import DiffusersPipeline

        return DiffusersPipeline.from_pretrained(path, dtype=dtype)

    def with_params(self, params: Any) -> "Pipeline":
        """The same pipeline with other params (e.g. the trainer's EMA params during training)."""
        clone = object.__new__(Pipeline)
        clone.__dict__.update(self.__dict__)
        clone.params = params
        return clone

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of generated images (decoded when the model works on latents)."""
        if self.decode is None:
            return self.sample_shape
        latent = jnp.zeros((1,) + self.sample_shape)
        return tuple(jax.eval_shape(self.decode, latent).shape[1:])

    def generate(self, num_images: int | None = None, labels: Sequence[int] | np.ndarray | None = None,
                 prompts: Sequence[str] | None = None, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, output: str = "uint8", batch_size: int = 256,
                 grid: str | None = None, guidance_interval: Sequence[float] | None = None,
                 **sampler_options: Any) -> np.ndarray:
        """Images (N, H, W, C): uint8 pixels (``output="uint8"``) or float32 in [-1, 1] (``output="float"``).

        labels: class of every image (class-conditional models); num_images alone draws labels i mod num_classes
        (unconditional models take only num_images); prompts: the text of every image (text-conditioned models; one
        prompt with num_images repeats it). sampler, steps, grid, guidance_scale (w; 1 = no guidance),
        guidance_interval: None takes the run's ``sample`` setting. batch_size bounds one forward batch.
        """
        settings = self.sample
        sampler = settings.sampler if sampler is None else sampler
        steps = settings.steps if steps is None else steps
        grid = settings.grid if grid is None else grid
        scale = settings.guidance if guidance_scale is None else guidance_scale
        interval = settings.guidance_interval if guidance_interval is None else guidance_interval
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance_scale={scale!r} is invalid; accepted: a finite number >= 0 (1: no guidance)")
        if self.null_cond is None:
            if guidance_scale is not None and float(guidance_scale) != 1.0:
                raise ValueError(f"guidance_scale={guidance_scale} needs a conditional model; this one is "
                                 f"unconditional")
            scale = 1.0
        guidance_scale = guidance_or_none(scale)
        if guidance_scale is not None and interval is not None:
            sampler_options["guidance_interval"] = tuple(float(v) for v in interval)
        sampler_options["grid"] = grid
        if output not in ("uint8", "float"):
            raise ValueError(f"output={output!r}; accepted: uint8, float")
        prompt_list = self._prompts(num_images, labels, prompts)
        labels_array = self._labels(num_images, labels) if prompt_list is None else None
        count = len(prompt_list) if prompt_list is not None else (
            len(labels_array) if labels_array is not None else int(num_images))
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps={steps!r} is invalid; accepted: an integer >= 1")
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


def _make_apply(model: Any) -> Callable[..., jax.Array]:
    """One apply function per pipeline (shared by ``with_params`` clones, so sampling compiles once)."""

    def apply(params: Any, x: jax.Array, c_noise: jax.Array, cond: Any) -> jax.Array:
        return model.apply({"params": params}, x, c_noise, cond, train=False)

    return apply
