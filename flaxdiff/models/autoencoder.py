"""KL-regularised convolutional VAE for latent diffusion, laid out like diffusers' ``AutoencoderKL``.

Encoder: ``conv_in``; ``down_blocks_i`` of ``layers_per_block`` ResNet blocks (``resnets_j``: norm1, conv1,
norm2, conv2, conv_shortcut) and a stride-2 ``downsamplers_0/conv`` (input padded (0, 1) on each spatial
axis) on all but the last block; ``mid_block`` = resnets_0, attentions_0 (single-head attention over the
H*W tokens: group_norm, to_q, to_k, to_v, to_out_0), resnets_1; ``conv_norm_out`` (GroupNorm), SiLU,
``conv_out`` to ``2 * latent_channels``; then ``quant_conv`` (1x1). The decoder mirrors it after
``post_quant_conv`` (1x1) with ``up_blocks_i`` of ``layers_per_block + 1`` ResNet blocks and a
nearest-x2 + conv ``upsamplers_0/conv`` on all but the last block. The downsampling factor is
``2^(len(block_out_channels) - 1)``.

Parameter paths are the diffusers state-dict keys with ``.N`` -> ``_N`` and ``.`` -> ``/`` (see
:func:`flax_path_from_diffusers`); kernels still need the usual layout transposes (conv OIHW -> HWIO,
linear (out, in) -> (in, out)).

Posterior ``q(z | x) = N(mean, exp(logvar))``; training loss ``||x - D(z)||^2 + beta KL(q || N(0, I))`` with
``KL = 0.5 sum(mean^2 + exp(logvar) - 1 - logvar)``. Diffusion runs on ``(z - shift_factor) * scaling_factor``
where ``scaling_factor = 1 / std(z)`` is estimated from data by :func:`estimate_latent_scale`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxdiff.models import layers
from flaxdiff.models.configs import ModelConfig

Array = jax.Array
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(ModelConfig):
    """AutoencoderKL hyper-parameters; field names follow diffusers' config.json."""

    registry_name = "autoencoder"

    in_channels: int = 3                                   # image channels
    out_channels: int = 3                                  # reconstructed channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per block; factor 2^(len-1)
    layers_per_block: int = 2                              # ResNet blocks per encoder block (+1 in decoder)
    latent_channels: int = 4                               # channels of z
    norm_num_groups: int = 32                              # GroupNorm groups
    scaling_factor: float = 0.18215                        # multiply latents by this before diffusion
    shift_factor: float | None = None                      # subtract this from latents first (None: 0)
    dtype: str = "float32"                                 # compute dtype; params are always float32

    def make(self) -> "AutoencoderKL":
        return AutoencoderKL(self)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def _group_norm(groups: int, dtype: Any, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(groups, epsilon=_EPS, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """``x' = shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        layers.check_groups(x.shape[-1], self.groups, "ResnetBlock2D input")
        layers.check_groups(self.out_channels, self.groups, "ResnetBlock2D output")
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class AttentionBlock2D(nn.Module):
    """Single-head self-attention over the H*W tokens with a residual: ``x + to_out_0(attn(GN(x)))``."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = x.shape
        h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(batch, height * width, 1, channels)
        dense = lambda name: nn.Dense(channels, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        h = layers.dot_product_attention(q, k, v).reshape(batch, height, width, channels)
        return x + dense("to_out_0")(h)


class MidBlock(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1 at constant width."""

    channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = ResnetBlock2D(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        x = AttentionBlock2D(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample2D(nn.Module):
    """Stride-2 3x3 ``conv`` after padding (0, 1) on each spatial axis (diffusers' encoder convention)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                       name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 ``conv``."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)


class DownEncoderBlock2D(nn.Module):
    """``resnets_0..n-1`` then (optionally) ``downsamplers_0``."""

    channels: int
    num_layers: int
    groups: int
    downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.downsample:
            x = Downsample2D(self.channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``resnets_0..n-1`` then (optionally) ``upsamplers_0``."""

    channels: int
    num_layers: int
    groups: int
    upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels) before quant_conv."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dtype = self.config, layers.resolve_dtype(self.config.dtype)
        channels = cfg.block_out_channels
        h = nn.Conv(channels[0], (3, 3), padding=1, dtype=dtype, name="conv_in")(x.astype(dtype))
        for i, width in enumerate(channels):
            h = DownEncoderBlock2D(width, cfg.layers_per_block, cfg.norm_num_groups, i != len(channels) - 1, dtype,
                                   name=f"down_blocks_{i}")(h)
        h = MidBlock(channels[-1], cfg.norm_num_groups, dtype, name="mid_block")(h)
        h = nn.silu(_group_norm(cfg.norm_num_groups, dtype, "conv_norm_out")(h))
        return nn.Conv(2 * cfg.latent_channels, (3, 3), padding=1, dtype=dtype, name="conv_out")(h)


class Decoder(nn.Module):
    """Latent (B, h, w, latent_channels) after post_quant_conv -> image (B, h*f, w*f, out_channels)."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg, dtype = self.config, layers.resolve_dtype(self.config.dtype)
        channels = tuple(reversed(cfg.block_out_channels))
        h = nn.Conv(channels[0], (3, 3), padding=1, dtype=dtype, name="conv_in")(z.astype(dtype))
        h = MidBlock(channels[0], cfg.norm_num_groups, dtype, name="mid_block")(h)
        for i, width in enumerate(channels):
            h = UpDecoderBlock2D(width, cfg.layers_per_block + 1, cfg.norm_num_groups, i != len(channels) - 1, dtype,
                                 name=f"up_blocks_{i}")(h)
        h = nn.silu(_group_norm(cfg.norm_num_groups, dtype, "conv_norm_out")(h))
        return nn.Conv(cfg.out_channels, (3, 3), padding=1, dtype=dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
    """KL VAE. ``encode(x) -> (mean, logvar)``, ``decode(z) -> x``, ``__call__(x) -> (recon, mean, logvar)``.

    ``__call__(x, sample_posterior=True)`` draws ``z = mean + exp(logvar / 2) * eps`` from the rng stream
    ``"sample"`` (pass ``rngs={'sample': key}``); ``sample_posterior=False`` decodes the mean.
    """

    config: AutoencoderConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = layers.resolve_dtype(cfg.dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=dtype)
        self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=dtype)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Posterior parameters (mean, logvar), each (B, H/f, W/f, latent_channels); logvar in [-30, 20]."""
        cfg = self.config
        layers.check_input(x, jnp.zeros(x.shape[:1]), cfg.in_channels, cfg.downsample_factor,
                           f"the autoencoder downsamples by {cfg.downsample_factor}")
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Image from a raw (unscaled) latent z (B, h, w, latent_channels)."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"z has shape {tuple(z.shape)}; expected (B, h, w, {self.config.latent_channels})")
        return self.decoder(self.post_quant_conv(z.astype(layers.resolve_dtype(self.config.dtype)))).astype(
            jnp.float32)

    def __call__(self, x: Array, sample_posterior: bool = True) -> tuple[Array, Array, Array]:
        mean, logvar = self.encode(x)
        z = mean
        if sample_posterior:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.make_rng("sample"), mean.shape)
        return self.decode(z), mean, logvar

    def estimate_latent_scale(self, params: Any, images: Array, key: jax.Array | None = None) -> float:
        """``1 / std`` of the latents of ``images``; see :func:`estimate_latent_scale`."""
        return estimate_latent_scale(self, params, images, key)


def kl_divergence(mean: Array, logvar: Array) -> Array:
    """Per-example ``KL(N(mean, exp(logvar)) || N(0, I)) = 0.5 sum(mean^2 + exp(logvar) - 1 - logvar)``."""
    terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
    return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def estimate_latent_scale(model: AutoencoderKL, params: Any, images: Array, key: jax.Array | None = None) -> float:
    """Latent scale factor ``1 / std(z)`` over every element of the latents of ``images``.

    ``z`` is the posterior mean, or a posterior sample when ``key`` is given (Stable Diffusion's recipe).
    Set it as ``scaling_factor`` so that the scaled latents have unit variance.
    """
    mean, logvar = _encode(model, params, images)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    std = float(jnp.std(z))
    if not std > 0.0:
        raise ValueError(f"latent std is {std}; cannot estimate a scale from constant latents")
    return 1.0 / std


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: AutoencoderKL, params: Any, images: Array) -> tuple[Array, Array]:
    return model.apply({"params": params}, images, method=AutoencoderKL.encode)


def scale_latents(config: AutoencoderConfig, z: Array) -> Array:
    """Diffusion-space latents ``(z - shift_factor) * scaling_factor``."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(config: AutoencoderConfig, latents: Array) -> Array:
    """Inverse of :func:`scale_latents`: ``latents / scaling_factor + shift_factor``."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def flax_path_from_diffusers(key: str) -> tuple[tuple[str, ...], str]:
    """Map a diffusers AutoencoderKL state-dict key to (flax module path, flax param name).

    ``"encoder.down_blocks.0.resnets.1.conv1.weight"`` -> ``(("encoder", "down_blocks_0", "resnets_1",
    "conv1"), "kernel")``; GroupNorm ``weight`` becomes ``scale``, conv/linear ``weight`` becomes ``kernel``.
    """
    parts = re.sub(r"\.(\d+)", r"_\1", key).split(".")
    *path, leaf = parts
    if leaf not in ("weight", "bias"):
        raise ValueError(f"diffusers key {key!r} must end in .weight or .bias")
    is_norm = bool(path) and ("norm" in path[-1])
    name = "bias" if leaf == "bias" else ("scale" if is_norm else "kernel")
    return tuple(path), name
