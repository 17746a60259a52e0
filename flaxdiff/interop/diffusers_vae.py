"""Load diffusers ``AutoencoderKL`` weights (Stable Diffusion, SDXL, SD3/Flux VAEs) into flaxdiff's autoencoder.

A diffusers VAE is a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors``; nothing is
downloaded here (fetch it yourself, e.g. ``huggingface_hub.snapshot_download("stabilityai/sd-vae-ft-mse")``).

    model, params, config = load_diffusers_autoencoder("sd-vae-ft-mse/")
    mean, logvar = model.apply({"params": params}, images, method=model.encode)     # images in [-1, 1], NHWC
    latents = scale_latents(config, mean)             # (z - shift_factor) * scaling_factor

Key map (explicit, both directions; see :func:`diffusers_key` and :func:`diffusers_key_map`): the flax path
``encoder/down_blocks_0/resnets_1/conv1/kernel`` is the torch key ``encoder.down_blocks.0.resnets.1.conv1.weight``
(every ``name_N`` module is ``name.N``; ``kernel`` and GroupNorm ``scale`` are ``weight``). Layouts:

    conv kernel    torch (O, I, kh, kw)  ->  flax (kh, kw, I, O)      transpose (2, 3, 1, 0)
    dense kernel   torch (O, I)          ->  flax (I, O)              transpose; (O, I, 1, 1) is squeezed first
    bias, scale    (C,)                  ->  (C,)

Older checkpoints name the mid-block attention ``query``/``key``/``value``/``proj_attn``; they are read as
``to_q``/``to_k``/``to_v``/``to_out.0``. VAEs without ``quant_conv`` / ``post_quant_conv`` (SD3, Flux:
``use_quant_conv=false``) get identity 1x1 convolutions, which compute exactly ``x * 1 + 0``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from flaxdiff.interop import safetensors_io, torch_weights
from flaxdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "autoencoder_config_from_diffusers",
    "diffusers_config_from_autoencoder",
    "diffusers_key",
    "diffusers_key_map",
    "from_diffusers_state_dict",
    "load_autoencoder",
    "load_diffusers_autoencoder",
    "save_diffusers_autoencoder",
    "to_diffusers_state_dict",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# diffusers' AutoencoderKL.__init__ defaults, used for fields an older config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# Fields that do not change the computation of encode/decode.
_INFORMATIONAL = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast"}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_QUANT_CONVS = {"quant_conv": "use_quant_conv", "post_quant_conv": "use_post_quant_conv"}


# --------------------------------------------------------------------------------------------------------------------
# Config


def autoencoder_config_from_diffusers(values: Mapping[str, Any], dtype: str = "float32") -> AutoencoderConfig:
    """flaxdiff :class:`AutoencoderConfig` from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Raises ValueError for settings flaxdiff's autoencoder does not implement (other block types or
    activations, no mid-block attention); unknown fields and ``latents_mean``/``latents_std`` are logged.
    """
    class_name = values.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"diffusers config has _class_name={class_name!r}; only 'AutoencoderKL' is supported")
    unknown = sorted(set(values) - set(_DIFFUSERS_DEFAULTS) - _INFORMATIONAL)
    if unknown:
        logger.warning("diffusers AutoencoderKL config: ignoring unknown fields %s", unknown)
    cfg = {**_DIFFUSERS_DEFAULTS, **values}
    levels = len(cfg["block_out_channels"])
    for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg[field]) != [block] * levels:
            raise ValueError(f"diffusers config has {field}={cfg[field]}; flaxdiff supports only "
                             f"{[block] * levels} (one per block_out_channels entry)")
    if cfg["act_fn"] != "silu":
        raise ValueError(f"diffusers config has act_fn={cfg['act_fn']!r}; flaxdiff's autoencoder supports 'silu'")
    if not cfg["mid_block_add_attention"]:
        raise ValueError("diffusers config has mid_block_add_attention=false; flaxdiff's autoencoder always has "
                         "mid-block attention (accepted: true)")
    if cfg["latents_mean"] is not None or cfg["latents_std"] is not None:
        logger.warning("diffusers AutoencoderKL config has per-channel latents_mean/latents_std; flaxdiff's "
                       "scale_latents applies only shift_factor and scaling_factor, normalise with them yourself")
    if dtype != "float32" and cfg["force_upcast"]:
        logger.warning("this VAE sets force_upcast=true (it may overflow in half precision) but dtype=%r", dtype)
    return AutoencoderConfig(
        in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
        block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
        layers_per_block=int(cfg["layers_per_block"]), latent_channels=int(cfg["latent_channels"]),
        norm_num_groups=int(cfg["norm_num_groups"]), scaling_factor=float(cfg["scaling_factor"]),
        shift_factor=None if cfg["shift_factor"] is None else float(cfg["shift_factor"]), dtype=dtype)


def diffusers_config_from_autoencoder(config: AutoencoderConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` ``config.json`` dict describing ``config`` (inverse of
    :func:`autoencoder_config_from_diffusers` on the fields flaxdiff has)."""
    levels = len(config.block_out_channels)
    return {
        **_DIFFUSERS_DEFAULTS, "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
        "latent_channels": config.latent_channels, "norm_num_groups": config.norm_num_groups,
        "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor,
    }


