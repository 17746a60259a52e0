"""Export and import any flaxdiff model's params as safetensors with its JSON config.

An export directory holds

    model.safetensors    every param leaf under its flax path joined by "/", e.g.
                         "encoder/down_blocks_0/resnets_0/conv1/kernel"; flax layouts (conv HWIO, dense (in, out));
                         header metadata {"format": "flaxdiff", "config": <model config JSON>}
    config.json          the model config, ``model.config.to_config()``: ``flaxdiff.models.from_config`` rebuilds it
    run_config.json      (exports of training checkpoints) the full checkpoint config: schedule, predictor, ...

Arrays are written byte for byte, so export then import is bitwise exact for every dtype safetensors stores.

    export_checkpoint("runs/dit/checkpoints", "dit-export")          # `flaxdiff export CHECKPOINT_DIR OUT_DIR`
    model, params, config = load_model("dit-export")
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from flaxdiff import models
from flaxdiff.models.configs import ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "RUN_CONFIG_FILE",
    "SEPARATOR",
    "WEIGHTS_FILE",
    "export_checkpoint",
    "export_params",
    "flatten_tree",
    "import_params",
    "load_checkpoint_params",
    "load_model",
    "read_safetensors",
    "unflatten_tree",
    "write_safetensors",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RUN_CONFIG_FILE = "run_config.json"
SEPARATOR = "/"
FORMAT = "flaxdiff"


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``; raises ValueError on a key containing "/" or a non-string key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or SEPARATOR in key or not key:
            raise ValueError(f"param tree key {key!r} at {prefix or '<root>'} must be a non-empty str without "
                             f"{SEPARATOR!r}")
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, f"{prefix}{key}{SEPARATOR}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_tree` (nested plain dicts)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(SEPARATOR)
        node = out
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"key {path!r} nests under a leaf at {name!r}")
        node[leaf] = value
    return out


def write_safetensors(path: str | Path, params: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write a param tree to one safetensors file, keys = flax paths joined by "/" (arrays copied to host)."""
    flat = {key: np.asarray(value, order="C") for key, value in flatten_tree(params).items()}
    save_file(flat, str(path), metadata=dict(metadata) if metadata else None)


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(nested numpy param tree, header metadata)`` of a file written by :func:`write_safetensors`."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        flat = {key: handle.get_tensor(key) for key in handle.keys()}
    return unflatten_tree(flat), metadata


def _config_dict(config: ModelConfig | Mapping[str, Any]) -> dict[str, Any]:
    values = config.to_config() if isinstance(config, ModelConfig) else dict(config)
    models.config_from_dict(values)
    return json.loads(json.dumps(values))


def export_params(params: Mapping[str, Any], config: ModelConfig | Mapping[str, Any], out_dir: str | Path,
                  run_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``run_config.json``) to ``out_dir``; returns it.

    ``config`` is the model's config object or its ``to_config()`` dict (validated by rebuilding it).
    """
    values = _config_dict(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / WEIGHTS_FILE, params, {"format": FORMAT, "config": json.dumps(values)})
    (out_dir / CONFIG_FILE).write_text(json.dumps(values, indent=2))
    if run_config is not None:
        (out_dir / RUN_CONFIG_FILE).write_text(json.dumps(dict(run_config), indent=2))
    logger.info("exported %d param arrays of model %r to %s", len(flatten_tree(params)), values["name"], out_dir)
    return out_dir


def import_params(in_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, model config dict)`` from an export directory (the config comes from ``config.json``, or
    from the safetensors header when that file is absent)."""
    in_dir = Path(in_dir)
    weights = in_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"no {WEIGHTS_FILE} in {in_dir}; expected a directory written by export_params")
    params, metadata = read_safetensors(weights)
    if (in_dir / CONFIG_FILE).is_file():
        values = json.loads((in_dir / CONFIG_FILE).read_text())
    elif metadata.get("format") == FORMAT and "config" in metadata:
        values = json.loads(metadata["config"])
    else:
        raise ValueError(f"no {CONFIG_FILE} in {in_dir} and {weights} has no flaxdiff config in its header")
    return params, values


def load_model(in_dir: str | Path) -> tuple[nn.Module, dict[str, Any], ModelConfig]:
    """``(module, params, config)`` from an export directory; apply with ``module.apply({"params": params}, ...)``."""
    params, values = import_params(in_dir)
    config = models.config_from_dict(values)
    return config.make(), params, config


def load_checkpoint_params(checkpoint_dir: str | Path, step: int | None = None, ema: bool = True
                           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(params, model config dict, stored run config)`` of a flaxdiff training checkpoint (latest step by
    default; the EMA params unless ``ema=False``)."""
    from flaxdiff import checkpoints

    _, ckpt_dir = checkpoints.find_checkpoints(checkpoint_dir)
    run_config = checkpoints.read_config(ckpt_dir, step)
    if checkpoints.is_run_config(run_config):
        model = run_config["model"]
        model_config = models.get_config(model["name"], **model["options"]).to_config()
    else:
        model_config = run_config.get("model")
        if not isinstance(model_config, Mapping):
            raise ValueError(f"checkpoint {checkpoint_dir} config has model={model_config!r}; expected the model's "
                             f"to_config() dict")
    params = checkpoints.load_params(ckpt_dir, step, ema=ema)
    return params, dict(model_config), run_config


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, step: int | None = None,
                      ema: bool = True) -> Path:
    """``flaxdiff export CHECKPOINT_DIR OUT_DIR``: the (EMA) params of a training checkpoint (latest step by
    default) as ``model.safetensors`` + ``config.json`` + ``run_config.json``; returns ``out_dir``."""
    params, model_config, run_config = load_checkpoint_params(checkpoint_dir, step, ema)
    return export_params(params, model_config, out_dir, run_config=run_config)
