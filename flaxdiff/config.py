"""``RunConfig``: the one schema of a run, from command-line flag to config file to checkpoint to sampler.

A run is five typed, frozen sections plus the task::

    data       what is trained on (dataset, resolution, channels, classes, latents, captions)
    model      a model preset name and its option overrides
    diffusion  schedule, predictor, loss weighting, time sampler (each with options), condition dropout
    train      optimiser, LR schedule, batch, length, EMA, precision, mesh, checkpoint / log intervals
    sample     how the model is sampled: sampler, steps, grid, guidance scale and interval, EMA or raw params,
               preview grid size; ``flaxdiff sample`` / ``eval``, ``Pipeline.generate`` and the training preview
               all default to it, so a model is always sampled the way it was measured
    task       diffusion | autoencoder | reflow and the options of the latter two

Every setting has exactly one name, ``section.field``. ``training.py`` generates a flag per field
(``--train.learning_rate`` or ``--train.learning-rate``) plus the short aliases users type (``--lr``, ``--steps``,
``--dataset``, ...; :data:`ALIASES`). Files (JSON or YAML) hold the nested sections; ``--print-config`` prints
them and a checkpoint stores exactly them (``RunConfig.to_dict``), with paths relative to the run directory.

Guidance has one meaning everywhere: ``D = D_uncond + w (D_cond - D_uncond)``; ``w = 1`` is the plain conditional
model ("no guidance": one forward per step), ``w = 0`` the unconditional model, ``w > 1`` guided.

Layers resolve as defaults < config file < flags, each merged onto the one below by :meth:`RunConfig.merge`, which
owns the layering rules and remembers what the user gave (:attr:`RunConfig.given`). Every value is checked where it
enters: types (a string is never a number), finite numbers, ranges, registry names. Errors are :class:`ConfigError` (a ``ValueError``) with one line naming the
setting, the bad value and what is accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "DiffusionConfig",
    "TrainSection",
    "SampleConfig",
    "TaskConfig",
    "RunConfig",
    "ALIASES",
    "RUN_ONLY",
    "PATH_FIELDS",
    "read_config_file",
    "check_writable",
    "guidance_or_none",
]


class ConfigError(ValueError):
    """A bad user input: one line naming the value and what is accepted."""


DATASET_NAMES = ("mnist", "digits")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_DECAYS = ("cosine", "linear", "constant")
TASKS = ("diffusion", "autoencoder", "reflow")
CAPTIONS = ("mnist", "source")
PRETRAINED_MODEL = "diffusers"  # model.name of a run fine-tuning model.pretrained


# ---------------------------------------------------------------------------------------------------------------------
# Field checks: each returns the normalised value or raises ConfigError


def _fail(name: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{name} {value!r} is invalid; accepted: {accepted}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    accepted = "a finite number" + (" " + " and ".join(bounds) if bounds else "") + (" or null" if optional else "")
    if not _is_number(value) or not math.isfinite(value):
        raise _fail(name, value, accepted)
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise _fail(name, value, accepted)
    if high is not None and value > high:
        raise _fail(name, value, accepted)
    return value


def _check_int(name: str, value: Any, low: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    accepted = "an integer" + (f" >= {low}" if low is not None else "") + (" or null" if optional else "")
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(name, value, accepted)
    if low is not None and value < low:
        raise _fail(name, value, accepted)
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


def _check_str(name: str, value: Any, choices: typing.Sequence[str] | None = None, optional: bool = False,
               nonempty: bool = True) -> str | None:
    if value is None and optional:
        return None
    if choices is not None:
        if value not in choices:
            raise _fail(name, value, ", ".join(choices) + (" or null" if optional else ""))
        return value
    if not isinstance(value, str) or (nonempty and not value):
        raise _fail(name, value, "a non-empty string" + (" or null" if optional else ""))
    return value


def _check_options(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(name, value, 'a JSON object such as {"key": 1}')
    for key, item in value.items():
        if _is_number(item) and not math.isfinite(item):
            raise _fail(f"{name}.{key}", item, "a finite number")
    return dict(value)


def _check_model_options(name: str, options: Mapping[str, Any]) -> None:
    """Each option is a field of the preset's config with a value of that field's kind (number, flag, text, list)."""
    from flaxdiff import models

    preset = models.get_config(name)
    fields = {field.name: getattr(preset, field.name) for field in dataclasses.fields(preset)}
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(f"unknown model.options.{key} for {name!r}; accepted: {', '.join(sorted(fields))}")
        default = fields[key]
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, kind = _is_number(value) and math.isfinite(value), "a finite number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        elif isinstance(default, (tuple, list)):
            ok, kind = isinstance(value, (tuple, list)), "a list"
        else:
            continue
        if not ok:
            raise _fail(f"model.options.{key}", value, kind)


def _registry_names(kind: str) -> list[str]:
    from flaxdiff import losses, models, predictors, samplers, schedules

    return {"schedule": schedules.available, "predictor": predictors.available,
            "weighting": losses.weightings.available, "time_sampler": losses.time_samplers.available,
            "sampler": samplers.available, "model": models.available}[kind]()


def _check_registry(name: str, value: Any, kind: str) -> str:
    names = _registry_names(kind)
    if value not in names:
        raise _fail(name, value, ", ".join(names))
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Sections


class _Section:
    """Shared behaviour: ``replace``, ``to_dict`` and checked construction from a mapping."""

    section: typing.ClassVar[str] = ""

    def _check(self) -> None:
        raise NotImplementedError

    def __post_init__(self) -> None:
        self._check()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "") -> Any:
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}{cls.section}: expected a mapping of settings, got {values!r}")
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{where}unknown setting {cls.section}.{unknown[0]}; accepted in {cls.section}: "
                              f"{', '.join(names)}")
        return cls(**dict(values))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """dataset: mnist | digits | tfds:NAME | an image folder | an .npz file | a converted dataset directory.
    split: split name. data_dir / download: TFDS data directory and download_and_prepare when missing.
    image_size: square training resolution. channels: 1 or 3 (null: the source's). random_flip: horizontal flips.
    worker_count: grain worker processes (0: in the main process). num_classes: labels 0..N-1 (0: unconditional,
    null: the source's). latent_autoencoder: train on the scaled latents of this autoencoder directory.
    captions: mnist | source (null: none). text_encoder: a frozen text encoder preset or directory."""

    dataset: str = "mnist"
    split: str = "train"
    data_dir: str | None = None
    download: bool = False
    image_size: int = 28
    channels: int | None = None
    random_flip: bool = False
    worker_count: int = 0
    num_classes: int | None = None
    latent_autoencoder: str | None = None
    captions: str | None = None
    text_encoder: str = "text_encoder-tiny"

    section: typing.ClassVar[str] = "data"

    def _check(self) -> None:
        self._set("dataset", _check_str("data.dataset", self.dataset))
        self._set("split", _check_str("data.split", self.split))
        self._set("data_dir", _check_str("data.data_dir", self.data_dir, optional=True))
        self._set("download", _check_bool("data.download", self.download))
        self._set("image_size", _check_int("data.image_size", self.image_size, low=1))
        if self.channels is not None and (isinstance(self.channels, bool) or self.channels not in (1, 3)):
            raise _fail("data.channels", self.channels, "1, 3 or null (the source's)")
        self._set("random_flip", _check_bool("data.random_flip", self.random_flip))
        self._set("worker_count", _check_int("data.worker_count", self.worker_count, low=0))
        self._set("num_classes", _check_int("data.num_classes", self.num_classes, low=0, optional=True))
        self._set("latent_autoencoder", _check_str("data.latent_autoencoder", self.latent_autoencoder, optional=True))
        self._set("captions", _check_str("data.captions", self.captions, CAPTIONS, optional=True))
        self._set("text_encoder", _check_str("data.text_encoder", self.text_encoder))


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """name: a model preset (flaxdiff.models.available()). options: overrides of the preset's config fields
    (in_channels, num_classes, text dims and input_size are filled in from the data when absent). The default
    options belong to the default preset: a file or flag that names another preset without options gets that
    preset's own config ({}).
    pretrained: a diffusers pipeline directory (StableDiffusionPipeline or DiTPipeline) whose U-Net / DiT is
    fine-tuned (docs/diffusers.md); name and options are then the pipeline's (stored as "diffusers", {})."""

    name: str = "dit"
    options: dict = dataclasses.field(default_factory=lambda: {
        "patch_size": 4, "hidden_size": 128, "depth": 6, "num_heads": 4, "frequency_dim": 128})
    pretrained: str | None = None

    section: typing.ClassVar[str] = "model"

    def _check(self) -> None:
        self._set("pretrained", _check_str("model.pretrained", self.pretrained, optional=True))
        if self.pretrained is not None:
            self._check_pretrained()
            return
        self._set("name", _check_registry("model.name", self.name, "model"))
        if self.name in ("autoencoder", "autoencoder-tiny", "text_encoder", "text_encoder-tiny"):
            raise _fail("model.name", self.name, "a diffusion model preset (a unet or DiT preset)")
        self._set("options", _check_options("model.options", self.options))
        _check_model_options(self.name, self.options)

    def _check_pretrained(self) -> None:
        """A pretrained denoiser brings its architecture: name / options must be unset (the defaults) or the
        stored ("diffusers", {})."""
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self)}
        if self.name not in (defaults["name"], PRETRAINED_MODEL):
            raise ConfigError(f"model.pretrained and model.name {self.name!r} conflict: the pretrained diffusers "
                              f"denoiser brings its own architecture; leave model.name unset")
        if self.options not in (defaults["options"], {}):
            raise ConfigError("model.pretrained and model.options conflict: the pretrained diffusers denoiser brings "
                              "its own architecture; leave model.options unset")
        self._set("name", PRETRAINED_MODEL)
        self._set("options", {})


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(_Section):
    """schedule / predictor / weighting / time_sampler: registry names, each with an options object.
    shift: the rectified-flow resolution shift s (t' = s t / (1 + (s - 1) t)); null: none.
    cond_drop_prob: probability of replacing the condition by the null condition (classifier-free guidance)."""

    schedule: str = "rectified_flow"
    schedule_options: dict = dataclasses.field(default_factory=dict)
    shift: float | None = None
    predictor: str = "velocity"
    predictor_options: dict = dataclasses.field(default_factory=dict)
    weighting: str = "uniform"
    weighting_options: dict = dataclasses.field(default_factory=dict)
    time_sampler: str = "logit_normal"
    time_sampler_options: dict = dataclasses.field(default_factory=dict)
    cond_drop_prob: float = 0.1

    section: typing.ClassVar[str] = "diffusion"

    def _check(self) -> None:
        for kind in ("schedule", "predictor", "weighting", "time_sampler"):
            self._set(kind, _check_registry(f"diffusion.{kind}", getattr(self, kind), kind))
            self._set(f"{kind}_options", _check_options(f"diffusion.{kind}_options",
                                                        getattr(self, f"{kind}_options")))
        self._set("shift", _check_float("diffusion.shift", self.shift, low=0.0, low_open=True, optional=True))
        if self.shift is not None and self.schedule != "rectified_flow":
            raise ConfigError(f"diffusion.shift applies to the rectified_flow schedule, not {self.schedule!r}; "
                              f"use diffusion.schedule_options for other schedules")
        self._set("cond_drop_prob", _check_float("diffusion.cond_drop_prob", self.cond_drop_prob, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class TrainSection(_Section):
    """optimizer: adamw | adam | sgd. learning_rate: peak LR (> 0) after warmup_steps of linear warm-up, then
    lr_decay (cosine | linear | constant) over decay_steps (0: the whole run) down to end_lr_fraction of the peak.
    weight_decay, b1, b2: optimiser constants. grad_clip: global-norm clipping (0: off). batch_size: global batch
    over all processes. steps or epochs (exactly one): run length. grad_accum_steps: micro-batches per update.
    ema_decay: EMA of the params (0: off). compute_dtype: float32 | bfloat16 (params stay float32). fsdp: size of
    the mesh's fsdp axis. seed: params, noise and data order. checkpoint_every / keep_checkpoints / log_every /
    eval_every (0: off) / eval_batches / sample_every (0: only the final preview): run intervals."""

    optimizer: str = "adamw"
    learning_rate: float = 1.5e-3
    warmup_steps: int = 100
    lr_decay: str = "cosine"
    decay_steps: int = 0
    end_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0
    batch_size: int = 16
    steps: int | None = 2800
    epochs: float | None = None
    grad_accum_steps: int = 1
    ema_decay: float = 0.999
    compute_dtype: str = "float32"
    fsdp: int = 1
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 25
    eval_every: int = 0
    eval_batches: int = 4
    sample_every: int = 0

    section: typing.ClassVar[str] = "train"

    def _check(self) -> None:
        self._set("optimizer", _check_str("train.optimizer", self.optimizer, OPTIMIZERS))
        self._set("learning_rate", _check_float("train.learning_rate", self.learning_rate, 0.0, low_open=True))
        self._set("warmup_steps", _check_int("train.warmup_steps", self.warmup_steps, low=0))
        self._set("lr_decay", _check_str("train.lr_decay", self.lr_decay, LR_DECAYS))
        self._set("decay_steps", _check_int("train.decay_steps", self.decay_steps, low=0))
        self._set("end_lr_fraction", _check_float("train.end_lr_fraction", self.end_lr_fraction, 0.0, 1.0))
        self._set("weight_decay", _check_float("train.weight_decay", self.weight_decay, 0.0))
        self._set("b1", _check_float("train.b1", self.b1, 0.0, 1.0))
        self._set("b2", _check_float("train.b2", self.b2, 0.0, 1.0))
        self._set("grad_clip", _check_float("train.grad_clip", self.grad_clip, 0.0))
        self._set("batch_size", _check_int("train.batch_size", self.batch_size, low=1))
        self._set("steps", _check_int("train.steps", self.steps, low=1, optional=True))
        self._set("epochs", _check_float("train.epochs", self.epochs, 0.0, low_open=True, optional=True))
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"give exactly one of train.steps / train.epochs (got steps={self.steps!r}, "
                              f"epochs={self.epochs!r})")
        self._set("grad_accum_steps", _check_int("train.grad_accum_steps", self.grad_accum_steps, low=1))
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.batch_size {self.batch_size} is not divisible by train.grad_accum_steps "
                              f"{self.grad_accum_steps}")
        self._set("ema_decay", _check_float("train.ema_decay", self.ema_decay, 0.0, 1.0))
        if self.ema_decay == 1.0:
            raise _fail("train.ema_decay", self.ema_decay, "a number in [0, 1) (0: no EMA)")
        self._set("compute_dtype", _check_str("train.compute_dtype", self.compute_dtype, DTYPES))
        self._set("fsdp", _check_int("train.fsdp", self.fsdp, low=1))
        self._set("seed", _check_int("train.seed", self.seed, low=0))
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "eval_batches"):
            self._set(name, _check_int(f"train.{name}", getattr(self, name), low=1))
        for name in ("eval_every", "sample_every"):
            self._set(name, _check_int(f"train.{name}", getattr(self, name), low=0))