# --------------------------------------------------------------------------------------------------------------------
# Key and layout map


def diffusers_key(flax_path: tuple[str, ...]) -> str:
    """Torch state-dict key of a flax param path: ``("decoder", "up_blocks_1", "upsamplers_0", "conv",
    "kernel")`` -> ``"decoder.up_blocks.1.upsamplers.0.conv.weight"``."""
    *modules, leaf = flax_path
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"flax param {'/'.join(flax_path)} ends in {leaf!r}; expected one of {sorted(_LEAF_TO_TORCH)}")
    return ".".join([re.sub(r"_(\d+)$", r".\1", name) for name in modules] + [_LEAF_TO_TORCH[leaf]])


def _expected_params(config: AutoencoderConfig) -> dict[str, Any]:
    """Shapes and dtypes of every parameter of ``AutoencoderKL(config)`` (no computation)."""
    factor = config.downsample_factor
    image = jnp.zeros((1, factor, factor, config.in_channels), jnp.float32)
    return jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), image, sample_posterior=False))[
        "params"]


def diffusers_key_map(config: AutoencoderConfig) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """``{torch key: (flax path, layout, flax shape)}`` for every parameter; layout is "conv", "dense" or
    "vector" (transposes: the module docstring, :mod:`flaxdiff.interop.torch_weights`)."""
    return torch_weights.key_map_from_shapes(_expected_params(config), diffusers_key)


def _rename_deprecated(key: str) -> str:
    match = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    if match is None:
        return key
    return f"{match.group(1)}.{_DEPRECATED_ATTENTION[match.group(2)]}.{match.group(3)}"


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... and {len(keys) - limit} more' if len(keys) > limit else ''}]"


def from_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], config: AutoencoderConfig,
                              use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                              source: str = "state dict") -> dict[str, Any]:
    """flaxdiff params (float32 nested dict) from a diffusers ``AutoencoderKL`` torch state dict.

    Raises ValueError naming every missing key, every unexpected key and every shape mismatch.
    Without ``quant_conv`` / ``post_quant_conv`` those 1x1 convs become identities (kernel ``I``, bias 0).
    """
    key_map = diffusers_key_map(config)
    flags = {"quant_conv": use_quant_conv, "post_quant_conv": use_post_quant_conv}
    identity = {key for key, (path, _, _) in key_map.items() if not flags.get(path[0], True)}
    renamed = {_rename_deprecated(key): value for key, value in state_dict.items()}
    missing = sorted(set(key_map) - identity - set(renamed))
    unexpected = sorted(set(renamed) - (set(key_map) - identity))
    if missing or unexpected:
        raise ValueError(f"diffusers AutoencoderKL weights in {source} do not match config "
                         f"block_out_channels={list(config.block_out_channels)}, layers_per_block="
                         f"{config.layers_per_block}, latent_channels={config.latent_channels}: "
                         f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}")
    flat: dict[str, np.ndarray] = {}
    mismatched = []
    for key, (path, layout, shape) in key_map.items():
        if key in identity:
            channels = shape[-1]
            value = np.eye(channels, dtype=np.float32).reshape(shape) if layout == "conv" else np.zeros(shape,
                                                                                                      np.float32)
        else:
            value = torch_weights.to_flax_layout(np.asarray(renamed[key]), layout).astype(np.float32)
        if value.shape != shape:
            mismatched.append(f"{key} {tuple(np.shape(renamed[key]))} (expected torch shape "
                              f"{torch_weights.torch_shape(shape, layout)})")
        flat[safetensors_io.SEPARATOR.join(path)] = np.ascontiguousarray(value)
    if mismatched:
        raise ValueError(f"diffusers AutoencoderKL weights in {source} have wrong shapes: {_listing(mismatched)}")
    return safetensors_io.unflatten_tree(flat)


def to_diffusers_state_dict(params: Mapping[str, Any], config: AutoencoderConfig) -> dict[str, np.ndarray]:
    """The diffusers ``AutoencoderKL`` state dict (torch layouts, float32 numpy) of flaxdiff autoencoder params."""
    flat = safetensors_io.flatten_tree(params)
    key_map = diffusers_key_map(config)
    expected = {safetensors_io.SEPARATOR.join(path) for path, _, _ in key_map.values()}
    if set(flat) != expected:
        raise ValueError(f"params do not match the autoencoder config: missing {_listing(sorted(expected - set(flat)))}"
                         f"; unexpected {_listing(sorted(set(flat) - expected))}")
    return {key: np.ascontiguousarray(torch_weights.to_torch_layout(
                np.asarray(flat[safetensors_io.SEPARATOR.join(path)]), layout))
            for key, (path, layout, _) in key_map.items()}


# --------------------------------------------------------------------------------------------------------------------
# Files


