"""Checkpoints: orbax ``CheckpointManager`` with three items per step.

    <dir>/<step>/state/    the TrainState (params, opt_state, ema_params, step, rng, counters): global arrays
    <dir>/<step>/data/     the data iterator position of every process (process_<i>-of-<n>.json)
    <dir>/<step>/config/   the full JSON config: {"model", "schedule", "predictor", "weighting", "time_sampler",
                           "train", "data"}

Saves are asynchronous (the arrays are copied off the devices, then written in a background thread); the data
position and config are written synchronously at the save call, so they match the state of that step. Keeps the
last ``max_to_keep`` steps plus, optionally, the one with the lowest ``val_loss``. A directory alone rebuilds the
model for sampling: :func:`load_components` and :func:`load_params`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from flaxdiff import losses, predictors, schedules
from flaxdiff.checkpoints import config_differences, flat_config
from flaxdiff.training.config import RUN_ONLY_KEYS, TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointManager",
    "check_config",
    "config_differences",
    "load_config",
    "load_components",
    "load_params",
    "build_model",
]

STATE, DATA, CONFIG = "state", "data", "config"


# --------------------------------------------------------------------------------------------------------------------
# The data-iterator position: one small file per process


class DataStateHandler(ocp.CheckpointHandler):
    """Writes this process's iterator state (bytes or a JSON-able object) to process_<i>-of-<n>.json."""

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        state = args.state
        text = state.decode() if isinstance(state, bytes) else json.dumps({"json": state})
        (directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json").write_text(text)

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            raise ValueError(f"no data-iterator state {path} (was the checkpoint written by "
                             f"{jax.process_count()} processes?)")
        text = path.read_text()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text.encode()
        if isinstance(value, dict) and set(value) == {"json"}:
            return value["json"]
        return text.encode()

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        return None

    def close(self) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------------------------------------------------
# Config comparison


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], directory: str | Path = "") -> None:
    """Raise ValueError naming every differing key (``flaxdiff.checkpoints.config_differences``, run-only
    training settings such as log intervals ignored), with both values."""
    from flaxdiff.config import RUN_ONLY

    diffs = config_differences(saved, current, ignore={f"train.{key}" for key in RUN_ONLY_KEYS} | set(RUN_ONLY))
    if diffs:
        flat_saved, flat_current = flat_config(saved), flat_config(current)
        missing = "<missing>"
        detail = "; ".join(f"{k}: checkpoint={flat_saved.get(k, missing)!r} vs now={flat_current.get(k, missing)!r}"
                           for k in diffs)
        raise ValueError(f"checkpoint {directory} config does not match this run in {len(diffs)} key(s): {detail}")


# --------------------------------------------------------------------------------------------------------------------
# The manager


class CheckpointManager:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for (state, data position, config) triples.

    max_to_keep: keep the latest N steps. keep_best: additionally keep the step with the lowest ``val_loss``
    metric. async_save: write arrays in a background thread (call ``wait()`` before reading them back).
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 3, keep_best: bool = False,
                 async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        policies = [checkpoint_managers.LatestN(n=max_to_keep)]
        if keep_best:
            policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: DataStateHandler(),
                           CONFIG: ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config: Mapping[str, Any], data_state: Any = None,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Start saving ``state`` at ``step`` (asynchronously); returns whether a save was started."""
        items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(dict(config))}
        if data_state is not None:
            items[DATA] = DataStateSave(data_state)
        saved = self._manager.save(step, args=ocp.args.Composite(**items),
                                   metrics=dict(metrics) if metrics else None, force=True)
        if saved:
            logger.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, with_data: bool = True) -> tuple[Any, Any]:
        """(state, data_state or None) at ``step``; ``abstract_state`` gives shapes, dtypes and shardings."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / DATA).exists()
        if with_data and has_data:
            items[DATA] = DataStateRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], (restored[DATA] if with_data and has_data else None)

    def config(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {self.directory}")
        return load_config(self.directory, step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# --------------------------------------------------------------------------------------------------------------------
# Rebuilding from a directory alone


def load_config(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON config saved with ``step`` (default: the latest); see :func:`flaxdiff.checkpoints.read_config`."""
    from flaxdiff import checkpoints

    return checkpoints.read_config(directory, step)


def build_model(model_config: Mapping[str, Any]) -> Any:
    """A Linen module from its JSON config via ``flaxdiff.models.from_config``."""
    from flaxdiff import models

    built = models.from_config(dict(model_config))
    return built.make() if hasattr(built, "make") else built


def load_components(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """Rebuild {"model", "schedule", "predictor", "weighting", "time_sampler", "train", "config"} from a directory."""
    config = load_config(directory, step)
    return {
        "model": build_model(config["model"]) if config.get("model") is not None else None,
        "schedule": schedules.from_config(config["schedule"]),
        "predictor": predictors.from_config(config["predictor"]),
        "weighting": losses.weightings.from_config(config["weighting"]),
        "time_sampler": losses.time_samplers.from_config(config["time_sampler"]),
        "train": TrainConfig.from_config(config["train"]),
        "config": config,
    }


def load_params(directory: str | Path, step: int | None = None, ema: bool = True) -> Any:
    """The (EMA by default) parameters of a checkpoint as host numpy arrays; see
    :func:`flaxdiff.checkpoints.load_params`."""
    from flaxdiff import checkpoints

    return checkpoints.load_params(directory, step, ema)