@dataclasses.dataclass(frozen=True)
class SampleConfig(_Section):
    """sampler: a flaxdiff.samplers name. steps: sampler steps. grid: a flaxdiff.timesteps grid name. The defaults are the settings the
    main job was measured with (docs/main_job.md). guidance: classifier-free guidance scale w (1: none, 0: unconditional).
    guidance_interval: [lo, hi] in sigma / alpha where guidance applies (null: everywhere). ema: sample the EMA
    params (false: the raw params). per_class: images per class (or prompt) row of the training preview grid
    (0: no preview)."""

    sampler: str = "dpmpp_2m"
    steps: int = 20
    grid: str = "logsnr_uniform"
    guidance: float = 3.0
    guidance_interval: list | None = dataclasses.field(default_factory=lambda: [0.3, 3.0])
    ema: bool = True
    per_class: int = 10

    section: typing.ClassVar[str] = "sample"

    def _check(self) -> None:
        self._set("sampler", _check_registry("sample.sampler", self.sampler, "sampler"))
        self._set("steps", _check_int("sample.steps", self.steps, low=1))
        from flaxdiff import timesteps

        names = timesteps.available()
        if self.grid not in names:
            raise _fail("sample.grid", self.grid, ", ".join(names))
        self._set("guidance", _check_float("sample.guidance", self.guidance, 0.0))
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            ok = (isinstance(interval, (list, tuple)) and len(interval) == 2 and all(_is_number(v) and
                  math.isfinite(v) for v in interval) and 0 <= interval[0] <= interval[1])
            if not ok:
                raise _fail("sample.guidance_interval", interval, "[lo, hi] with 0 <= lo <= hi, or null")
            self._set("guidance_interval", [float(v) for v in interval])
        self._set("ema", _check_bool("sample.ema", self.ema))
        self._set("per_class", _check_int("sample.per_class", self.per_class, low=0))


