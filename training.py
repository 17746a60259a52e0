"""Train a diffusion / flow model with flaxdiff: one script for a 2-core laptop and a multi-host TPU pod.

    python training.py                                   # class-conditional MNIST at 28x28 (the main job)
    python training.py --print-config > run.json         # the fully resolved config (flaxdiff.config.RunConfig)
    python training.py --config run.json --steps 5000    # a config file (JSON or YAML); flags override it
    python training.py --config runs/mnist/config.json   # a run's saved config reproduces that run
    python training.py --resume --workdir runs/mnist     # continue from the latest intact checkpoint

Settings resolve as: ``RunConfig`` defaults < ``--config FILE`` < command-line flags (``RunConfig.merge``, setting
by setting; naming another model preset without options gives its own config, steps / epochs clear each other).
Every setting has one name, ``section.field``, and a flag of that name (``--train.learning_rate``); the short aliases
of ``flaxdiff.config.ALIASES`` (``--lr``, ``--steps``, ``--dataset``, ...) set the same settings. Relative paths in
a config file are relative to the file; on the command line, to the current directory. Invocation flags
(``--config``, ``--print-config``, ``--workdir``, ``--resume``, ``--overwrite``, ``--debug`` and the distributed
flags) are not settings.

The run directory ``--workdir`` receives ``config.json`` (the resolved run config, paths relative to the run
directory; a checkpoint stores the same), ``checkpoints/`` (orbax), ``metrics.jsonl``, ``tensorboard/`` and
``samples.png`` (drawn with the run's ``sample`` settings). Nothing in an existing run directory is written until
the run is accepted (``--resume`` with a matching config, or ``--overwrite``). ``--resume`` starts from the newest
intact step: a damaged newer step (a missing or unreadable file) is named, moved to ``damaged_checkpoints/`` and
skipped.

Bad input ends with one ``training.py: error: ...`` line and exit status 2 (``--debug`` or ``FLAXDIFF_DEBUG=1``
shows the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping

from flaxdiff.config import (ALIASES, SECTIONS, ConfigError, RunConfig, check_writable, field_type,
                             guidance_or_none, read_config_file)

if typing.TYPE_CHECKING:
    from flaxdiff.data.pipeline import MappedIterator

logger = logging.getLogger("training")

CONFIG_FILE = "config.json"
DAMAGED_DIR = "damaged_checkpoints"
INVOCATION = ("config", "print_config", "workdir", "resume", "overwrite", "debug", "coordinator_address",
              "num_processes", "process_id", "startup_timeout")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------------------------------
# Flags generated from RunConfig


def _flag_type(annotation: Any, dotted: str) -> Any:
    """A string -> value parser for a field annotation; invalid text names the setting and what it takes."""
    args = set(typing.get_args(annotation)) or {annotation}
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), str)
    base = typing.get_origin(base) or base

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if base is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{dotted} {text!r} is invalid; accepted: true or false")
        if base in (int, float):
            try:
                return base(text)
            except ValueError:
                kind = "an integer" if base is int else "a finite number"
                raise argparse.ArgumentTypeError(f"{dotted} {text!r} is invalid; accepted: {kind}"
                                                 f"{' or none' if optional else ''}") from None
        if base in (dict, list):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise argparse.ArgumentTypeError(f"{dotted} {text!r} is not valid JSON ({err.msg})") from None
            if not isinstance(value, base):
                example = '{"key": 1}' if base is dict else "[0.3, 5.0]"
                raise argparse.ArgumentTypeError(f"{dotted} {text!r} is invalid; accepted: a JSON "
                                                 f"{'object' if base is dict else 'list'} like '{example}'")
            return value
        return text

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Every setting flag defaults to "not given", so that only explicit flags override the config file."""
    parser = _Parser(prog="training.py", description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                     allow_abbrev=False)
    run = parser.add_argument_group("invocation (not settings)")
    run.add_argument("--config", metavar="FILE", help="JSON or YAML run config (as printed by --print-config)")
    run.add_argument("--print-config", action="store_true", help="print the resolved run config as JSON and exit")
    run.add_argument("--workdir", "--log-dir", dest="workdir", metavar="DIR",
                     help="run directory (default: runs/mnist)")
    run.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --workdir")
    run.add_argument("--overwrite", action="store_true", help="delete the run's existing checkpoints first")
    run.add_argument("--debug", action="store_true", help="show tracebacks of errors (or FLAXDIFF_DEBUG=1)")
    run.add_argument("--coordinator-address", metavar="HOST:PORT", help="jax.distributed coordinator (multi-host)")
    run.add_argument("--num-processes", type=_flag_type(int, "--num-processes"), metavar="N",
                     help="number of processes of a multi-host run")
    run.add_argument("--process-id", type=_flag_type(int, "--process-id"), metavar="I",
                     help="this process's index in [0, N)")
    run.add_argument("--startup-timeout", type=_flag_type(float, "--startup-timeout"), metavar="SECONDS",
                     help="how long processes wait for each other to start (default 30; FLAXDIFF_STARTUP_TIMEOUT)")
    aliases_of: dict[str, list[str]] = {}
    for alias, dotted in ALIASES.items():
        aliases_of.setdefault(dotted, []).append(f"--{alias}")
    for section, section_cls in SECTIONS.items():
        group = parser.add_argument_group(section, (section_cls.__doc__ or "").split("\n")[0])
        for field in dataclasses.fields(section_cls):
            dotted = f"{section}.{field.name}"
            names = [f"--{dotted}"] + ([f"--{dotted.replace('_', '-')}"] if "_" in field.name else [])
            group.add_argument(*names, *aliases_of.get(dotted, []), dest=dotted,
                               type=_flag_type(field_type(dotted), dotted), metavar="VALUE")
    return parser


