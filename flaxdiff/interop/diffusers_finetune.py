"""Fine-tune a pretrained diffusers denoiser (Stable Diffusion 1.x / 2.x U-Net, class-conditional DiT) with
``training.py``, then sample or export the result back to a diffusers directory.

    flaxdiff data encode captions/ enc/ --autoencoder sd15/vae --text-encoder sd15/text_encoder --image-size 512
    python training.py --pretrained sd15 --dataset enc --image-size 512 --steps 1000 --lr 1e-5 --workdir runs/ft
    flaxdiff sample runs/ft --out grid.png --prompts "a photo of a cat"       # the fine-tuned pipeline
    flaxdiff export runs/ft sd15-ft/                                          # a diffusers directory

The run config's ``model.pretrained`` names the diffusers pipeline directory; the pipeline decides the rest:

    architecture   the U-Net / DiT of ``unet/`` or ``transformer/`` (model.name / model.options stay unset; the
                   saved config holds name "diffusers" and no options)
    start          its params (step 0 = the pretrained weights, the EMA starts from them too)
    loss           diffusers' training loss: x_t = sqrt(alpha_bar_k) x0 + sqrt(1 - alpha_bar_k) eps with
                   k ~ U{0..T-1} (``DiscreteTime``: t = (k + 1) / T), || F(x_t, k, c) - target ||^2 averaged, the
                   target eps / v / x0 of the scheduler's ``prediction_type``, uniform weighting; the diffusion
                   section is filled in from ``scheduler/scheduler_config.json``
    dropout        with probability diffusion.cond_drop_prob the condition becomes the "" prompt's embedding
                   (SD) or the null class ``num_classes`` (DiT)
    data           a dataset encoded by ``flaxdiff data encode`` with the pipeline's own VAE (latents scaled by
                   its scaling_factor) and, for SD, its own text encoder (embeddings precomputed; the encoder is
                   never trained)

Model call in the toolkit's convention (:class:`FineTuneDenoiser`): ``F = net(x_t, k, cond)`` with
k = c_noise T / 1000 - 1; a learned-sigma DiT gives its eps channels only (the variance head is not trained).
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.config import ConfigError, DiffusionConfig, RunConfig

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = ["FINETUNE_KINDS", "FineTuneDenoiser", "PretrainedInfo", "check_data", "diffusion_settings",
           "export_diffusers", "finetune_parts", "initial_state", "is_finetune_run", "load_finetuned",
           "read_pretrained", "resolve_config"]

# pipeline classes training.py can fine-tune -> DiffusersPipeline kind
FINETUNE_KINDS = {"StableDiffusionPipeline": "sd", "DiTPipeline": "dit"}
_DENOISER_DIR = {"sd": "unet", "dit": "transformer"}


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
    """What a pipeline directory's JSON files say (no weights read): kind, denoiser and VAE configs, scheduler."""

    root: Path
    kind: str
    class_name: str
    denoiser_config: Any
    vae_factor: int
    scheduler: Any

    @property
    def denoiser_dir(self) -> Path:
        return self.root / _DENOISER_DIR[self.kind]

    @property
    def pixel_multiple(self) -> int:
        """Image sizes must be multiples of this: VAE factor x the U-Net's downsampling (DiT: its one size)."""
        if self.kind == "dit":
            return self.vae_factor * self.denoiser_config.patch_size
        return self.vae_factor * self.denoiser_config.downsample_factor


def _json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.pretrained: {path} ({what}) cannot be read ({type(err).__name__})") from None