@dataclasses.dataclass(frozen=True)
class TaskConfig(_Section):
    """name: diffusion | autoencoder (train the latent autoencoder) | reflow (from reflow_from).
    autoencoder_model / kl_weight: the autoencoder preset and its KL weight (per pixel).
    reflow_from: a trained rectified-flow run directory; reflow_pairs / reflow_sampler / reflow_steps /
    reflow_guidance: how its (noise, sample) pairs are generated (guidance 1: none)."""

    name: str = "diffusion"
    autoencoder_model: str = "autoencoder-tiny"
    kl_weight: float = 1e-3
    reflow_from: str | None = None
    reflow_pairs: int = 2048
    reflow_sampler: str = "euler"
    reflow_steps: int = 20
    reflow_guidance: float = 1.0

    section: typing.ClassVar[str] = "task"

    def _check(self) -> None:
        self._set("name", _check_str("task.name", self.name, TASKS))
        self._set("autoencoder_model", _check_str("task.autoencoder_model", self.autoencoder_model))
        self._set("kl_weight", _check_float("task.kl_weight", self.kl_weight, 0.0))
        self._set("reflow_from", _check_str("task.reflow_from", self.reflow_from, optional=True))
        if self.name == "reflow" and not self.reflow_from:
            raise ConfigError("task.name reflow needs task.reflow_from (a trained rectified-flow run directory)")
        self._set("reflow_pairs", _check_int("task.reflow_pairs", self.reflow_pairs, low=1))
        self._set("reflow_sampler", _check_registry("task.reflow_sampler", self.reflow_sampler, "sampler"))
        self._set("reflow_steps", _check_int("task.reflow_steps", self.reflow_steps, low=1))
        self._set("reflow_guidance", _check_float("task.reflow_guidance", self.reflow_guidance, 0.0))


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig,
                             "train": TrainSection, "sample": SampleConfig, "task": TaskConfig}

