"""Diffusion models (U-Net, DiT), the KL autoencoder and the text encoder, with a registry of configs.

Every diffusion model is called as ``model.apply({'params': p}, x, c_noise, cond, train=False,
rngs={'dropout': key})``; see :mod:`flaxdiff.models.unet` and :mod:`flaxdiff.models.dit`.

    model = models.get("DiT-S/2", num_classes=10)        # preset + overrides
    d = model.config.to_config()                          # JSON-serialisable, includes "name"
    same = models.from_config(d)                          # rebuilds the exact module

Registry names (``available()``):

- ``"unet"``, ``"dit"``, ``"autoencoder"`` (Stable Diffusion VAE layout, 83.65M params), ``"text_encoder"``:
  the config defaults;
- ``"DiT-{S,B,L,XL}/{2,4,8}"``: the paper's ImageNet-256 latent models (33M, 130M, 458M, 675M params);
- ``"unet-tiny"`` (177k params, no attention outside the middle block, for tests) and ``"unet-small"``
  (1.83M params, attention at 16x16 and 8x8, 0.82 GFLOPs per 32x32 image: MNIST on CPU), one input channel;
- ``"dit-tiny"`` (168k params, patch 4, depth 2, width 64, for tests), ``"autoencoder-tiny"`` (242k params,
  f4, one channel, for tests), ``"text_encoder-tiny"`` (35k params, width 32); the default ``"text_encoder"``
  has 3.2M params (width 256, depth 4, 64 tokens).

FLOPs from :func:`summary` count a multiply-add as 2 (XLA's convention); the DiT paper counts it as 1.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from flaxdiff.models import autoencoder, dit, layers, text, unet
from flaxdiff.models.autoencoder import (AutoencoderConfig, AutoencoderKL, estimate_latent_scale, kl_divergence,
                                         scale_latents, unscale_latents)
from flaxdiff.models.configs import ModelConfig
from flaxdiff.models.dit import DiT, DiTConfig
from flaxdiff.models.summary import count_params, summary
from flaxdiff.models.text import TextEncoder, TextEncoderConfig, detokenize, encode_text, text_condition, tokenize
from flaxdiff.models.unet import UNet, UNetConfig

_CONFIG_CLASSES: dict[str, type[ModelConfig]] = {
    cls.registry_name: cls for cls in (UNetConfig, DiTConfig, AutoencoderConfig, TextEncoderConfig)
}

_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "unet": UNetConfig,
    "dit": DiTConfig,
    "autoencoder": AutoencoderConfig,
    "text_encoder": TextEncoderConfig,
    "unet-tiny": lambda: UNetConfig(in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(), num_heads=2, norm_num_groups=8),
    "unet-small": lambda: UNetConfig(in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                                     attention_levels=(1, 2), num_heads=4, norm_num_groups=8),
    "dit-tiny": lambda: DiTConfig(input_size=16, in_channels=1, patch_size=4, hidden_size=64, depth=2, num_heads=4,
                                  frequency_dim=64),
    "autoencoder-tiny": lambda: AutoencoderConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                                                  layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                                  scaling_factor=1.0),
    "text_encoder-tiny": lambda: TextEncoderConfig(max_len=32, width=32, depth=2, num_heads=2),
}
for _size in dit.DIT_SIZES:
    for _patch in dit.DIT_PATCHES:
        _PRESETS[f"DiT-{_size}/{_patch}"] = (lambda name=f"DiT-{_size}/{_patch}": dit.dit_preset(name))


def available() -> list[str]:
    """All registry names: base models and presets."""
    return list(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of preset ``name`` with some fields replaced."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {available()}")
    return _PRESETS[name]().replace(**overrides)


def get(name: str, **overrides: Any) -> nn.Module:
    """Build the module of preset ``name`` with some config fields replaced, e.g. ``get("unet-small",
    num_classes=10)``."""
    return get_config(name, **overrides).make()


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Inverse of ``config.to_config()``."""
    name = values.get("name")
    if name not in _CONFIG_CLASSES:
        raise ValueError(f"config dict has name={name!r}; expected one of {sorted(_CONFIG_CLASSES)}")
    return _CONFIG_CLASSES[name].from_dict(values)


def from_config(values: dict[str, Any]) -> nn.Module:
    """Rebuild the exact module from ``config.to_config()`` (e.g. as saved next to a checkpoint)."""
    return config_from_dict(values).make()


__all__ = [
    "AutoencoderConfig", "AutoencoderKL", "DiT", "DiTConfig", "ModelConfig", "TextEncoder", "TextEncoderConfig",
    "UNet", "UNetConfig", "autoencoder", "available", "config_from_dict", "count_params", "detokenize", "dit",
    "encode_text", "estimate_latent_scale", "from_config", "get", "get_config", "kl_divergence", "layers",
    "scale_latents", "summary", "text", "text_condition", "tokenize", "unet", "unscale_latents",
]
