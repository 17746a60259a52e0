"""Train a diffusion / flow model with flaxdiff: one script for a 2-core laptop and a multi-host TPU pod.

    python training.py                                   # class-conditional MNIST at 32x32, ~10 min on 2 CPU cores
    python training.py --print-config > run.json         # the fully resolved config
    python training.py --config run.json --steps 5000    # a config file (JSON or YAML); flags override it
    python training.py --resume --workdir runs/mnist     # continue from the latest checkpoint

Settings resolve as: built-in defaults < ``--config FILE`` < command-line flags. ``--print-config`` prints the
resolved settings as JSON; feeding that file back through ``--config`` reproduces them exactly. Invocation flags
(``--config``, ``--print-config``, ``--resume``, ``--overwrite`` and the three distributed flags) are not settings.

The run directory ``--workdir`` receives ``checkpoints/`` (orbax; the flaxdiff ``sample``/``eval``/``export`` CLI and
``flaxdiff.pipeline.Pipeline`` read it), ``metrics.jsonl``, ``tensorboard/``, ``run_config.json`` and
``samples.png`` (one row per class, drawn with the EMA params at the end of training).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger("training")

# The default run: class-conditional MNIST at 32x32 with a small U-Net and rectified flow, sized so that two CPU
# cores produce recognisable digits within ten minutes (see docs/main_job.md for the measurements).
DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "mnist",
    "split": "train",
    "data_dir": None,
    "download": False,
    "image_size": 32,
    "channels": None,
    "random_flip": False,
    "worker_count": 0,
    "num_classes": None,
    "latent_autoencoder": None,
    "captions": None,
    "text_encoder": "text_encoder-tiny",
    # task: "diffusion", "autoencoder" (train the latent autoencoder) or "reflow" (from --reflow-from)
    "task": "diffusion",
    "autoencoder_model": "autoencoder-tiny",
    "kl_weight": 1e-3,
    "reflow_from": None,
    "reflow_pairs": 2048,
    "reflow_sampler": "euler",
    "reflow_steps": 20,
    "reflow_guidance": 0.0,
    # model
    "model": "unet-small",
    "model_config": {"patch_size": 2, "base_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 1,
                     "attention_levels": [1], "num_heads": 4, "norm_num_groups": 8},
    # diffusion
    "schedule": "rectified_flow",
    "schedule_options": {},
    "shift": None,
    "predictor": "velocity",
    "predictor_options": {},
    "weighting": "uniform",
    "weighting_options": {},
    "time_sampler": "logit_normal",
    "time_sampler_options": {},
    "cond_drop_prob": 0.1,
    # optimisation
    "optimizer": "adamw",
    "learning_rate": 2e-3,
    "warmup_steps": 100,
    "lr_decay": "cosine",
    "decay_steps": 0,
    "end_lr_fraction": 0.05,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.99,
    "grad_clip": 1.0,
    "batch_size": 32,
    "steps": 1250,
    "epochs": None,
    "grad_accum_steps": 1,
    "ema_decay": 0.999,
    "precision": "float32",
    "fsdp": 1,
    "seed": 0,
    # run
    "workdir": "runs/mnist",
    "checkpoint_every": 500,
    "keep_checkpoints": 2,
    "log_every": 25,
    "eval_every": 0,
    "eval_batches": 4,
    "sample_every": 0,
    "preview_sampler": "dpmpp_2m",
    "preview_steps": 20,
    "preview_guidance": 3.0,
    "preview_per_class": 10,
}

INVOCATION_FLAGS = ("config", "print_config", "resume", "overwrite", "coordinator_address", "num_processes",
                    "process_id")


def _json_value(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "auto") else int(text)


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to "not given" so that only explicit flags override the config file."""
    parser = argparse.ArgumentParser(
        prog="training.py", description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    run = parser.add_argument_group("invocation")
    run.add_argument("--config", metavar="FILE", help="JSON or YAML settings file (keys as printed by --print-config)")
    run.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    run.add_argument("--overwrite", action="store_true", help="delete existing checkpoints in --workdir first")
    run.add_argument("--coordinator-address", metavar="HOST:PORT", help="jax.distributed coordinator (multi-host)")
    run.add_argument("--num-processes", type=int, metavar="N", help="number of processes of a multi-host run")
    run.add_argument("--process-id", type=int, metavar="I", help="this process's index in [0, N)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="mnist | digits | tfds:NAME | path/to/folder | path/to/file.npz")
    data.add_argument("--split", help="split name (mnist/digits: train | validation | all)")
    data.add_argument("--data-dir", help="TFDS data directory")
    data.add_argument("--download", type=_bool, metavar="BOOL", help="TFDS download_and_prepare when missing")
    data.add_argument("--image-size", type=int, help="square training resolution (pixels)")
    data.add_argument("--channels", type=_optional_int, help="force 1 or 3 image channels (default: the source's)")
    data.add_argument("--random-flip", type=_bool, metavar="BOOL", help="random horizontal flips")
    data.add_argument("--worker-count", type=int, help="grain worker processes (0: in the main process)")
    data.add_argument("--num-classes", type=_optional_int,
                      help="class-conditional on labels 0..N-1 (0: unconditional; default: the source's classes)")
    data.add_argument("--latent-autoencoder", metavar="DIR",
                      help="train on scaled VAE latents of this autoencoder (diffusers/flaxdiff export/checkpoint dir)")
    data.add_argument("--captions", "--text", dest="captions",
                      help="caption conditioning: mnist (offline digit captions) | source (the dataset's captions)")
    data.add_argument("--text-encoder", help="frozen text encoder: a text_encoder preset or an export dir")

    task = parser.add_argument_group("task")
    task.add_argument("--task", help="diffusion | autoencoder (train the latent VAE) | reflow (see --reflow-from)")
    task.add_argument("--autoencoder-model", help="autoencoder preset of --task autoencoder")
    task.add_argument("--kl-weight", type=float, help="KL weight of --task autoencoder (per pixel)")
    task.add_argument("--reflow-from", metavar="CKPT", help="base rectified-flow run directory of --task reflow")
    task.add_argument("--reflow-pairs", type=int, help="number of (noise, sample) pairs to generate")
    task.add_argument("--reflow-sampler", help="sampler generating the pairs")
    task.add_argument("--reflow-steps", type=int, help="sampler steps generating the pairs")
    task.add_argument("--reflow-guidance", type=float, help="CFG scale of the pairs (0 or less: none)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="model preset (flaxdiff.models.available(): unet, unet-small, dit, DiT-S/2, ...)")
    model.add_argument("--model-config", type=_json_value, metavar="JSON",
                       help="model config overrides, e.g. '{\"base_channels\": 32}' (replaces the default overrides)")

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--schedule", help="noise schedule (flaxdiff.schedules.available())")
    diffusion.add_argument("--schedule-options", type=_json_value, metavar="JSON", help="schedule arguments")
    diffusion.add_argument("--shift", type=float, help="rectified-flow resolution shift s (t' = s t / (1 + (s-1) t))")
    diffusion.add_argument("--predictor", help="parameterisation (flaxdiff.predictors.available())")
    diffusion.add_argument("--predictor-options", type=_json_value, metavar="JSON", help="predictor arguments")
    diffusion.add_argument("--weighting", help="loss weighting (flaxdiff.losses.weightings)")
    diffusion.add_argument("--weighting-options", type=_json_value, metavar="JSON", help="weighting arguments")
    diffusion.add_argument("--time-sampler", help="noise-level sampling (flaxdiff.losses.time_samplers)")
    diffusion.add_argument("--time-sampler-options", type=_json_value, metavar="JSON", help="time sampler arguments")
    diffusion.add_argument("--cond-drop-prob", type=float, help="classifier-free guidance label dropout")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", help="adamw | adam | sgd")
    optim.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, help="peak learning rate")
    optim.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    optim.add_argument("--lr-decay", help="cosine | linear | constant")
    optim.add_argument("--decay-steps", type=int, help="decay length (0: the whole run)")
    optim.add_argument("--end-lr-fraction", type=float, help="final LR as a fraction of the peak")
    optim.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    optim.add_argument("--b1", type=float, help="Adam beta1 / SGD momentum")
    optim.add_argument("--b2", type=float, help="Adam beta2")
    optim.add_argument("--grad-clip", type=float, help="global-norm gradient clipping (0: off)")
    optim.add_argument("--batch-size", type=int, help="global batch size (all processes)")
    optim.add_argument("--steps", type=_optional_int, help="optimizer steps (conflicts with --epochs)")
    optim.add_argument("--epochs", type=float, help="passes over the data instead of --steps")
    optim.add_argument("--grad-accum-steps", type=int, help="micro-batches per optimizer step")
    optim.add_argument("--ema-decay", type=float, help="EMA decay of the sampling params (0: off)")
    optim.add_argument("--precision", help="float32 | bfloat16 compute (params stay float32)")
    optim.add_argument("--fsdp", type=int, help="size of the mesh's fsdp axis (data axis = devices / fsdp)")
    optim.add_argument("--seed", type=int, help="seed of params, noise and data order")

    out = parser.add_argument_group("run directory and previews")
    out.add_argument("--workdir", "--log-dir", dest="workdir", help="checkpoints/, metrics, TensorBoard, samples")
    out.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (the last step is always saved)")
    out.add_argument("--keep-checkpoints", type=int, help="how many recent checkpoints to keep")
    out.add_argument("--log-every", type=int, help="steps between metric logs / progress-bar updates")
    out.add_argument("--eval-every", type=int, help="steps between validation losses (0: off)")
    out.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    out.add_argument("--sample-every", type=int, help="steps between preview grids (0: only the final grid)")
    out.add_argument("--preview-sampler", help="sampler of preview grids (flaxdiff.samplers.available())")
    out.add_argument("--preview-steps", type=int, help="sampler steps of preview grids")
    out.add_argument("--preview-guidance", type=float, help="CFG scale of preview grids (0 or less: none)")
    out.add_argument("--preview-per-class", type=int, help="images per class row in preview grids (0: no grid)")
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path}: not valid JSON ({err.msg} at line {err.lineno}); "
                             f"use a .yaml/.yml suffix for YAML") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(values).__name__}")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; accepted: {sorted(DEFAULTS)}")
    return values