# Settings that may change between a run and its resume: they do not change the function being trained.
RUN_ONLY = frozenset({
    "data.worker_count", "train.steps", "train.epochs", "train.checkpoint_every", "train.keep_checkpoints",
    "train.log_every", "train.eval_every", "train.eval_batches", "train.sample_every", "train.fsdp",
} | {f"sample.{field.name}" for field in dataclasses.fields(SampleConfig)})

# Settings holding file-system paths (when they are not a preset name): stored relative to the run directory.
PATH_FIELDS = ("data.dataset", "data.data_dir", "data.latent_autoencoder", "data.text_encoder", "task.reflow_from",
               "model.pretrained")

# Short flags users type -> the one setting they set.
ALIASES: dict[str, str] = {
    "dataset": "data.dataset", "split": "data.split", "data-dir": "data.data_dir", "download": "data.download",
    "image-size": "data.image_size", "channels": "data.channels", "random-flip": "data.random_flip",
    "worker-count": "data.worker_count", "num-classes": "data.num_classes",
    "latent-autoencoder": "data.latent_autoencoder", "captions": "data.captions", "text": "data.captions",
    "text-encoder": "data.text_encoder",
    "task": "task.name", "autoencoder-model": "task.autoencoder_model", "kl-weight": "task.kl_weight",
    "reflow-from": "task.reflow_from", "reflow-pairs": "task.reflow_pairs", "reflow-sampler": "task.reflow_sampler",
    "reflow-steps": "task.reflow_steps", "reflow-guidance": "task.reflow_guidance",
    "model": "model.name", "model-config": "model.options", "pretrained": "model.pretrained",
    "schedule": "diffusion.schedule", "schedule-options": "diffusion.schedule_options", "shift": "diffusion.shift",
    "predictor": "diffusion.predictor", "predictor-options": "diffusion.predictor_options",
    "weighting": "diffusion.weighting", "weighting-options": "diffusion.weighting_options",
    "time-sampler": "diffusion.time_sampler", "time-sampler-options": "diffusion.time_sampler_options",
    "cond-drop-prob": "diffusion.cond_drop_prob",
    "optimizer": "train.optimizer", "learning-rate": "train.learning_rate", "lr": "train.learning_rate",
    "warmup-steps": "train.warmup_steps", "lr-decay": "train.lr_decay", "decay-steps": "train.decay_steps",
    "end-lr-fraction": "train.end_lr_fraction", "weight-decay": "train.weight_decay", "b1": "train.b1",
    "b2": "train.b2", "grad-clip": "train.grad_clip", "batch-size": "train.batch_size", "steps": "train.steps",
    "epochs": "train.epochs", "grad-accum-steps": "train.grad_accum_steps", "ema-decay": "train.ema_decay",
    "precision": "train.compute_dtype", "compute-dtype": "train.compute_dtype", "fsdp": "train.fsdp",
    "seed": "train.seed", "checkpoint-every": "train.checkpoint_every",
    "keep-checkpoints": "train.keep_checkpoints", "log-every": "train.log_every", "eval-every": "train.eval_every",
    "eval-batches": "train.eval_batches", "sample-every": "train.sample_every",
    "sampler": "sample.sampler", "preview-sampler": "sample.sampler", "sample-steps": "sample.steps",
    "preview-steps": "sample.steps", "grid": "sample.grid", "guidance": "sample.guidance",
    "preview-guidance": "sample.guidance", "guidance-interval": "sample.guidance_interval",
    "per-class": "sample.per_class", "preview-per-class": "sample.per_class",
}