def resolve_config(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """(run config, invocation flags): defaults < --config file < flags, every value checked."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    invocation = argparse.Namespace(**{key: given.get(key) for key in INVOCATION})
    invocation.workdir = invocation.workdir or "runs/mnist"
    if invocation.resume and invocation.overwrite:
        parser.error("--resume and --overwrite conflict; give one of them")
    flags = {key: value for key, value in given.items() if "." in key}
    if flags.get("train.steps") is not None and flags.get("train.epochs") is not None:
        parser.error("--steps and --epochs conflict; give one of them")
    layer: dict[str, dict[str, Any]] = {}
    for dotted, value in flags.items():
        section, name = dotted.split(".", 1)
        layer.setdefault(section, {})[name] = value
    try:
        config = RunConfig()
        if invocation.config:
            config = RunConfig.merge(config, read_config_file(invocation.config), f"--config {invocation.config}: ")
            config = config.resolved_paths(Path(invocation.config).expanduser().parent)
        config = RunConfig.merge(config, layer).resolved_paths(Path.cwd())
        if config.model.pretrained is not None:
            # a pretrained diffusers denoiser: its architecture and diffusion come from its directory
            architecture = sorted(key for key in ("model.name", "model.options") if key in flags)
            if flags.get("model.pretrained") and architecture:
                raise ConfigError(f"--model.pretrained and --{architecture[0]} conflict: the pretrained diffusers "
                                  f"denoiser brings its own architecture; drop --{architecture[0]}")
            from flaxdiff.interop import diffusers_finetune

            config = diffusers_finetune.resolve_config(config)
    except ConfigError as err:
        parser.error(str(err))
    return config, invocation


# ---------------------------------------------------------------------------------------------------------------------
# The run directory: checked before anything is written


def _checkpoint_dir(workdir: Path) -> Path:
    return workdir / "checkpoints"


def check_run_directory(config: RunConfig, invocation: argparse.Namespace) -> int | None:
    """Refuse a start that would damage ``--workdir``; returns the step to resume from (None: start at 0).

    Raises ValueError (nothing written) when the directory cannot be written, holds checkpoints without --resume /
    --overwrite, or --resume finds a saved config that differs from this one in a setting that changes training.
    """
    from flaxdiff import checkpoints

    workdir = Path(invocation.workdir).expanduser().absolute()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} exists and is not a directory")
    check_writable(workdir, "--workdir")
    ckpt_dir = _checkpoint_dir(workdir)
    steps = checkpoints.list_steps(ckpt_dir)
    if not steps:
        return None
    if not invocation.resume:
        if not invocation.overwrite:
            raise ConfigError(f"{ckpt_dir} already holds checkpoints (steps {steps}); pass --resume to continue "
                              f"or --overwrite to start again")
        return None
    step, damaged = checkpoints.latest_intact_step(ckpt_dir)
    saved = checkpoints.read_run_config(ckpt_dir, step, run_dir=workdir)
    differences = checkpoints.config_differences(saved, config)
    if differences:
        key = differences[0]
        raise ConfigError(f"--resume: {ckpt_dir / str(step)} was trained with {key}={saved.get(key)!r}, this run "
                          f"has {config.get(key)!r} ({len(differences)} setting(s) differ: "
                          f"{', '.join(differences)})")
    for bad_step, why in damaged:
        logger.warning("--resume: checkpoint step %d is damaged (%s); resuming from step %d", bad_step, why, step)
        if invocation.process_id in (None, 0):
            target = workdir / DAMAGED_DIR / str(bad_step)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(ckpt_dir / str(bad_step)), str(target))
            logger.warning("--resume: moved the damaged step to %s (nothing is deleted)", target)
    return step


# ---------------------------------------------------------------------------------------------------------------------
# Building the pieces


def build_diffusion(config: RunConfig) -> tuple[Any, Any, Any, Any]:
    """(schedule, predictor, weighting, time_sampler) of the diffusion section."""
    from flaxdiff import checkpoints, losses

    diffusion = config.diffusion
    schedule, predictor = checkpoints.build_schedule_predictor(config)
    return (schedule, predictor,
            losses.weightings.get(diffusion.weighting, **diffusion.weighting_options),
            losses.time_samplers.get(diffusion.time_sampler, **diffusion.time_sampler_options))


def build_train_config(config: RunConfig, total_steps: int, null_cond: Mapping[str, Any] | None) -> Any:
    """The trainer's TrainConfig (condition dropout only when there is a null condition)."""
    from flaxdiff.training import TrainConfig

    train = config.train
    same = ("learning_rate", "warmup_steps", "lr_decay", "decay_steps", "end_lr_fraction", "optimizer", "b1", "b2",
            "weight_decay", "grad_clip", "grad_accum_steps", "ema_decay", "compute_dtype", "fsdp", "seed",
            "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches", "sample_every")
    return TrainConfig(**{name: getattr(train, name) for name in same}, total_steps=total_steps,
                       cond_drop_prob=config.diffusion.cond_drop_prob if null_cond else 0.0, null_cond=null_cond)


@dataclasses.dataclass
class Data:
    """What the data section resolves to: the batch stream and the facts the model is built from."""

    source: Any
    stream: MappedIterator
    example: dict
    num_classes: int
    channels: int
    text: Any = None
    codec: Any = None
    val_data: Any = None
    encoded: dict = dataclasses.field(default_factory=dict)


def build_data(config: RunConfig, workdir: Path, local_batch: int) -> Data:
    """Source -> (captions) -> (latents) -> grain loader, and one batch to learn the shapes from."""
    import jax
    import numpy as np

    from flaxdiff import data
    from flaxdiff.data.pipeline import MappedIterator

    cfg = config.data
    options: dict[str, Any] = {"split": cfg.split}
    if cfg.dataset.startswith("tfds:"):
        options.update(data_dir=cfg.data_dir, download=cfg.download)
    source = data.load_source(cfg.dataset, **options)
    data.check_finite(source, cfg.dataset)
    num_classes = cfg.num_classes if cfg.num_classes is not None else int(getattr(source, "num_classes", 0) or 0)
    encoded = precomputed(source)
    text = None
    keep = ("image", "label") if num_classes > 0 else ("image",)
    if encoded.get("text_encoder"):
        # text embeddings precomputed by `flaxdiff data encode`: trained on as they are, the encoder kept for sampling
        from flaxdiff.data import captions

        text = captions.TextConditioner.create(encoded["text_encoder"])
        num_classes, keep = 0, ("image", "text", "text_mask", "pooled")
    elif cfg.captions:
        from flaxdiff.data import captions

        source = captions.with_captions(source, cfg.captions, seed=config.train.seed)
        text = captions.TextConditioner.create(cfg.text_encoder, seed=config.train.seed)
        num_classes, keep = 0, ("image", "text", "text_mask", "pooled")
    codec = None
    train_source = source
    if encoded.get("autoencoder"):
        from flaxdiff import latents

        codec = latents.load_codec(encoded["autoencoder"])
    elif cfg.latent_autoencoder:
        from flaxdiff import latents

        codec = latents.load_codec(cfg.latent_autoencoder)
        suffix = f"_p{jax.process_index()}" if jax.process_count() > 1 else ""
        cache = workdir / f"latents_{cfg.split}_{cfg.image_size}{suffix}.npz"
        if not cache.is_file() or latents.read_cache_info(cache)["autoencoder"] != codec.path:
            latents.cache_latents(codec, source, cache, cfg.image_size, codec.config.in_channels)
        train_source = latents.latent_source(cache)
    pixels = codec is None
    tokenizer = text.tokenizer() if text is not None else None
    loader = data.make_loader(train_source, local_batch, cfg.image_size if pixels else None, seed=config.train.seed,
                              worker_count=cfg.worker_count, channels=cfg.channels if pixels else None,
                              random_flip=cfg.random_flip and pixels, tokenizer=tokenizer)
    if text is not None and not encoded.get("text_encoder"):
        loader = MappedIterator(loader, text.condition_batch)
    loader = MappedIterator(loader, lambda batch: {key: batch[key] for key in keep if key in batch})
    first = next(loader)
    if num_classes > 0:
        labels = np.asarray(first["label"])
        if labels.max() >= num_classes:
            raise ConfigError(f"data.num_classes {num_classes} but the data has label {int(labels.max())}")
    example = {"image": first["image"]}
    if text is not None:
        example.update({key: first[key] for key in ("text", "text_mask", "pooled")})
    elif num_classes > 0:
        example["label"] = first["label"]
    channels = codec.config.in_channels if codec is not None else int(first["image"].shape[-1])

    val_data = None
    if config.train.eval_every > 0:
        val_source = data.load_source(cfg.dataset, **{**options, "split": "validation"})
        if cfg.captions:
            val_source = captions.with_captions(val_source, cfg.captions, seed=config.train.seed)

        def val_data() -> Iterator[Any]:
            it: Any = data.make_loader(val_source, local_batch, cfg.image_size, seed=config.train.seed,
                                       shuffle=False, num_epochs=1, channels=cfg.channels, tokenizer=tokenizer)
            if codec is not None:
                it = MappedIterator(it, lambda batch: {**batch, "image": np.asarray(codec.encode(batch["image"]))})
            return MappedIterator(it, text.condition_batch) if text is not None else it

    return Data(source, MappedIterator(loader, None, first), example, num_classes, channels, text, codec, val_data,
                encoded)


def precomputed(source: Any) -> dict[str, str]:
    """What a dataset written by ``flaxdiff data encode`` already holds: {"autoencoder": its directory} when the
    images are scaled latents, {"text_encoder": its directory} when text embeddings are stored (both resolved
    against the dataset directory first)."""
    manifest = getattr(source, "manifest", None)
    if not isinstance(manifest, Mapping):
        return {}
    root = Path(getattr(source, "root", "."))
    found = {}
    autoencoder = manifest.get("autoencoder") if manifest.get("kind") == "latents" else None
    if isinstance(autoencoder, Mapping):
        relative = autoencoder.get("relative_path")
        found["autoencoder"] = str(root / relative) if relative and (root / relative).exists() else \
            str(autoencoder.get("path"))
    encoder = manifest.get("text_encoder")
    if isinstance(encoder, Mapping) and encoder.get("path"):
        found["text_encoder"] = str(root / encoder["path"])
    return found


def resolve_run(config: RunConfig, data: Data) -> RunConfig:
    """The config with everything the data decides filled in (classes, channels, the model's input sizes), so
    that the saved config rebuilds the model alone and resolves to itself when fed back."""
    options = dict(config.model.options)
    image_shape = tuple(data.example["image"].shape[1:])
    options.setdefault("in_channels", image_shape[-1])
    options.setdefault("num_classes", data.num_classes)
    if data.text is not None:
        options.setdefault("text_dim", data.text.width)
        options.setdefault("pooled_dim", getattr(data.text, "pooled_width", data.text.width))
    if config.model.name.lower().startswith("dit"):
        options.setdefault("input_size", image_shape[0])
    resolved: dict[str, Any] = {"num_classes": data.num_classes, "channels": data.channels}
    if data.encoded.get("autoencoder"):
        resolved["latent_autoencoder"] = data.encoded["autoencoder"]
    if data.encoded.get("text_encoder"):
        resolved.update(captions="source", text_encoder=data.encoded["text_encoder"])
    return config.replace(data=resolved, model={"options": options})


def total_steps(config: RunConfig, examples: int) -> int:
    if config.train.steps is not None:
        return config.train.steps
    return max(1, int(math.ceil(config.train.epochs * max(1, examples // config.train.batch_size))))


# ---------------------------------------------------------------------------------------------------------------------
# Tasks


def train_diffusion(config: RunConfig, workdir: Path, resume_step: int | None, overwrite: bool) -> Path:
    """The diffusion task: data, components, fit, preview grid."""
    import jax
    import numpy as np

    from flaxdiff import checkpoints, models, objectives
    from flaxdiff.models import layers
    from flaxdiff.training import Trainer, save_image_grid

    processes = jax.process_count()
    if config.train.batch_size % processes:
        raise ConfigError(f"train.batch_size {config.train.batch_size} is not divisible by the {processes} "
                          f"processes")
    data = build_data(config, workdir, config.train.batch_size // processes)
    if config.model.pretrained is not None:
        return train_pretrained(config, workdir, resume_step, overwrite, data)
    config = resolve_run(config, data)
    try:
        model_cfg = models.get_config(config.model.name, **config.model.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.options for {config.model.name!r}: {err}") from None
    schedule, predictor, weighting, time_sampler = build_diffusion(config)
    null_cond = checkpoints.null_condition(config, data.text)
    steps = total_steps(config, len(data.source))
    is_main = jax.process_index() == 0
    if overwrite and is_main and _checkpoint_dir(workdir).is_dir():
        shutil.rmtree(_checkpoint_dir(workdir))
    saved_config = config.relative_paths(workdir).to_dict()
    model = model_cfg.make()
    try:
        params = param_count(model, data.example)
    except layers.ImageSizeError as err:
        raise ConfigError(f"model {config.model.name!r} cannot take the data's {data.example['image'].shape[1:]} "
                          f"inputs: {err}; set data.image_size (--image-size) to a size it accepts") from None
    train_config = build_train_config(config, steps, null_cond)
    loss = objectives.DiffusionLoss(schedule, predictor, weighting, time_sampler,
                                    cond_drop_prob=train_config.cond_drop_prob, null_cond=null_cond)
    if getattr(model_cfg, "mask_ratio", 0.0):
        loss = objectives.MaskedDiffusionLoss.for_model(model, loss)
    trainer = Trainer(model, model_cfg.to_config(), train_config=train_config, example_batch=data.example, loss=loss,
                      workdir=workdir, run_config=saved_config)
    preview = make_preview(config, workdir, data, model, schedule, predictor, null_cond)
    if preview is not None:
        trainer.sample_fn = preview
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(json.dumps(saved_config, indent=2) + "\n")
        if data.text is not None:
            data.text.save(workdir / checkpoints.TEXT_ENCODER_DIR)
        logger.info("model %s: %s params; %d steps of global batch %d (%.1f epochs of %d examples); workdir %s",
                    config.model.name, f"{params:,}", steps,
                    config.train.batch_size, steps * config.train.batch_size / max(1, len(data.source)),
                    len(data.source), workdir)
    if resume_step is not None:
        trainer.restore(data.stream, step=resume_step)
    trainer.fit(data.stream, val_data=data.val_data, resume=False)
    trainer.close()
    if preview is not None:
        params = trainer.state.ema_params if config.sample.ema else trainer.state.params
        images = np.asarray(jax.device_get(preview(params, None)))
        if is_main:
            path = save_image_grid(images, workdir / "samples.png", columns=max(config.sample.per_class, 1))
            logger.info("wrote %s", path)
    return workdir


def train_pretrained(config: RunConfig, workdir: Path, resume_step: int | None, overwrite: bool, data: Data) -> Path:
    """Fine-tune the U-Net / DiT of the diffusers pipeline ``model.pretrained`` (flaxdiff.interop.diffusers_finetune)
    on a dataset encoded with its VAE (and text encoder): diffusers' training loss through the Trainer, starting
    from the pretrained params; the preview grid is drawn by the pipeline with the fine-tuned params."""
    import dataclasses as dc

    import jax
    import numpy as np

    from flaxdiff import objectives
    from flaxdiff.interop import diffusers_finetune
    from flaxdiff.interop.diffusers_pipeline import DiffusersPipeline
    from flaxdiff.training import Trainer, save_image_grid

    pipe = DiffusersPipeline.from_pretrained(config.model.pretrained)
    diffusers_finetune.check_data(pipe, data.encoded, data.example, data.num_classes, data.text)
    parts = diffusers_finetune.finetune_parts(pipe)
    resolved: dict[str, Any] = {"num_classes": data.num_classes, "channels": data.channels,
                                "latent_autoencoder": data.encoded["autoencoder"]}
    if data.encoded.get("text_encoder"):
        resolved.update(captions="source", text_encoder=data.encoded["text_encoder"])
    config = config.replace(data=resolved)
    schedule, predictor, weighting, time_sampler = build_diffusion(config)
    steps = total_steps(config, len(data.source))
    is_main = jax.process_index() == 0
    if overwrite and is_main and _checkpoint_dir(workdir).is_dir():
        shutil.rmtree(_checkpoint_dir(workdir))
    saved_config = config.relative_paths(workdir).to_dict()
    train_config = dc.replace(build_train_config(config, steps, None), cond_drop_prob=config.diffusion.cond_drop_prob)
    loss = objectives.DiffusionLoss(schedule, predictor, weighting, time_sampler,
                                    cond_drop_prob=config.diffusion.cond_drop_prob, null_cond=parts["null_cond"])
    trainer = Trainer(parts["model"], None, train_config=train_config, example_batch=data.example, loss=loss,
                      workdir=workdir, run_config=saved_config)
    preview = None
    if config.sample.per_class > 0:
        request: dict[str, Any] = {}
        if pipe.kind == "dit":
            request["labels"] = list(np.repeat(np.arange(min(data.num_classes, 10)), config.sample.per_class))
        else:
            from flaxdiff.data import captions

            request["prompts"] = captions.preview_prompts(data.source, config.sample.per_class)
        sample = config.sample
        settings = dict(sampler=sample.sampler, steps=sample.steps, grid=sample.grid, guidance_scale=sample.guidance,
                        guidance_interval=sample.guidance_interval, seed=config.train.seed)

        def preview(params: Any, key: Any) -> Any:
            return pipe.with_params(params).generate(**request, **settings) * 2.0 - 1.0

        trainer.sample_fn = preview
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(json.dumps(saved_config, indent=2) + "\n")
        logger.info("fine-tuning the %s of %s: %s params; %d steps of global batch %d; workdir %s",
                    "DiT" if pipe.kind == "dit" else "U-Net", config.model.pretrained,
                    f"{sum(p.size for p in jax.tree.leaves(parts['params'])):,}", steps, config.train.batch_size,
                    workdir)
    if resume_step is not None:
        trainer.restore(data.stream, step=resume_step)
    else:
        trainer.state = diffusers_finetune.initial_state(trainer, parts["params"])
    trainer.fit(data.stream, val_data=data.val_data, resume=False)
    trainer.close()
    if preview is not None:
        params = trainer.state.ema_params if config.sample.ema else trainer.state.params
        images = np.asarray(preview(jax.device_get(params), None))
        if is_main:
            path = save_image_grid(images, workdir / "samples.png", columns=max(config.sample.per_class, 1))
            logger.info("wrote %s", path)
    return workdir


def make_preview(config: RunConfig, workdir: Path, data: Data, model: Any, schedule: Any, predictor: Any,
                 null_cond: Any) -> Any:
    """``preview(params, key) -> images``: the run's ``sample`` settings through the same Pipeline that
    ``flaxdiff sample`` uses (one row per class, or per preview prompt); None when sample.per_class is 0."""
    import numpy as np

    from flaxdiff.pipeline import Pipeline

    per_class = config.sample.per_class
    if per_class == 0:
        return None
    decode = None
    if data.codec is not None:
        decode = data.codec.decode
    shape = tuple(data.example["image"].shape[1:])
    pipe = Pipeline(model, None, schedule, predictor, shape, data.num_classes, null_cond, decode,
                    config=config, text=data.text)
    request: dict[str, Any] = {}
    if data.text is not None:
        from flaxdiff.data import captions

        request["prompts"] = captions.preview_prompts(data.source, per_class)
    elif data.num_classes > 0:
        request["labels"] = np.repeat(np.arange(data.num_classes), per_class).astype(np.int32)
    else:
        request["num_images"] = per_class ** 2

    def preview(params: Any, key: Any) -> Any:
        return pipe.with_params(params).generate(**request, seed=config.train.seed, output="float")

    return preview


def train_other(config: RunConfig, workdir: Path, resume: bool = False) -> Path:
    """--task autoencoder (flaxdiff.latents.train_autoencoder into workdir/autoencoder) or --task reflow
    (flaxdiff.reflow.run_reflow from task.reflow_from into workdir)."""
    import jax

    from flaxdiff import data

    local_batch = config.train.batch_size // jax.process_count()
    if config.task.name == "autoencoder":
        from flaxdiff import latents

        source = data.load_source(config.data.dataset, split=config.data.split)
        data.check_finite(source, config.data.dataset)
        out = latents.train_autoencoder(
            source, workdir / "autoencoder", model=config.task.autoencoder_model, image_size=config.data.image_size,
            channels=config.data.channels, batch_size=local_batch, steps=total_steps(config, len(source)),
            learning_rate=config.train.learning_rate, kl_weight=config.task.kl_weight, seed=config.train.seed,
            log_every=config.train.log_every, checkpoint_every=config.train.checkpoint_every, resume=resume)
        logger.info("autoencoder written to %s (use --latent-autoencoder %s)", out, out)
        return workdir
    from flaxdiff import checkpoints, reflow

    base_dir, base_ckpt = checkpoints.find_checkpoints(config.task.reflow_from)
    saved = None
    if checkpoints.is_run_config(checkpoints.read_config(base_ckpt)):
        # the reflow run trains the base model on the base data: its config is the base's with this run's
        # train, sample and task sections
        base = checkpoints.read_run_config(base_ckpt, run_dir=base_dir)
        reflow_config = base.replace(train=config.train.to_dict(), sample=config.sample.to_dict(),
                                     task=config.task.to_dict())
        saved = reflow_config.relative_paths(workdir).to_dict()
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    reflow.run_reflow(config.task.reflow_from, workdir, num_pairs=config.task.reflow_pairs,
                      pair_sampler=config.task.reflow_sampler, pair_steps=config.task.reflow_steps,
                      guidance_scale=guidance_or_none(config.task.reflow_guidance),
                      train_config=build_train_config(config, total_steps(config, config.task.reflow_pairs), None),
                      batch_size=local_batch, seed=config.train.seed, run_config=saved)
    return workdir


def param_count(model: Any, example: Mapping[str, Any]) -> int:
    """Number of parameters of ``model`` for inputs shaped like ``example`` (shapes only, nothing is run)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1,) + tuple(example["image"].shape[1:]))
    cond = {key: jnp.zeros((1,) + tuple(value.shape[1:]), value.dtype)
            for key, value in example.items() if key != "image"} or None
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), cond, train=False))
    return int(sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])))


def run(config: RunConfig, invocation: argparse.Namespace) -> Path:
    """Check the run directory, join the other processes, then train the task."""
    from flaxdiff.training import parallel

    start = time.perf_counter()
    workdir = Path(invocation.workdir).expanduser().absolute()
    resume_step = check_run_directory(config, invocation)
    parallel.initialize_distributed(invocation.coordinator_address, invocation.num_processes,
                                    invocation.process_id, startup_timeout=invocation.startup_timeout,
                                    on_startup_timeout=_exit_with_error)
    if config.task.name == "diffusion":
        train_diffusion(config, workdir, resume_step, bool(invocation.overwrite))
    else:
        train_other(config, workdir, bool(invocation.resume))
    logger.info("done in %.1f s", time.perf_counter() - start)
    return workdir


def main(argv: list[str] | None = None) -> int:
    config, invocation = resolve_config(argv)
    if invocation.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from flaxdiff.logs import setup_logging

    setup_logging()
    debug = bool(invocation.debug) or os.environ.get("FLAXDIFF_DEBUG", "") not in ("", "0")
    try:
        run(config, invocation)
    except ValueError as err:
        if debug:
            raise
        message = " ".join(str(err).split())
        print(f"training.py: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        lost_peer_exit(err)
        raise
    return 0


def _exit_with_error(message: str, status: int = 2) -> None:
    """One error line and an immediate exit (for failures seen outside the main thread)."""
    sys.stderr.write(f"training.py: error: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)


def lost_peer_exit(err: BaseException) -> None:
    """In a multi-process run, a collective failing because a peer died ends this process at once with one line
    (exit status 3), instead of a traceback followed by the coordination service's abort at interpreter exit."""
    import jax

    if not isinstance(err, jax.errors.JaxRuntimeError) or jax.process_count() < 2:
        return
    detail = " ".join(str(err).split())[:300]
    _exit_with_error(f"process {jax.process_index()} lost contact with another process of the {jax.process_count()}"
                     f"-process run ({detail}); restart all processes with --resume to continue from the last "
                     f"checkpoint", status=3)


if __name__ == "__main__":
    sys.exit(main())