def read_pretrained(path: str | Path) -> PretrainedInfo:
    """The facts of a pipeline directory from its JSON files; ConfigError (one line) when it is not a diffusers
    directory or its pipeline class cannot be fine-tuned."""
    from flaxdiff.interop import diffusers_dit, diffusers_unet
    from flaxdiff.interop.diffusers_pipeline import MODEL_INDEX
    from flaxdiff.interop.diffusers_scheduler import DiffusersScheduler

    root = Path(path).expanduser().absolute()
    if not (root / MODEL_INDEX).is_file():
        raise ConfigError(f"model.pretrained {path} is not a diffusers pipeline directory (no {MODEL_INDEX}); "
                          f"give the directory huggingface_hub.snapshot_download or save_pretrained wrote")
    class_name = _json(root / MODEL_INDEX, MODEL_INDEX).get("_class_name")
    if class_name not in FINETUNE_KINDS:
        raise ConfigError(f"model.pretrained {path} is a {class_name}; fine-tuning accepts "
                          f"{' and '.join(FINETUNE_KINDS)} (SD 1.x / 2.x U-Nets and class-conditional DiTs)")
    kind = FINETUNE_KINDS[class_name]
    denoiser_values = _json(root / _DENOISER_DIR[kind] / "config.json", f"the {_DENOISER_DIR[kind]} config")
    try:
        if kind == "dit":
            denoiser_config = diffusers_dit.dit_config_from_diffusers(denoiser_values)
        else:
            denoiser_config = diffusers_unet.unet_config_from_diffusers(denoiser_values)
            if denoiser_config.addition_embed_type is not None:
                raise ValueError(f"its U-Net has addition_embed_type={denoiser_config.addition_embed_type!r}; "
                                 f"fine-tuning takes SD 1.x / 2.x U-Nets")
        scheduler = DiffusersScheduler.from_pretrained(root / "scheduler")
    except ValueError as err:
        raise ConfigError(f"model.pretrained {path}: {' '.join(str(err).split())}") from None
    vae_values = _json(root / "vae" / "config.json", "the VAE config")
    vae_factor = 2 ** max(len(vae_values.get("block_out_channels", [0])) - 1, 0)
    return PretrainedInfo(root, kind, class_name, denoiser_config, vae_factor, scheduler)


def diffusion_settings(scheduler: Any) -> dict[str, Any]:
    """The run config's diffusion section (minus cond_drop_prob) that is diffusers' training loss for a scheduler:
    its DiscreteVPSchedule, its predictor, uniform weighting and the discrete time sampler."""
    schedule = scheduler.schedule
    options: dict[str, Any] = {"num_timesteps": schedule.num_timesteps}
    if schedule.kind != "cosine":
        options.update(beta_start=schedule.beta_start, beta_end=schedule.beta_end)
    if schedule.zero_terminal_snr:
        options["zero_terminal_snr"] = True
    return {"schedule": schedule.kind, "schedule_options": options, "shift": None,
            "predictor": scheduler.predictor.name, "predictor_options": {}, "weighting": "uniform",
            "weighting_options": {}, "time_sampler": "discrete", "time_sampler_options": {}}


def resolve_config(config: RunConfig) -> RunConfig:
    """For a run with ``model.pretrained``: the diffusion section filled in from the pipeline's scheduler, after
    checking (from JSON files only, before anything expensive) the directory, the pipeline class, the image size
    and that no diffusion setting was given that contradicts the pipeline. A fine-tuning run guides at every noise
    level (sample.guidance_interval null) unless the user gave sample.guidance_interval (``config.given``, recorded
    by :meth:`RunConfig.merge`): the default interval was measured on the MNIST main job. Other runs are returned
    unchanged."""
    if config.model.pretrained is None:
        return config
    if config.task.name != "diffusion":
        raise ConfigError(f"model.pretrained fine-tunes a diffusion denoiser; task.name {config.task.name!r} does not "
                          f"take it (accepted: diffusion)")
    info = read_pretrained(config.model.pretrained)
    wanted = diffusion_settings(info.scheduler)
    defaults = DiffusionConfig().to_dict()
    current = config.diffusion.to_dict()
    for name, value in wanted.items():
        if current[name] != value and current[name] != defaults[name]:
            raise ConfigError(f"diffusion.{name} {current[name]!r} conflicts with model.pretrained "
                              f"{config.model.pretrained}, whose scheduler gives {value!r}; leave diffusion settings "
                              f"other than cond_drop_prob unset")
    size = config.data.image_size
    if info.kind == "dit":
        native = info.denoiser_config.sample_size * info.vae_factor
        if size != native:
            raise ConfigError(f"data.image_size {size} does not fit model.pretrained {config.model.pretrained}: its "
                              f"DiT takes {info.denoiser_config.sample_size}x{info.denoiser_config.sample_size} "
                              f"latents, i.e. data.image_size {native}")
    elif size % info.pixel_multiple:
        raise ConfigError(f"data.image_size {size} is not divisible by {info.pixel_multiple} (VAE factor "
                          f"{info.vae_factor} x U-Net downsampling {info.denoiser_config.downsample_factor}) of "
                          f"model.pretrained {config.model.pretrained}")
    sample = {} if "sample.guidance_interval" in config.given else {"guidance_interval": None}
    return config.replace(diffusion=wanted, sample=sample)


# ---------------------------------------------------------------------------------------------------------------------
# Training