def field_type(dotted: str) -> Any:
    """The annotation of ``section.field`` (evaluated)."""
    section, name = dotted.split(".", 1)
    hints = typing.get_type_hints(SECTIONS[section])
    return hints[name]


def field_doc(dotted: str) -> str:
    section = dotted.split(".", 1)[0]
    return (SECTIONS[section].__doc__ or "").split("\n")[0]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run: one instance of each section. Build with :meth:`from_dict` (checked) or ``RunConfig()``."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    #: Dotted names of the settings a config file or flag gave (recorded by :meth:`merge`; neither saved nor compared).
    given: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "") -> "RunConfig":
        """The defaults with the sections given in ``values`` (a config file) merged in: :meth:`merge`."""
        return cls.merge(cls(), values, where)

    @classmethod
    def merge(cls, base: "RunConfig", layer: Mapping[str, Any], where: str = "") -> "RunConfig":
        """``base`` with the settings that ``layer`` gives, every value checked; unknown names are errors.

        A layer is a partial nested mapping, what one source actually gave (``{"train": {"steps": 10}}``): a
        config file over the defaults, the command-line flags over the file. Settings merge field by field
        (an options object is one field), and a layer means what its user means:

        - naming another model preset without model options gives that preset's own config ({}): the base's
          options belong to the base's preset;
        - train.steps and train.epochs are exclusive: giving one (not null) clears the other.

        The result remembers the settings given by this layer and by the layers under ``base`` (:attr:`given`).
        ``where`` (e.g. "--config run.json: ") starts every error line.
        """
        if not isinstance(layer, Mapping):
            raise ConfigError(f"{where}expected a mapping of sections {sorted(SECTIONS)}, got {layer!r}")
        unknown = sorted(set(layer) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{where}unknown section {unknown[0]!r}; accepted: {', '.join(SECTIONS)} "
                              f"(settings are nested, e.g. train: {{learning_rate: 0.001}})")
        values = base.to_dict()
        given = set(base.given)
        sections = {}
        for name, section_cls in SECTIONS.items():
            layer_section = layer.get(name, {})
            if not isinstance(layer_section, Mapping):
                raise ConfigError(f"{where}section {name}: expected a mapping, got {layer_section!r}")
            merged = {**values[name], **_cleared_by(name, values[name], layer_section), **dict(layer_section)}
            try:
                sections[name] = section_cls.from_dict(merged, where)
            except ConfigError as err:
                if where and not str(err).startswith(where):
                    raise ConfigError(f"{where}{err}") from None
                raise
            given.update(f"{name}.{key}" for key in layer_section)
        return cls(**sections, given=frozenset(given))

    def replace(self, **changes: Mapping[str, Any]) -> "RunConfig":
        """A copy with some fields of some sections changed: ``config.replace(train={"steps": 10})``. The changes
        are the program's, not the user's: :attr:`given` stays as it was (and no layering rule applies)."""
        values = self.to_dict()
        for section, fields in changes.items():
            values[section] = {**values[section], **dict(fields)}
        return self._rebuilt(values)

    def _rebuilt(self, values: Mapping[str, Any]) -> "RunConfig":
        """``values`` (every field of every section) checked, remembering this config's :attr:`given`."""
        return dataclasses.replace(RunConfig.from_dict(values), given=self.given)

    def get(self, dotted: str) -> Any:
        section, name = dotted.split(".", 1)
        return getattr(getattr(self, section), name)

    # -- paths ----------------------------------------------------------------------------------------------------

    def map_paths(self, fn: Callable[[str], str]) -> "RunConfig":
        """Apply ``fn`` to every path-valued setting (preset names and absent values are left alone)."""
        values = self.to_dict()
        for dotted in PATH_FIELDS:
            section, name = dotted.split(".", 1)
            value = values[section][name]
            if value is not None and is_path_setting(dotted, value):
                values[section][name] = fn(value)
        return self._rebuilt(values)

    def resolved_paths(self, base: str | Path) -> "RunConfig":
        """Relative paths resolved against ``base`` (absolute paths kept)."""
        base = Path(base).expanduser().absolute()
        return self.map_paths(lambda p: os.path.normpath(base / Path(p).expanduser()))

    def relative_paths(self, base: str | Path) -> "RunConfig":
        """Absolute paths written relative to ``base`` (so a run directory can move with what it depends on)."""
        base = Path(base).expanduser().absolute()
        return self.map_paths(lambda p: os.path.relpath(Path(p).expanduser().absolute(), base))