def load_diffusers_autoencoder(path: str | Path, weights_path: str | Path | None = None,
                               dtype: str = "float32") -> tuple[AutoencoderKL, dict[str, Any], AutoencoderConfig]:
    """``(module, params, config)`` from a diffusers ``AutoencoderKL`` directory (``config.json`` +
    ``diffusion_pytorch_model.safetensors``), or from ``path`` = the config.json file and ``weights_path`` =
    the safetensors file. ``dtype`` is the compute dtype; params are float32 whatever the file holds."""
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path
    if weights_path is None:
        weights_path = config_path.parent / WEIGHTS_FILE
    weights_path = Path(weights_path)
    if not config_path.is_file():
        raise ValueError(f"no diffusers config at {config_path}; expected a directory with {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE}, or the path of the config.json file")
    if not weights_path.is_file():
        found = sorted(p.name for p in weights_path.parent.glob("*.safetensors")) if weights_path.parent.is_dir() \
            else []
        raise ValueError(f"no weights file {weights_path}; safetensors files there: {found} (pass weights_path= "
                         f"for another name; .bin checkpoints must be converted to safetensors first)")
    values = json.loads(config_path.read_text())
    config = autoencoder_config_from_diffusers(values, dtype=dtype)
    params = from_diffusers_state_dict(load_file(str(weights_path)), config,
                                       use_quant_conv=bool(values.get("use_quant_conv", True)),
                                       use_post_quant_conv=bool(values.get("use_post_quant_conv", True)),
                                       source=str(weights_path))
    logger.info("loaded diffusers AutoencoderKL from %s (block_out_channels=%s, latent_channels=%d)",
                weights_path, list(config.block_out_channels), config.latent_channels)
    return AutoencoderKL(config), params, config


def save_diffusers_autoencoder(out_dir: str | Path, params: Mapping[str, Any], config: AutoencoderConfig) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers'
    ``AutoencoderKL.from_pretrained(out_dir)`` loads; returns ``out_dir``."""
    return torch_weights.save_model_dir(out_dir, WEIGHTS_FILE, to_diffusers_state_dict(params, config), CONFIG_FILE,
                                        diffusers_config_from_autoencoder(config))


def _check_params(params: Mapping[str, Any], config: AutoencoderConfig, source: str) -> None:
    expected = {k: v.shape for k, v in safetensors_io.flatten_tree(_expected_params(config)).items()}
    found = {k: np.shape(v) for k, v in safetensors_io.flatten_tree(params).items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(f"{k} {found[k]} (expected {expected[k]})" for k in set(found) & set(expected)
                   if found[k] != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"autoencoder params in {source} do not match their config: missing {_listing(missing)}; "
                         f"unexpected {_listing(unexpected)}; wrong shapes {_listing(wrong)}")


def load_autoencoder(path_or_dir: str | Path, dtype: str | None = None
                     ) -> tuple[AutoencoderKL, dict[str, Any], AutoencoderConfig]:
    """``(module, params, config)`` of an autoencoder from any of:

    - a diffusers ``AutoencoderKL`` directory (``config.json`` with ``_class_name`` or
      ``diffusion_pytorch_model.safetensors``);
    - a flaxdiff export directory (``config.json`` + ``model.safetensors``, see :mod:`safetensors_io`);
    - a flaxdiff training checkpoint directory (orbax step subdirectories; EMA params of the latest step).

    ``dtype`` overrides the compute dtype ("float32", "bfloat16", "float16"); params stay float32.
    """
    path = Path(path_or_dir)
    if not path.is_dir():
        raise ValueError(f"autoencoder path {path} is not a directory; expected a diffusers AutoencoderKL dir, "
                         f"a flaxdiff export dir or a flaxdiff checkpoint dir")
    config_json = path / CONFIG_FILE
    values = json.loads(config_json.read_text()) if config_json.is_file() else None
    if (path / WEIGHTS_FILE).is_file() or (values is not None and "_class_name" in values):
        return load_diffusers_autoencoder(path, dtype=dtype or "float32")
    if (path / safetensors_io.WEIGHTS_FILE).is_file():
        params, model_config = safetensors_io.import_params(path)
        source = str(path / safetensors_io.WEIGHTS_FILE)
    elif any(child.is_dir() and child.name.isdigit() for child in path.iterdir()):
        params, model_config, _ = safetensors_io.load_checkpoint_params(path)
        source = f"checkpoint {path}"
    else:
        raise ValueError(f"{path} holds neither {WEIGHTS_FILE} (diffusers), {safetensors_io.WEIGHTS_FILE} "
                         f"(flaxdiff export) nor numbered checkpoint steps")
    if model_config.get("name") != AutoencoderConfig.registry_name:
        raise ValueError(f"{source} holds a model with name={model_config.get('name')!r}; expected "
                         f"{AutoencoderConfig.registry_name!r}")
    config = AutoencoderConfig.from_dict(model_config)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    _check_params(params, config, source)
    return AutoencoderKL(config), params, config