def resolve_config(argv: list[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
    """(settings, invocation flags): defaults < --config file < flags, validated."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(args)
    config = dict(DEFAULTS)
    if "config" in given:
        try:
            config.update(_read_config_file(given["config"]))
        except ValueError as err:
            parser.error(str(err))
    flags = {key: value for key, value in given.items() if key not in INVOCATION_FLAGS}
    if "steps" in flags and "epochs" in flags and flags["steps"] is not None and flags["epochs"] is not None:
        parser.error("--steps and --epochs conflict; give one of them")
    if flags.get("epochs") is not None:
        config["steps"] = None
    elif flags.get("steps") is not None:
        config["epochs"] = None
    config.update(flags)
    invocation = argparse.Namespace(**{key: given.get(key) for key in INVOCATION_FLAGS})
    try:
        validate_config(config)
    except ValueError as err:
        parser.error(str(err))
    if invocation.resume and invocation.overwrite:
        parser.error("--resume and --overwrite conflict; give one of them")
    return config, invocation


def validate_config(config: Mapping[str, Any]) -> None:
    """Registry names, conflicts and ranges; raises ValueError with one line naming the bad setting."""
    from flaxdiff import losses, models, predictors, samplers, schedules

    registries = [("model", models.available()), ("schedule", schedules.available()),
                  ("predictor", predictors.available()), ("weighting", losses.weightings.available()),
                  ("time_sampler", losses.time_samplers.available()),
                  ("preview_sampler", samplers.available()),
                  ("optimizer", ["adamw", "adam", "sgd"]), ("lr_decay", ["cosine", "linear", "constant"]),
                  ("precision", ["float32", "bfloat16"])]
    for key, names in registries:
        if config[key] not in names:
            raise ValueError(f"--{key.replace('_', '-')} {config[key]!r} is unknown; accepted: {', '.join(names)}")
    if config["model"] in ("autoencoder", "autoencoder-tiny", "text_encoder", "text_encoder-tiny"):
        raise ValueError(f"--model {config['model']!r} is not a diffusion model; use a unet or DiT preset")
    if (config["steps"] is None) == (config["epochs"] is None):
        raise ValueError(f"give exactly one of steps / epochs (got steps={config['steps']!r}, "
                         f"epochs={config['epochs']!r})")
    positive = ["image_size", "batch_size", "grad_accum_steps", "fsdp", "log_every", "keep_checkpoints"]
    for key in positive:
        if not (isinstance(config[key], int) and config[key] >= 1):
            raise ValueError(f"--{key.replace('_', '-')} {config[key]!r} must be a positive integer")
    for key in ("steps", "epochs"):
        if config[key] is not None and not config[key] > 0:
            raise ValueError(f"--{key} {config[key]!r} must be positive")
    if config["batch_size"] % config["grad_accum_steps"]:
        raise ValueError(f"--batch-size {config['batch_size']} is not divisible by --grad-accum-steps "
                         f"{config['grad_accum_steps']}")
    if config["shift"] is not None and config["schedule"] != "rectified_flow":
        raise ValueError(f"--shift applies to the rectified_flow schedule, not {config['schedule']!r}; "
                         f"use --schedule-options for other schedules")
    if config["channels"] not in (None, 1, 3):
        raise ValueError(f"--channels {config['channels']!r}: accepted 1, 3 or none (the source's)")
    if config["num_classes"] is not None and config["num_classes"] < 0:
        raise ValueError(f"--num-classes {config['num_classes']!r} must be >= 0")
    if config["task"] not in ("diffusion", "autoencoder", "reflow"):
        raise ValueError(f"--task {config['task']!r} is unknown; accepted: diffusion, autoencoder, reflow")
    if config["task"] == "reflow" and not config["reflow_from"]:
        raise ValueError("--task reflow needs --reflow-from CKPT (a trained rectified-flow run directory)")
    if config["captions"] not in (None, "mnist", "source"):
        raise ValueError(f"--captions {config['captions']!r}: accepted mnist, source or none")
    for key in ("model_config", "schedule_options", "predictor_options", "weighting_options",
                "time_sampler_options"):
        if not isinstance(config[key], dict):
            raise ValueError(f"{key} must be a JSON object, got {config[key]!r}")


# ------------------------------------------------------------------------------------------------------------------
# Building the pieces


def build_diffusion(config: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(schedule, predictor, weighting, time_sampler) from the settings."""
    from flaxdiff import losses, predictors, schedules

    schedule_options = dict(config["schedule_options"])
    if config["shift"] is not None:
        schedule_options["shift"] = config["shift"]
    return (schedules.get(config["schedule"], **schedule_options),
            predictors.get(config["predictor"], **config["predictor_options"]),
            losses.weightings.get(config["weighting"], **config["weighting_options"]),
            losses.time_samplers.get(config["time_sampler"], **config["time_sampler_options"]))


class LatentIterator:
    """Wraps a grain iterator: images -> scaled latents ``scale_latents(encode(x).mean)``; keeps get/set_state."""

    def __init__(self, iterator: Any, encode: Any) -> None:
        self.iterator = iterator
        self.encode = encode

    def __iter__(self) -> "LatentIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        import numpy as np

        batch = dict(next(self.iterator))
        batch["image"] = np.asarray(self.encode(batch["image"]))
        return batch

    def get_state(self) -> Any:
        return self.iterator.get_state()

    def set_state(self, state: Any) -> None:
        self.iterator.set_state(state)


def _checkpoint_dir(workdir: Path) -> Path:
    return workdir / "checkpoints"


def _has_checkpoints(workdir: Path) -> bool:
    directory = _checkpoint_dir(workdir)
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


def run(config: Mapping[str, Any], invocation: argparse.Namespace) -> Path:
    """Train with the resolved settings; returns the workdir."""
    from flaxdiff.training import parallel

    parallel.initialize_distributed(invocation.coordinator_address, invocation.num_processes,
                                    invocation.process_id)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxdiff import data, models
    from flaxdiff.training import DiffusionTrainer, make_sample_fn, save_image_grid

    start = time.perf_counter()
    workdir = Path(config["workdir"]).expanduser().absolute()
    is_main = jax.process_index() == 0
    if _has_checkpoints(workdir) and not invocation.resume:
        if not invocation.overwrite:
            raise ValueError(f"{_checkpoint_dir(workdir)} already holds checkpoints; pass --resume to continue "
                             f"or --overwrite to start again")
        if is_main:
            shutil.rmtree(_checkpoint_dir(workdir))
    processes = jax.process_count()
    if config["batch_size"] % processes:
        raise ValueError(f"--batch-size {config['batch_size']} is not divisible by the {processes} processes")
    local_batch = config["batch_size"] // processes

    source_options = {"split": config["split"]}
    if config["dataset"].startswith("tfds:"):
        source_options.update(data_dir=config["data_dir"], download=config["download"])
    source = data.load_source(config["dataset"], **source_options)
    num_classes = config["num_classes"]
    if num_classes is None:
        num_classes = int(getattr(source, "num_classes", 0) or 0)
    if config["task"] != "diffusion":
        return _run_other_task(config, source, workdir, local_batch)
    channels = config["channels"]
    decode = None
    ae_config = None
    text = None
    if config["captions"]:
        from flaxdiff.data import captions

        source = captions.with_captions(source, config["captions"], seed=config["seed"])
        text = captions.TextConditioner.create(config["text_encoder"], seed=config["seed"])
        num_classes = 0
    train_source = source
    if config["latent_autoencoder"]:
        from flaxdiff import latents

        codec = latents.load_codec(config["latent_autoencoder"])
        encode, decode, ae_config = codec.encode, codec.decode, codec.config
        channels = ae_config.in_channels
        suffix = f"_p{jax.process_index()}" if processes > 1 else ""
        cache = workdir / f"latents_{config['split']}_{config['image_size']}{suffix}.npz"
        if not cache.is_file() or latents.read_cache_info(cache)["autoencoder"] != codec.path:
            latents.cache_latents(codec, source, cache, config["image_size"], channels)
        train_source = latents.latent_source(cache)
    loader = data.make_loader(train_source, local_batch, config["image_size"] if ae_config is None else None,
                              seed=config["seed"], worker_count=config["worker_count"],
                              channels=channels if ae_config is None else None,
                              random_flip=config["random_flip"] and ae_config is None,
                              tokenizer=text.tokenizer() if text is not None else None)
    if text is not None:
        loader = captions.TextIterator(loader, text)
    first = next(loader)
    image_shape = tuple(first["image"].shape[1:])
    if num_classes > 0:
        labels = np.asarray(first["label"])
        if labels.max() >= num_classes:
            raise ValueError(f"--num-classes {num_classes} but the data has label {int(labels.max())}")

    steps_per_epoch = max(1, len(source) // config["batch_size"])
    total_steps = config["steps"] or max(1, int(math.ceil(config["epochs"] * steps_per_epoch)))

    model_overrides = dict(config["model_config"])
    model_overrides.setdefault("in_channels", image_shape[-1])
    model_overrides.setdefault("num_classes", num_classes)
    if text is not None:
        model_overrides.setdefault("text_dim", text.width)
        model_overrides.setdefault("pooled_dim", text.width)
    if config["model"].lower().startswith("dit"):
        model_overrides.setdefault("input_size", image_shape[0])
    try:
        model_cfg = models.get_config(config["model"], **model_overrides)
    except TypeError as err:
        raise ValueError(f"--model-config for {config['model']!r}: {err}") from None
    model = model_cfg.make()
    schedule, predictor, weighting, time_sampler = build_diffusion(config)
    null_cond = {"label": num_classes} if num_classes > 0 else None
    if text is not None:
        null_cond = dict(captions.NULL_TEXT_COND)
    train_config = build_train_config(config, total_steps, null_cond)
    example = {"image": first["image"]}
    if text is not None:
        example.update({key: first[key] for key in ("text", "text_mask", "pooled")})
    elif null_cond:
        example["label"] = first["label"]
    data_config = {
        "dataset": config["dataset"], "image_size": config["image_size"], "num_classes": num_classes,
        "image_channels": channels if channels is not None else image_shape[-1],
        "latent_autoencoder": (str(Path(config["latent_autoencoder"]).expanduser().absolute())
                               if config["latent_autoencoder"] else None),
        "text_encoder": str(workdir / "text_encoder") if text is not None else None,
        "captions": config["captions"],
    }
    if text is not None and is_main:
        text.save(workdir / "text_encoder")

    per_class = config["preview_per_class"]
    preview_labels = (np.repeat(np.arange(num_classes), per_class).astype(np.int32)
                      if num_classes > 0 else np.zeros((max(per_class, 1) ** 2,), np.int32))
    trainer = DiffusionTrainer(model, model_cfg.to_config(), schedule, predictor, weighting, time_sampler,
                               train_config, example, workdir=workdir, data_config=data_config)
    sample_fn = None
    if per_class > 0:
        guidance = config["preview_guidance"] if null_cond and config["preview_guidance"] > 0 else None
        cond = {"label": jnp.asarray(preview_labels)} if null_cond else None
        if text is not None:
            prompts = captions.preview_prompts(source, per_class)
            preview_labels = np.zeros(len(prompts), np.int32)
            cond = text.encode(prompts)
        raw_fn = make_sample_fn(trainer, num_images=len(preview_labels), sampler=config["preview_sampler"],
                                steps=config["preview_steps"], guidance_scale=guidance, cond=cond)
        sample_fn = raw_fn if decode is None else (lambda params, key: decode(raw_fn(params, key)))
        trainer.sample_fn = sample_fn

    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "run_config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        logger.info("model %s: %s params; %d steps of global batch %d (%.1f epochs of %d examples); workdir %s",
                    config["model"], f"{param_count(model, example):,}", total_steps, config["batch_size"],
                    total_steps / steps_per_epoch, len(source), workdir)

    def batches() -> Any:
        yield first
        yield from loader

    class _Resumable:
        """The first (already drawn) batch followed by the loader, with the loader's state methods."""

        def __init__(self) -> None:
            self._it = batches()

        def __next__(self) -> Any:
            return next(self._it)

        def get_state(self) -> Any:
            return loader.get_state()

        def set_state(self, state: Any) -> None:
            loader.set_state(state)
            self._it = iter(loader)

    val_data = None
    if config["eval_every"] > 0:
        val_source = data.load_source(config["dataset"], **{**source_options, "split": "validation"})

        def val_data() -> Any:
            captioned = captions.with_captions(val_source, config["captions"], config["seed"]) if text else val_source
            it = data.make_loader(captioned, local_batch, config["image_size"], seed=config["seed"], shuffle=False,
                                  num_epochs=1, channels=channels,
                                  tokenizer=text.tokenizer() if text is not None else None)
            it = LatentIterator(it, encode) if ae_config is not None else it
            return captions.TextIterator(it, text) if text is not None else it

    stream = _Resumable()
    if invocation.resume and not trainer.restore(stream):
        logger.info("--resume: no checkpoint in %s yet, starting from step 0", _checkpoint_dir(workdir))
    trainer.fit(stream, val_data=val_data, resume=False)
    trainer.close()
    if sample_fn is not None:
        images = np.asarray(jax.device_get(sample_fn(trainer.state.ema_params, jax.random.PRNGKey(config["seed"]))))
        if is_main:
            columns = per_class if num_classes > 0 or text is not None else max(per_class, 1)
            path = save_image_grid(images, workdir / "samples.png", columns=columns)
            logger.info("wrote %s", path)
    logger.info("done in %.1f s", time.perf_counter() - start)
    return workdir


def _run_other_task(config: Mapping[str, Any], source: Any, workdir: Path, local_batch: int) -> Path:
    """--task autoencoder (flaxdiff.latents.train_autoencoder into workdir/autoencoder) or --task reflow
    (flaxdiff.reflow.run_reflow from --reflow-from into workdir)."""
    if config["task"] == "autoencoder":
        from flaxdiff import latents

        steps = config["steps"] or max(1, int(math.ceil(config["epochs"] * len(source) / config["batch_size"])))
        out = latents.train_autoencoder(
            source, workdir / "autoencoder", model=config["autoencoder_model"], image_size=config["image_size"],
            channels=config["channels"], batch_size=local_batch, steps=steps, learning_rate=config["learning_rate"],
            kl_weight=config["kl_weight"], seed=config["seed"], log_every=config["log_every"])
        logger.info("autoencoder written to %s (use --latent-autoencoder %s)", out, out)
        return workdir
    from flaxdiff import reflow

    steps = config["steps"] or max(1, int(math.ceil(config["epochs"] * config["reflow_pairs"] / config["batch_size"])))
    guidance = config["reflow_guidance"] if config["reflow_guidance"] > 0 else None
    reflow.run_reflow(config["reflow_from"], workdir, num_pairs=config["reflow_pairs"],
                      pair_sampler=config["reflow_sampler"], pair_steps=config["reflow_steps"],
                      guidance_scale=guidance, train_config=build_train_config(config, steps, None),
                      batch_size=local_batch, seed=config["seed"])
    return workdir


def build_train_config(config: Mapping[str, Any], total_steps: int, null_cond: Mapping[str, Any] | None) -> Any:
    """The TrainConfig of the settings (condition dropout only when there is a null condition)."""
    from flaxdiff.training import TrainConfig

    return TrainConfig(
        learning_rate=config["learning_rate"], warmup_steps=config["warmup_steps"], lr_decay=config["lr_decay"],
        decay_steps=config["decay_steps"], end_lr_fraction=config["end_lr_fraction"], optimizer=config["optimizer"],
        b1=config["b1"], b2=config["b2"], weight_decay=config["weight_decay"], grad_clip=config["grad_clip"],
        grad_accum_steps=config["grad_accum_steps"], ema_decay=config["ema_decay"],
        compute_dtype=config["precision"], cond_drop_prob=config["cond_drop_prob"] if null_cond else 0.0,
        null_cond=null_cond, fsdp=config["fsdp"], seed=config["seed"], total_steps=total_steps,
        log_every=config["log_every"], checkpoint_every=config["checkpoint_every"],
        keep_checkpoints=config["keep_checkpoints"], eval_every=config["eval_every"],
        eval_batches=config["eval_batches"], sample_every=config["sample_every"])


def param_count(model: Any, example: Mapping[str, Any]) -> int:
    """Number of parameters of ``model`` for inputs shaped like ``example`` (shapes only, nothing is run)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1,) + tuple(example["image"].shape[1:]))
    cond = {key: jnp.zeros((1,) + tuple(value.shape[1:]), value.dtype)
            for key, value in example.items() if key != "image"} or None
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), cond, train=False))
    return int(sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])))


def main(argv: list[str] | None = None) -> int:
    config, invocation = resolve_config(argv)
    if invocation.print_config:
        print(json.dumps(config, indent=2, sort_keys=True))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run(config, invocation)
    except ValueError as err:
        print(f"training.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