def _cleared_by(section: str, base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``base`` (one section) that the layer clears: the rules of :meth:`RunConfig.merge`."""
    if section == "model" and "options" not in layer and layer.get("name", base["name"]) != base["name"]:
        return {"options": {}}
    if section == "train" and ("steps" in layer) != ("epochs" in layer):
        if layer.get("epochs") is not None:
            return {"steps": None}
        if layer.get("steps") is not None:
            return {"epochs": None}
    return {}


def is_path_setting(dotted: str, value: str) -> bool:
    """Whether a path-capable setting holds a path rather than a name (dataset names, tfds:..., presets)."""
    if dotted == "data.dataset":
        return value not in DATASET_NAMES and not value.startswith("tfds:")
    if dotted == "data.text_encoder":
        from flaxdiff import models

        return value not in models.available()
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON or YAML file; syntax errors name the file and line (ConfigError)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot be read ({err})") from None
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).split("\n")[0]
            raise ConfigError(f"--config {path}: YAML syntax error{where}: {problem}") from None
    else:
        try:
            values = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {path}: JSON syntax error at line {err.lineno}, column {err.colno}: "
                              f"{err.msg} (use a .yaml/.yml suffix for YAML)") from None
        except ValueError as err:
            raise ConfigError(f"--config {path}: {err}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections {sorted(SECTIONS)}, got "
                          f"{type(values).__name__}")
    return values


def check_writable(path: str | Path, name: str = "") -> None:
    """ConfigError unless ``path`` can be created or written: its nearest existing ancestor must be a writable
    directory (and ``path`` itself writable, when it exists). ``name`` (e.g. "--workdir") prefixes the message."""
    path = Path(path).expanduser().absolute()
    shown = f"{name} {path}" if name else str(path)
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{shown} cannot be written ({ancestor} is not a writable directory)")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{shown} cannot be written (permission denied)")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number; accepted: finite numbers")


def guidance_or_none(scale: float | None) -> float | None:
    """The sampler's ``guidance_scale`` for a configured scale: None (one conditional forward) when it is 1."""
    if scale is None or float(scale) == 1.0:
        return None
    return float(scale)