class FineTuneDenoiser(nn.Module):
    """A diffusers U-Net / DiT in the toolkit's model convention ``(x, c_noise, cond, train) -> F``.

    timestep k = c_noise T / 1000 - 1 (c_noise = 1000 t of a DiscreteVPSchedule, t = (k + 1) / T); with
    ``eps_channels`` only the first channels of the output (a learned-sigma DiT's eps half). The wrapped module
    shares this module's scope, so the params are exactly the diffusers module's tree (export needs no renaming).
    """

    inner: nn.Module
    num_train_timesteps: int = 1000
    eps_channels: int | None = None

    def setup(self) -> None:
        nn.share_scope(self, self.inner)

    def __call__(self, x: Array, c_noise: Array, cond: Mapping[str, Array], train: bool = False) -> Array:
        timesteps = jnp.asarray(c_noise, jnp.float32) * (self.num_train_timesteps / 1000.0) - 1.0
        out = self.inner(x, timesteps, cond, train)
        if self.eps_channels is not None:
            out = out[..., :self.eps_channels]
        return out.astype(x.dtype)


def finetune_parts(pipe: Any) -> dict[str, Any]:
    """``{"model": FineTuneDenoiser, "params": float32 pretrained params, "null_cond": one row}`` of a loaded
    :class:`~flaxdiff.interop.diffusers_pipeline.DiffusersPipeline` (kind "sd" or "dit")."""
    if pipe.kind not in ("sd", "dit"):
        raise ValueError(f"a {pipe.kind!r} pipeline cannot be fine-tuned; accepted kinds: sd, dit")
    eps_channels = pipe.config.in_channels if pipe.kind == "dit" else None
    model = FineTuneDenoiser(pipe.denoiser, pipe.scheduler.num_train_timesteps, eps_channels)
    if pipe.kind == "dit":
        null_cond: dict[str, Any] = {"label": int(pipe.config.num_classes)}
    else:
        empty = pipe.text_encoders[0].encode([""])
        null_cond = {"text": np.asarray(empty["text"][0], np.float32),
                     "pooled": np.asarray(empty["pooled"][0], np.float32)}
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), jax.device_get(pipe.params))
    return {"model": model, "params": params, "null_cond": null_cond}


def _same_dir(a: Path, b: Path) -> bool:
    """The same directory, or byte-identical config.json and weights (a copy of it)."""
    if a.resolve() == b.resolve():
        return True
    names = ("config.json", "diffusion_pytorch_model.safetensors")
    return all((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _same_encoder(ours: Any, theirs: Any) -> bool:
    """The same text encoder: kind, encode options (layer, length, mask) and every parameter equal."""
    if getattr(theirs, "kind", None) != ours.kind or getattr(theirs, "options", None) != ours.options:
        return False
    a, b = jax.tree.leaves(jax.device_get(ours.params)), jax.tree.leaves(jax.device_get(theirs.params))
    return (jax.tree.structure(ours.params) == jax.tree.structure(theirs.params)
            and all(np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)) for x, y in zip(a, b)))


def check_data(pipe: Any, encoded: Mapping[str, str], example: Mapping[str, Any], num_classes: int,
               text: Any) -> None:
    """ConfigError unless the training data was encoded for this pipeline: latents of its own VAE (the
    ``flaxdiff data encode --autoencoder PIPE/vae`` manifest), of its latent size, and for SD caption embeddings
    of its own text encoder (same kind, options and weights), for DiT class labels within its classes."""
    root = Path(pipe.path)
    command = (f"flaxdiff data encode SRC OUT --autoencoder {root / 'vae'}"
               + (f" --text-encoder {root / 'text_encoder'}" if pipe.kind == "sd" else ""))
    if not encoded.get("autoencoder"):
        raise ConfigError(f"model.pretrained needs a dataset of latents encoded with the pipeline's VAE; data.dataset "
                          f"holds pixels: run `{command}` and train on OUT")
    if not _same_dir(Path(encoded["autoencoder"]), root / "vae"):
        raise ConfigError(f"the dataset's latents come from the autoencoder {encoded['autoencoder']}, not from "
                          f"model.pretrained's {root / 'vae'}; re-encode with `{command}`")
    shape = tuple(int(s) for s in np.shape(example["image"])[1:])
    if pipe.kind == "dit":
        expected = pipe.latent_shape()
    else:
        expected = (shape[0], shape[1], pipe.config.in_channels)
        if shape[0] % pipe.config.downsample_factor or shape[1] % pipe.config.downsample_factor:
            raise ConfigError(f"the dataset's latents are {shape[0]}x{shape[1]}, not divisible by the U-Net's "
                              f"downsampling {pipe.config.downsample_factor}")
    if shape != tuple(expected):
        raise ConfigError(f"the dataset's latents have shape {shape}; model.pretrained takes {tuple(expected)}")
    if pipe.kind == "dit":
        if text is not None or num_classes < 1:
            raise ConfigError("a DiT fine-tunes on class labels; the dataset has "
                              f"{'captions' if text is not None else 'no classes'}")
        if num_classes > pipe.config.num_classes:
            raise ConfigError(f"the dataset has {num_classes} classes; the DiT has {pipe.config.num_classes}")
        return
    if text is None:
        raise ConfigError(f"Stable Diffusion fine-tunes on captions encoded with its text encoder; the dataset has "
                          f"none: run `{command}`")
    if not _same_encoder(pipe.text_encoders[0], text):
        raise ConfigError(f"the dataset's text embeddings were not made by model.pretrained's text encoder "
                          f"{root / 'text_encoder'}; re-encode with `{command}`")


