"""Read a training run: step discovery, its config, params (EMA or raw), its latent codec and text conditioner.

The one inference-side reader of checkpoints: ``Pipeline``, ``flaxdiff sample|eval|export``, reflow and
``training.py --resume`` use it; it imports no trainer code. A run directory looks like::

    <run>/config.json                 the resolved RunConfig (paths relative to <run>)
    <run>/text_encoder/               the frozen text encoder of a caption-conditioned run
    <run>/checkpoints/<step>/state/   orbax TrainState (params, ema_params, opt_state, step, ...)
    <run>/checkpoints/<step>/config/  the same RunConfig as JSON (``metadata``)
    <run>/checkpoints/<step>/data/    the data-iterator position of every process

Paths in a saved config are relative to the run directory and resolved against it here, so a run moved or copied
elsewhere (with what it depends on) loads and resumes. Checkpoints written by ``flaxdiff.training.Trainer``
without a RunConfig (the library API) hold the trainer's own description (model, schedule, predictor, train,
data shapes); :func:`load_run` reads both.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.config import RUN_ONLY, SECTIONS, ConfigError, RunConfig, SampleConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "TEXT_ENCODER_DIR",
    "find_checkpoints",
    "list_steps",
    "step_problem",
    "latest_intact_step",
    "read_config",
    "read_run_config",
    "is_run_config",
    "config_differences",
    "flat_config",
    "load_params",
    "load_run",
    "build_schedule_predictor",
    "null_condition",
]

TEXT_ENCODER_DIR = "text_encoder"
# Model options training.py fills in from the data when the config leaves them out.
RESOLVED_MODEL_OPTIONS = ("in_channels", "num_classes", "text_dim", "pooled_dim", "input_size")
STATE, DATA, CONFIG = "state", "data", "config"


# ---------------------------------------------------------------------------------------------------------------------
# Steps


def find_checkpoints(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run directory or of its ``checkpoints/`` directory."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory {path} does not exist")
    for candidate in (path, path / "checkpoints"):
        if list_steps(candidate):
            run_dir = candidate.parent if candidate.name == "checkpoints" else candidate
            return run_dir, candidate
    raise ConfigError(f"{path} holds no checkpoint steps (expected numbered step directories in it or in "
                      f"{path / 'checkpoints'})")


def list_steps(ckpt_dir: str | Path) -> list[int]:
    """Numbered step directories, ascending (orbax's unfinished temporary directories are not numbers)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def step_problem(ckpt_dir: str | Path, step: int, deep: bool = False) -> str | None:
    """Why ``step`` cannot be restored (a missing or unreadable file), or None when it is intact.

    The shallow check looks for orbax's commit markers and metadata and parses the config; ``deep`` also reads
    every array of the state back.
    """
    step_dir = Path(ckpt_dir) / str(step)
    for required in ("_CHECKPOINT_METADATA", f"{STATE}/_METADATA", f"{STATE}/manifest.ocdbt", f"{CONFIG}/metadata"):
        if not (step_dir / required).is_file():
            return f"{required} is missing"
    for parsed in ("_CHECKPOINT_METADATA", f"{STATE}/_METADATA", f"{CONFIG}/metadata"):
        try:
            json.loads((step_dir / parsed).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{parsed} is unreadable ({type(err).__name__})"
    if deep:
        try:
            _restore_state(step_dir)
        except Exception as err:  # noqa: BLE001 - any storage failure means the step cannot be restored
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"its arrays cannot be read ({first[:200]})"
    return None


def latest_intact_step(ckpt_dir: str | Path, deep: bool = True) -> tuple[int, list[tuple[int, str]]]:
    """(the newest step that can be restored, [(damaged newer step, why), ...]); ConfigError when none can."""
    damaged: list[tuple[int, str]] = []
    for step in reversed(list_steps(ckpt_dir)):
        problem = step_problem(ckpt_dir, step, deep=deep)
        if problem is None:
            return step, damaged
        damaged.append((step, problem))
    detail = "; ".join(f"step {s}: {why}" for s, why in damaged) or "no steps"
    raise ConfigError(f"{ckpt_dir} has no intact checkpoint ({detail})")


def _resolve_step(ckpt_dir: Path, step: int | None) -> int:
    steps = list_steps(ckpt_dir)
    if not steps:
        raise ConfigError(f"no checkpoint steps in {ckpt_dir}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"step {step} is not in {ckpt_dir}; available: {steps}")
    return step


# ---------------------------------------------------------------------------------------------------------------------
# Config


def read_config(ckpt_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON config saved with ``step`` (default: the latest), as stored."""
    ckpt_dir = Path(ckpt_dir)
    step = _resolve_step(ckpt_dir, step)
    path = ckpt_dir / str(step) / CONFIG / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"step {step} of {ckpt_dir} is damaged: its config {path} cannot be read "
                          f"({type(err).__name__})") from None


def is_run_config(raw: Mapping[str, Any]) -> bool:
    """Whether a stored config is a RunConfig (as training.py writes) rather than a bare trainer description."""
    return isinstance(raw, Mapping) and set(raw) == set(SECTIONS)


def read_run_config(ckpt_dir: str | Path, step: int | None = None, run_dir: str | Path | None = None) -> RunConfig:
    """The RunConfig of a step with its paths resolved against the run directory."""
    ckpt_dir = Path(ckpt_dir)
    raw = read_config(ckpt_dir, step)
    if not is_run_config(raw):
        raise ConfigError(f"{ckpt_dir} was not written by training.py (its config has no run sections "
                          f"{', '.join(SECTIONS)}); it cannot be resumed by training.py")
    run_dir = Path(run_dir) if run_dir is not None else ckpt_dir.parent
    return RunConfig.from_dict(raw, f"{ckpt_dir}: ").resolved_paths(run_dir)


def config_differences(saved: RunConfig | Mapping[str, Any], current: RunConfig | Mapping[str, Any],
                       ignore: Collection[str] = RUN_ONLY) -> list[str]:
    """Dotted names of the settings that differ, sorted, except those in ``ignore`` (by default the run-only ones,
    ``flaxdiff.config.RUN_ONLY``: they may change on resume).

    Mappings (a trainer's stored config) are compared leaf by leaf (``flat_config``). Two RunConfigs are compared
    as runs, setting by setting (``section.field``, in section order): what training resolves from the data
    matches an unresolved setting, and ``train.steps`` / ``train.epochs`` count when the LR schedule depends on
    the run length."""
    depth = None
    if isinstance(saved, RunConfig):
        saved, current, ignore, depth = _as_runs(saved, current, ignore)
    flat_saved, flat_current = flat_config(saved, depth), flat_config(current, depth)
    missing = object()
    keys = sorted((set(flat_saved) | set(flat_current)) - set(ignore))
    diffs = [key for key in keys if flat_saved.get(key, missing) != flat_current.get(key, missing)]
    if depth is not None:
        order = list(SECTIONS)
        diffs.sort(key=lambda key: order.index(key.split(".", 1)[0]))
    return diffs


def _as_runs(saved: RunConfig, current: RunConfig,
             ignore: Collection[str]) -> tuple[dict[str, Any], dict[str, Any], set[str], int]:
    """(saved values, current values, ignored names, depth 2) of two RunConfigs, with what training resolves from
    the data copied from the saved run where the current config leaves it unresolved: data.num_classes / channels /
    latent_autoencoder / captions null (an encoded dataset brings its own autoencoder and text encoder), and the
    model options it fills in when absent."""
    saved_values, current_values = saved.to_dict(), current.to_dict()
    data = current_values["data"]
    if data["captions"] is None and saved_values["data"]["captions"] is not None:
        # the text conditioning came from the dataset (embeddings precomputed by `flaxdiff data encode`)
        data["text_encoder"] = saved_values["data"]["text_encoder"]
    for name in ("num_classes", "channels", "latent_autoencoder", "captions"):
        if data[name] is None:
            data[name] = saved_values["data"][name]
    options = current_values["model"]["options"]
    for name in RESOLVED_MODEL_OPTIONS:
        if name in saved_values["model"]["options"] and name not in options:
            options[name] = saved_values["model"]["options"][name]
    ignore = set(ignore)
    if saved.train.lr_decay != "constant" and saved.train.decay_steps == 0:
        ignore -= {"train.steps", "train.epochs"}
    return saved_values, current_values, ignore, 2


def flat_config(tree: Any, depth: int | None = None) -> dict[str, Any]:
    """``{"a.b.c": value}`` of a nested JSON-like config, down to ``depth`` levels (None: every leaf; an empty
    mapping below the top is a leaf); tuples read as lists."""

    def flat(node: Any, levels: int | None, prefix: str) -> dict[str, Any]:
        if isinstance(node, Mapping) and (node or not prefix) and (levels is None or levels > 0):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(flat(value, None if levels is None else levels - 1, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    return flat(json.loads(json.dumps(tree)), depth, "")


# ---------------------------------------------------------------------------------------------------------------------
# Params


def _restore_state(step_dir: Path) -> Any:
    """The whole TrainState of a step as single-device arrays. orbax's internal warnings while reading (e.g.
    "Metadata file does not exist") go to the debug level of this module's logger."""
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    previous = absl_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        absl_logger.setLevel(logging.ERROR)
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(step_dir / STATE)
        tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        return checkpointer.restore(step_dir / STATE, abstract)
    finally:
        checkpointer.close()
        absl_logger.setLevel(previous)


def load_params(ckpt_dir: str | Path, step: int | None = None, ema: bool = True) -> Any:
    """The EMA (default) or raw params of a step as host numpy arrays, without knowing the model."""
    ckpt_dir = Path(ckpt_dir)
    step = _resolve_step(ckpt_dir, step)
    problem = step_problem(ckpt_dir, step)
    if problem is not None:
        raise ConfigError(f"step {step} of {ckpt_dir} is damaged: {problem}")
    try:
        restored = _restore_state(ckpt_dir / str(step))
    except (OSError, ValueError) as err:
        raise ConfigError(f"step {step} of {ckpt_dir} is damaged: its arrays cannot be read "
                          f"({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__})"
                          ) from None
    return jax.tree.map(np.asarray, restored["ema_params" if ema else "params"])


# ---------------------------------------------------------------------------------------------------------------------
# Components of a run config


def build_schedule_predictor(config: RunConfig) -> tuple[Any, Any]:
    """(schedule, predictor) of the diffusion section (the shift joins the schedule's options)."""
    from flaxdiff import predictors, schedules

    diffusion = config.diffusion
    options = dict(diffusion.schedule_options)
    if diffusion.shift is not None:
        options["shift"] = diffusion.shift
    return (schedules.get(diffusion.schedule, **options),
            predictors.get(diffusion.predictor, **diffusion.predictor_options))


def null_condition(config: RunConfig, text: Any = None) -> dict[str, Any] | None:
    """The guidance null condition: label ``num_classes`` (class-conditional), the all-masked empty text
    (caption-conditioned), or None (unconditional)."""
    if config.data.captions or text is not None:
        return {"text": 0.0, "text_mask": False, "pooled": 0.0}
    classes = config.data.num_classes or 0
    return {"label": int(classes)} if classes > 0 else None


def _latent_decoder(path: str) -> tuple[Callable[[jax.Array], jax.Array], Any]:
    """(latents -> images through the frozen autoencoder at ``path``, its config)."""
    from flaxdiff import interop, models

    module, params, ae_config = interop.load_autoencoder(path)
    params = jax.tree.map(jnp.asarray, params)

    @jax.jit
    def decode(latents: jax.Array) -> jax.Array:
        images = module.apply({"params": params}, models.unscale_latents(ae_config, latents),
                              method=models.AutoencoderKL.decode)
        return jnp.clip(images, -1.0, 1.0)

    return decode, ae_config


@dataclasses.dataclass
class Run:
    """Everything needed to sample a run, read from its directory."""

    run_dir: Path
    ckpt_dir: Path
    step: int
    raw_config: dict
    config: RunConfig | None
    model: Any
    params: Any
    schedule: Any
    predictor: Any
    sample_shape: tuple
    num_classes: int
    null_cond: dict | None
    decode: Callable | None
    text: Any
    sample: SampleConfig


def load_run(path: str | Path, step: int | None = None, ema: bool | None = None) -> Run:
    """Load a run directory (or its ``checkpoints/``): the latest step unless ``step``; EMA params unless
    ``ema=False`` (default: the run's ``sample.ema``)."""
    from flaxdiff import models

    run_dir, ckpt_dir = find_checkpoints(path)
    step = _resolve_step(ckpt_dir, step)
    raw = read_config(ckpt_dir, step)
    if is_run_config(raw):
        config = read_run_config(ckpt_dir, step, run_dir)
        if config.model.pretrained is not None:
            raise ConfigError(f"{run_dir} fine-tunes the diffusers pipeline {config.model.pretrained}; sample it with "
                              f"`flaxdiff sample {run_dir}` or export it with `flaxdiff export {run_dir} OUT` "
                              f"(flaxdiff.interop.diffusers_finetune.load_finetuned)")
        sample = config.sample
        use_ema = sample.ema if ema is None else ema
        try:
            model = models.get_config(config.model.name, **config.model.options).make()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{ckpt_dir}: model.options do not build {config.model.name!r}: {err}") from None
        schedule, predictor = build_schedule_predictor(config)
        text = None
        if config.data.captions:
            from flaxdiff.data.captions import TextConditioner

            text = TextConditioner.create(str(run_dir / TEXT_ENCODER_DIR))
        decode = None
        image = config.data.image_size
        sample_shape: tuple = (image, image, config.model.options.get("in_channels", config.data.channels or 1))
        if config.data.latent_autoencoder:
            decode, ae_config = _latent_decoder(config.data.latent_autoencoder)
            factor = ae_config.downsample_factor
            sample_shape = (image // factor, image // factor, ae_config.latent_channels)
        num_classes = 0 if text is not None else int(config.data.num_classes or 0)
        null_cond = null_condition(config, text)
    else:
        config, sample = None, SampleConfig()
        use_ema = True if ema is None else ema
        model, schedule, predictor, sample_shape, num_classes, null_cond, decode, text = _legacy_components(
            ckpt_dir, raw)
    params = jax.tree.map(jnp.asarray, load_params(ckpt_dir, step, ema=use_ema))
    logger.info("loaded step %d of %s (%s params)", step, run_dir, "EMA" if use_ema else "raw")
    return Run(run_dir, ckpt_dir, step, raw, config, model, params, schedule, predictor, tuple(sample_shape),
               num_classes, null_cond, decode, text, sample)


def _legacy_components(ckpt_dir: Path, raw: Mapping[str, Any]) -> tuple:
    """Components of a checkpoint written by the Trainer alone: model / schedule / predictor configs, the train
    section's null condition, data shapes."""
    from flaxdiff import models, predictors, schedules

    if raw.get("model") is None:
        raise ConfigError(f"checkpoint {ckpt_dir} has no model config; it cannot be sampled")
    built = models.from_config(dict(raw["model"]))
    model = built.make() if hasattr(built, "make") else built
    data = raw.get("data", {})
    image_key = data.get("image_key", "image")
    shapes = data.get("shapes", {})
    if image_key not in shapes:
        raise ConfigError(f"checkpoint {ckpt_dir} config has no shape for {image_key!r}; keys: {sorted(shapes)}")
    num_classes = int(data.get("num_classes", raw["model"].get("num_classes", 0)) or 0)
    null_cond = raw.get("train", {}).get("null_cond")
    decode = _latent_decoder(data["latent_autoencoder"])[0] if data.get("latent_autoencoder") else None
    text = None
    if data.get("text_encoder"):
        from flaxdiff.data.captions import TextConditioner

        text = TextConditioner.create(data["text_encoder"])
    return (model, schedules.from_config(raw["schedule"]), predictors.from_config(raw["predictor"]),
            shapes[image_key]["shape"], num_classes, dict(null_cond) if null_cond else None, decode, text)
