"""Run a diffusers pipeline directory (Stable Diffusion 1.x / 2.x, SDXL, DiT) in JAX with any flaxdiff sampler.

    pipe = DiffusersPipeline.from_pretrained("stable-diffusion-v1-5")       # or Pipeline.from_diffusers(...)
    images = pipe.generate(["a photo of a cat"], steps=25, guidance_scale=7.5, seed=0)   # (B, H, W, 3) in [0, 1]
    images = pipe.generate(["a cat"], sampler="dpmpp_2m", grid="karras", negative_prompts=["blurry"])
    dit = DiffusersPipeline.from_pretrained("DiT-XL-2-256"); dit.generate(labels=[207, 360], guidance_scale=4.0)

A directory is what ``huggingface_hub.snapshot_download(repo)`` writes (nothing is downloaded here):
``model_index.json``, ``unet/`` or ``transformer/``, ``vae/``, ``scheduler/``, and for text-to-image
``text_encoder/`` + ``tokenizer/`` (SDXL also ``text_encoder_2/`` + ``tokenizer_2/``). The steps:

    SD 1.x / 2.x   text = CLIP last hidden state (after the final norm) of the prompt and of the negative prompt
    SDXL           text = [CLIP-L h_{N-1}, CLIP-G h_{N-1}] (penultimate layer, concatenated on features),
                   pooled = CLIP-G projected EOS state, time_ids = (H, W, 0, 0, H, W) in pixels; an absent negative
                   prompt is all zeros when ``force_zeros_for_empty_prompt`` (SDXL base), else ""
    DiT            cond = class label, the null class = num_classes
    sampling       ``flaxdiff.interop.diffusers_scheduler.sample``: the scheduler config mapped onto a flaxdiff
                   sampler and grid (or any registered sampler / grid), classifier-free guidance
                   x0 = x0_u + w (x0_c - x0_u) in one batched forward (w > 1; optional guidance interval in s)
    decode         images = clip(VAE.decode(latents / scaling_factor + shift) / 2 + 1 / 2, 0, 1)

Randomness: row i uses only key_i = fold_in(PRNGKey(seed), i) (or PRNGKey(seeds[i])): the initial latents are
N(0, I) from fold_in(key_i, 0) and a stochastic sampler draws from fold_in(key_i, 1), so an image does not depend
on its batch. With several devices the rows are split over a ("data", "fsdp") mesh (params replicated).
``dtype="bfloat16"`` computes the U-Net / DiT, VAE and text encoders in bfloat16 (params and the
sampler state stay float32).
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.interop import diffusers_dit, diffusers_unet
from flaxdiff.interop.diffusers_scheduler import DiffusersScheduler, make_denoiser, sample
from flaxdiff.interop.diffusers_vae import load_diffusers_autoencoder
from flaxdiff.models.autoencoder import AutoencoderKL, unscale_latents

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = ["MODEL_INDEX", "DiffusersPipeline", "load_diffusers_pipeline", "sample_grid"]

MODEL_INDEX = "model_index.json"
_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "DiTPipeline": "dit"}


class DiffusersPipeline:
    """A loaded diffusers pipeline: denoiser (U-Net or DiT), VAE, scheduler mapping and text encoders.

    kind: "sd", "sdxl" or "dit"; denoiser / params / config: the Flax U-Net or DiT; vae / vae_params / vae_config:
    the autoencoder; scheduler: :class:`DiffusersScheduler`; text_encoders: ``load_text_encoder`` objects (one for
    SD, two for SDXL, none for DiT); id2label: DiT class names.
    """

    def __init__(self, kind: str, denoiser: Any, params: Any, config: Any, vae: AutoencoderKL, vae_params: Any,
                 scheduler: DiffusersScheduler, text_encoders: Sequence[Any] = (),
                 force_zeros_for_empty_prompt: bool = False, id2label: Mapping[int, str] | None = None,
                 path: str | None = None, mesh: Any = None) -> None:
        if kind not in ("sd", "sdxl", "dit"):
            raise ValueError(f"kind={kind!r}; accepted: 'sd', 'sdxl', 'dit'")
        self.kind = kind
        self.denoiser = denoiser
        self.params = params
        self.config = config
        self.vae = vae
        self.vae_params = vae_params
        self.scheduler = scheduler
        self.text_encoders = list(text_encoders)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.id2label = dict(id2label or {})
        self.path = path
        if mesh is None and jax.local_device_count() > 1:
            from flaxdiff.training.parallel import make_mesh

            mesh = make_mesh(devices=jax.local_devices())
        self.mesh = mesh
        if mesh is not None:
            from flaxdiff.training.parallel import replicated

            self.params = jax.device_put(params, replicated(mesh))
        self._denoisers: dict[tuple, Any] = {}
        self._decode = jax.jit(functools.partial(vae.apply, method=AutoencoderKL.decode))
        # set by flaxdiff.interop.diffusers_finetune.load_finetuned: the fine-tuning run's config and step
        self.run: Any = None
        self.step: int | None = None

    def with_params(self, params: Any) -> DiffusersPipeline:
        """The same pipeline with other denoiser params (e.g. fine-tuned ones; same tree as ``self.params``),
        replicated over the mesh; compiled samplers are shared."""
        clone = object.__new__(DiffusersPipeline)
        clone.__dict__.update(self.__dict__)
        if self.mesh is not None:
            from flaxdiff.training.parallel import replicated

            params = jax.device_put(params, replicated(self.mesh))
        clone.params = params
        return clone

    # -- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", mesh: Any = None) -> DiffusersPipeline:
        """Load a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``DiTPipeline`` dir.

        mesh: a ("data", "fsdp") mesh over which image rows are split (default: all local devices when there are
        several; params replicated)."""
        from flaxdiff.interop.text_encoders import load_text_encoder

        root = Path(path)
        index_file = root / MODEL_INDEX
        if not index_file.is_file():
            raise ValueError(f"no {MODEL_INDEX} in {root}; expected a diffusers pipeline directory")
        index = json.loads(index_file.read_text())
        class_name = index.get("_class_name")
        if class_name not in _KINDS:
            raise ValueError(f"{index_file} has _class_name={class_name!r}; supported: {', '.join(_KINDS)}")
        kind = _KINDS[class_name]
        if kind == "dit":
            denoiser, params, config = diffusers_dit.load_diffusers_dit(root / "transformer", dtype=dtype)
            encoders = []
        else:
            denoiser, params, config = diffusers_unet.load_diffusers_unet(root / "unet", dtype=dtype)
            if kind == "sd":
                encoders = [load_text_encoder(root, dtype, subfolder="text_encoder")]
            else:
                encoders = [load_text_encoder(root, dtype, subfolder=name, layer="penultimate")
                            for name in ("text_encoder", "text_encoder_2")]
        vae, vae_params, _ = load_diffusers_autoencoder(root / "vae", dtype=dtype)
        scheduler = DiffusersScheduler.from_pretrained(root / "scheduler")
        id2label = {int(k): v for k, v in (index.get("id2label") or {}).items()}
        logger.info("loaded diffusers %s from %s (scheduler %s -> sampler %s)", class_name, root,
                    scheduler.class_name, scheduler.sampler)
        return cls(kind, denoiser, params, config, vae, vae_params, scheduler, encoders,
                   bool(index.get("force_zeros_for_empty_prompt", False)), id2label, str(root), mesh)

    # -- conditioning ----------------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(h, w, C) of the latents for an image of height x width pixels (default: the model's sample size)."""
        if self.kind == "dit":
            size = self.config.sample_size
            if height is not None or width is not None:
                raise ValueError("a DiT samples at its trained size; leave height and width unset")
            return size, size, self.config.in_channels
        factor = self.vae_scale_factor
        default = (self.config.sample_size or 64) * factor
        height, width = height or default, width or default
        if height % (factor * self.config.downsample_factor) or width % (factor * self.config.downsample_factor):
            raise ValueError(f"height={height}, width={width} must be multiples of "
                             f"{factor * self.config.downsample_factor}")
        return height // factor, width // factor, self.config.in_channels

    def encode_prompts(self, prompts: Sequence[str], height: int, width: int) -> dict[str, Array]:
        """The U-Net's cond for a list of prompts: {"text"} (SD) or {"text", "pooled", "time_ids"} (SDXL)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single str; wrap it in a list")
        outputs = [encoder.encode(list(prompts)) for encoder in self.text_encoders]
        if self.kind == "sd":
            return {"text": outputs[0]["text"]}
        text = jnp.concatenate([out["text"] for out in outputs], axis=-1)
        time_ids = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (len(prompts), 1))
        return {"text": text, "pooled": outputs[-1]["pooled"], "time_ids": time_ids}

    def _negative(self, negative_prompts: Sequence[str] | None, count: int, height: int, width: int
                  ) -> dict[str, Array]:
        if negative_prompts is None:
            if self.kind == "sdxl" and self.force_zeros_for_empty_prompt:
                positive = self.encode_prompts([""], height, width)
                return {"text": jnp.zeros_like(positive["text"]), "pooled": jnp.zeros_like(positive["pooled"]),
                        "time_ids": positive["time_ids"]}
            negative_prompts = [""] * count
        if isinstance(negative_prompts, str) or len(negative_prompts) not in (1, count):
            raise ValueError(f"negative_prompts must be a list of 1 or {count} strings, got {negative_prompts!r}")
        return self.encode_prompts(list(negative_prompts), height, width)

    def _labels(self, labels: Sequence[int | str]) -> np.ndarray:
        by_name = {name.strip(): index for index, names in self.id2label.items() for name in names.split(",")}
        ids = []
        for label in labels:
            if isinstance(label, str):
                if label not in by_name:
                    raise ValueError(f"unknown label {label!r}; give a class index or one of the id2label names")
                ids.append(by_name[label])
            elif not 0 <= int(label) < self.config.num_classes:
                raise ValueError(f"label {label!r} outside [0, {self.config.num_classes})")
            else:
                ids.append(int(label))
        return np.asarray(ids, np.int32)

    # -- sampling --------------------------------------------------------------------------------------------------

    def _model_fn(self) -> Any:
        module = self.denoiser
        if self.kind == "dit":
            channels = self.config.in_channels

            def dit_fn(params: Any, x: Array, timesteps: Array, cond: Any) -> Array:
                return module.apply({"params": params}, x, timesteps, cond)[..., :channels]

            return dit_fn

        def unet_fn(params: Any, x: Array, timesteps: Array, cond: Any) -> Array:
            return module.apply({"params": params}, x, timesteps, cond)

        return unet_fn

    def keys(self, count: int, seed: int = 0, seeds: Sequence[int] | None = None) -> Array:
        """Per-image keys: PRNGKey(seeds[i]) or fold_in(PRNGKey(seed), i)."""
        if seeds is not None:
            if len(seeds) != count:
                raise ValueError(f"got {len(seeds)} seeds for {count} images")
            return jnp.stack([jax.random.key(int(s)) for s in seeds])
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(count))

    def generate(self, prompts: Sequence[str] | None = None, negative_prompts: Sequence[str] | None = None,
                 labels: Sequence[int | str] | None = None, steps: int = 50, guidance_scale: float = 7.5,
                 sampler: str | None = None, grid: str | None = None, seed: int = 0,
                 seeds: Sequence[int] | None = None, latents: Any = None, height: int | None = None,
                 width: int | None = None, guidance_interval: tuple[float, float] | None = None,
                 output: str = "images", grid_options: Mapping[str, Any] | None = None,
                 **sampler_options: Any) -> np.ndarray:
        """Images (B, H, W, 3) float32 in [0, 1] (``output="latents"``: the final latents, NHWC).

        prompts (SD / SDXL) or labels (DiT, indices or id2label names); guidance_scale w (<= 1: no guidance, as
        diffusers); sampler / grid: any registered flaxdiff sampler / grid name (default: the scheduler's own);
        latents: initial N(0, I) latents (B, h, w, C) instead of the seeded draw.
        """
        if output not in ("images", "latents"):
            raise ValueError(f"output={output!r}; accepted: 'images', 'latents'")
        if self.kind == "dit":
            if labels is None or prompts is not None:
                raise ValueError("a DiT pipeline takes labels=[...] (class indices or names), not prompts")
            ids = self._labels(labels)
            count = len(ids)
            cond, null_cond = {"label": jnp.asarray(ids)}, {"label": jnp.full((1,), self.config.num_classes,
                                                                               jnp.int32)}
            shape = self.latent_shape()
        else:
            if prompts is None or labels is not None:
                raise ValueError("a text-to-image pipeline takes prompts=[...], not labels")
            shape = self.latent_shape(height, width)
            pixels_h, pixels_w = shape[0] * self.vae_scale_factor, shape[1] * self.vae_scale_factor
            count = len(prompts)
            cond = self.encode_prompts(list(prompts), pixels_h, pixels_w)
            null_cond = self._negative(negative_prompts, count, pixels_h, pixels_w) if guidance_scale > 1 else None
        keys = self.keys(count, seed, seeds)
        if latents is None:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, jnp.float32))(keys)
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != (count,) + shape:
                raise ValueError(f"latents have shape {tuple(noise.shape)}; expected {(count,) + shape}")
        guided = guidance_scale > 1
        if isinstance(grid, str) or grid is None:
            grid_obj = (self.scheduler.grid(steps) if grid is None else
                        self.scheduler.named_grid(grid, steps, **dict(grid_options or {})))
        else:
            raise ValueError(f"grid={grid!r} must be a flaxdiff grid name or None (the scheduler's own)")
        cache_key = (steps, grid, tuple(sorted((grid_options or {}).items())), guided,
                     None if guidance_interval is None else tuple(guidance_interval))
        if cache_key not in self._denoisers:
            self._denoisers[cache_key] = make_denoiser(self._model_fn(), self.scheduler, grid_obj, guided,
                                                       guidance_interval)
        sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        chosen = sampler or self.scheduler.sampler
        if sampler is None:
            sampler_options = {**self.scheduler.sampler_options(steps), **sampler_options}
        from flaxdiff import samplers as samplers_lib
        from flaxdiff.training.parallel import shard_rows

        stochastic = samplers_lib.get(chosen, **sampler_options).stochastic
        (noise, cond, sampler_keys), _ = shard_rows((noise, cond, sampler_keys), self.mesh)
        if null_cond is not None and jax.tree_util.tree_leaves(null_cond)[0].shape[0] == count:
            null_cond, _ = shard_rows(null_cond, self.mesh)
        out = sample(self._model_fn(), self.scheduler, noise, steps, cond, params=self.params, sampler=chosen,
                     grid=grid_obj, sample_keys=sampler_keys if stochastic else None,
                     guidance_scale=guidance_scale if guided else None, null_cond=null_cond,
                     guidance_interval=guidance_interval, denoiser=self._denoisers[cache_key], **sampler_options)
        out = out[:count]
        if output == "latents":
            return np.asarray(out)
        return self.decode(out)

    def training_parts(self, height: int | None = None, width: int | None = None) -> dict[str, Any]:
        """What ``flaxdiff.losses.diffusion_loss`` (and the trainer's loss object) needs to fine-tune the denoiser:

            apply_fn      (params, x, c_noise, cond) -> F in the toolkit's convention (timestep
                          k = c_noise T / 1000 - 1; a DiT returns its eps channels, the learned variance is not
                          trained)
            params        the denoiser's float32 params
            schedule      the scheduler's DiscreteVPSchedule; predictor: its epsilon / v / x0 predictor
            time_sampler  losses.DiscreteTime(): t = i / T, i ~ U{1..T}, i.e. diffusers' k = i - 1 ~ U{0..T-1}
            null_cond     the unconditional condition for condition dropout (the "" prompt, SDXL's zeros, the null
                          class), shaped for one row

        With these the loss is diffusers' training loss: || F(alpha_k x0 + sigma_k eps, k, cond) - target ||^2.
        Text embeddings can be precomputed with :meth:`encode_prompts` (the text encoders stay frozen).
        """
        from flaxdiff.losses import DiscreteTime

        module = diffusers_dit if self.kind == "dit" else diffusers_unet
        if self.kind == "dit":
            null_cond = {"label": jnp.full((1,), self.config.num_classes, jnp.int32)}
        else:
            h, w, _ = self.latent_shape(height, width)
            pixels_h, pixels_w = h * self.vae_scale_factor, w * self.vae_scale_factor
            null_cond = self._negative(None, 1, pixels_h, pixels_w)
        return {"apply_fn": module.c_noise_apply_fn(self.denoiser, self.scheduler.num_train_timesteps),
                "params": self.params, "schedule": self.scheduler.schedule, "predictor": self.scheduler.predictor,
                "time_sampler": DiscreteTime(), "null_cond": null_cond}

    def decode(self, latents: Array) -> np.ndarray:
        """Images in [0, 1]: clip(VAE.decode(latents / scaling_factor + shift_factor) / 2 + 1 / 2, 0, 1)."""
        images = self._decode({"params": self.vae_params}, unscale_latents(self.vae.config, jnp.asarray(latents)))
        return np.asarray(jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0))


def sample_grid(pipeline: DiffusersPipeline | str | Path, out: str | Path, prompts: Sequence[str] | None = None,
                labels: Sequence[int | str] | None = None, per_prompt: int = 1, steps: int | None = None,
                guidance_scale: float | None = None, sampler: str | None = None, grid: str | None = None,
                seed: int = 0, guidance_interval: tuple[float, float] | None = None, dtype: str = "float32",
                negative_prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """``flaxdiff sample --diffusers PATH --prompts ...``: a PNG grid with one row per prompt (or DiT label) and
    ``per_prompt`` images in it; defaults 25 steps, guidance 7.5 (text) / 4.0 (DiT), the scheduler's sampler and
    grid. Returns what the CLI prints (output path, grid size and the settings used)."""
    from flaxdiff.training import save_image_grid

    pipe = pipeline if isinstance(pipeline, DiffusersPipeline) else DiffusersPipeline.from_pretrained(pipeline, dtype)
    if per_prompt < 1:
        raise ValueError(f"per_prompt={per_prompt!r} must be >= 1")
    rows = list(labels) if pipe.kind == "dit" and labels is not None else list(prompts or [])
    if not rows:
        raise ValueError("give prompts=[...] for a text-to-image pipeline or labels=[...] for a DiT")
    repeated = [row for row in rows for _ in range(per_prompt)]
    settings = {"steps": steps or 25, "guidance_scale": guidance_scale if guidance_scale is not None else (
        4.0 if pipe.kind == "dit" else 7.5), "sampler": sampler or pipe.scheduler.sampler, "grid": grid,
        "guidance_interval": guidance_interval}
    if pipe.kind == "dit":
        images = pipe.generate(labels=repeated, seed=seed, **settings)
    else:
        negative = None if negative_prompts is None else [n for n in negative_prompts for _ in range(per_prompt)]
        images = pipe.generate(repeated, negative_prompts=negative, seed=seed, **settings)
    path = save_image_grid(images * 2.0 - 1.0, out, columns=per_prompt)
    logger.info("wrote %s: %d images, %d x %d grid", path, len(repeated), len(rows), per_prompt)
    return {"out": str(path), "images": len(repeated), "rows": len(rows), "columns": per_prompt,
            "pixels": [len(rows) * images.shape[1], per_prompt * images.shape[2]], "seed": seed, **settings}


def load_diffusers_pipeline(path: str | Path, dtype: str = "float32") -> DiffusersPipeline:
    """:meth:`DiffusersPipeline.from_pretrained`."""
    return DiffusersPipeline.from_pretrained(path, dtype=dtype)