def initial_state(trainer: Any, params: Any) -> Any:
    """The trainer's step-0 state with the pretrained params (and EMA) in place of a random init, on its mesh
    with its shardings: optimiser state ``tx.init(params)``, rng and counters as ``Trainer.init`` makes them."""
    from flaxdiff.training.state import TrainState

    def build(p: Any) -> Any:
        _, rng = jax.random.split(jax.random.PRNGKey(trainer.config.seed))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=p, opt_state=trainer.tx.init(p), ema_params=jax.tree.map(jnp.copy, p),
                          rng=rng, bad_steps=zero, consecutive_bad=zero)

    return jax.jit(build, out_shardings=trainer.state_shardings)(params)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a fine-tuning run


def is_finetune_run(path: str | Path) -> bool:
    """Whether ``path`` (a run directory or its checkpoints/) holds a run that fine-tuned a diffusers pipeline."""
    from flaxdiff import checkpoints

    try:
        _, ckpt_dir = checkpoints.find_checkpoints(path)
        raw = checkpoints.read_config(ckpt_dir)
    except ConfigError:
        return False
    return checkpoints.is_run_config(raw) and bool(raw.get("model", {}).get("pretrained"))


def _finetuned_params(path: str | Path, step: int | None, ema: bool | None) -> tuple[RunConfig, Any, int, bool]:
    from flaxdiff import checkpoints

    run_dir, ckpt_dir = checkpoints.find_checkpoints(path)
    steps = checkpoints.list_steps(ckpt_dir)
    step = steps[-1] if step is None else step
    config = checkpoints.read_run_config(ckpt_dir, step, run_dir)
    use_ema = config.sample.ema if ema is None else ema
    return config, checkpoints.load_params(ckpt_dir, step, ema=use_ema), step, use_ema


def load_finetuned(path: str | Path, step: int | None = None, ema: bool | None = None,
                   dtype: str = "float32") -> Any:
    """The run's pretrained :class:`~flaxdiff.interop.diffusers_pipeline.DiffusersPipeline` with the fine-tuned
    params of ``step`` (default the latest; EMA unless ``ema=False``, default the run's sample.ema). Its ``run``
    attribute holds the run config (its ``sample`` section gives the sampling defaults)."""
    from flaxdiff.interop.diffusers_pipeline import DiffusersPipeline

    config, params, step, use_ema = _finetuned_params(path, step, ema)
    pipe = DiffusersPipeline.from_pretrained(config.model.pretrained, dtype=dtype).with_params(params)
    pipe.run = config
    pipe.step = step
    logger.info("fine-tuned %s: step %d of %s (%s params)", config.model.pretrained, step, path,
                "EMA" if use_ema else "raw")
    return pipe


def export_diffusers(path: str | Path, out_dir: str | Path, step: int | None = None,
                     ema: bool | None = None) -> Path:
    """Write a diffusers pipeline directory: the pretrained directory's files (VAE, text encoder, tokenizer,
    scheduler, model_index.json) with the fine-tuned U-Net / DiT (safetensors through the explicit key map), so
    ``flaxdiff sample --diffusers OUT`` and diffusers' ``from_pretrained(OUT)`` load it. Returns ``out_dir``."""
    from flaxdiff.interop import diffusers_dit, diffusers_unet

    config, params, _, _ = _finetuned_params(path, step, ema)
    info = read_pretrained(config.model.pretrained)
    out = Path(out_dir)
    denoiser = _DENOISER_DIR[info.kind]
    shutil.copytree(info.root, out, dirs_exist_ok=True, ignore=lambda where, names: (
        names if Path(where).resolve() == info.denoiser_dir.resolve() else []))
    save = diffusers_dit.save_diffusers_dit if info.kind == "dit" else diffusers_unet.save_diffusers_unet
    save(out / denoiser, params, info.denoiser_config)
    logger.info("exported the fine-tuned %s of %s to %s", denoiser, path, out)
    return out
