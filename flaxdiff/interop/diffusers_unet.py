"""diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x, SDXL) in Flax Linen, with explicit key maps.

A diffusers U-Net is a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors``; nothing is
downloaded here (fetch it yourself, e.g. ``huggingface_hub.snapshot_download(repo, allow_patterns=["unet/*"])``).

    module, params, config = load_diffusers_unet("sd15/unet")
    eps = module.apply({"params": params}, latents_nhwc, timesteps, {"text": hidden_states})

The network computes exactly what diffusers computes, in NHWC (torch is NCHW):

    emb   = MLP(sinusoid(timestep)) [+ MLP([pooled text, sinusoid(time_ids)])  for SDXL "text_time"]
    h     = conv_in(x);  down blocks (ResNet [+ Transformer2D]) x L, downsample;  mid ResNet-Transformer-ResNet;
            up blocks with skip concatenation, upsample;  conv_out(silu(GroupNorm(h)))
    Transformer2D:  x + proj_out(blocks(proj_in(GroupNorm(x))))
    block:          x += SelfAttn(LN(x));  x += CrossAttn(LN(x), text);  x += GEGLU-FF(LN(x))

``timestep`` is diffusers' discrete timestep k in [0, T): the noise level alpha_bar[k] of the training table.
flaxdiff's ``DiscreteVPSchedule`` places alpha_bar[k] at t = (k + 1) / T, where the time predictors give
c_noise = 1000 t, so :func:`c_noise_apply_fn` feeds k = c_noise T / 1000 - 1 (the toolkit's call convention
``apply_fn(params, x, c_noise, cond)``, usable by ``flaxdiff.samplers.sample_model`` and the losses).

Key map (explicit, both directions; :func:`unet_key_map`): a flax path is the torch key with list indices
written ``name_N`` (only for the list containers in ``LIST_MODULES``), ``kernel`` and norm ``scale`` written
``weight``, embedding tables ``embedding`` written ``weight``. Layouts: conv (O, I, kh, kw) <-> (kh, kw, I, O),
dense (O, I) <-> (I, O), vectors and embedding tables unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from flaxdiff.interop import torch_weights

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = [
    "CONFIG_FILE",
    "LIST_MODULES",
    "WEIGHTS_FILE",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
    "c_noise_apply_fn",
    "diffusers_config_from_unet",
    "flax_path_to_torch_key",
    "from_torch_state_dict",
    "load_diffusers_unet",
    "save_diffusers_unet",
    "timestep_embedding",
    "to_torch_state_dict",
    "unet_config_from_diffusers",
    "unet_key_map",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# torch ModuleLists / Sequentials whose children are indexed: flax "down_blocks_0" is torch "down_blocks.0".
LIST_MODULES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                          "transformer_blocks", "to_out", "net"})
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers' UNet2DConditionModel.__init__ defaults for the fields that change the computation.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
    "sample_size": None,
}
# Fields whose only supported value is the diffusers default (everything SD 1.x / 2.x / SDXL use).
_FIXED = ("center_input_sample", "only_cross_attention", "downsample_padding", "mid_block_scale_factor", "act_fn",
          "encoder_hid_dim", "encoder_hid_dim_type", "dual_cross_attention", "class_embed_type", "num_class_embeds",
          "resnet_time_scale_shift", "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_type",
          "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
          "conv_in_kernel", "conv_out_kernel", "attention_type", "class_embeddings_concat", "cross_attention_norm",
          "mid_block_type")
_INFORMATIONAL = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout", "upcast_attention",
                  "addition_embed_type_num_heads", "mid_block_only_cross_attention"}


# --------------------------------------------------------------------------------------------------------------------
# Config


def _per_level(value: Any, levels: int, field: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"diffusers config has {field}={list(value)}; expected one int per level ({levels})")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"diffusers config has nested {field}={list(value)}; only one int per level is "
                             f"supported")
        return tuple(int(v) for v in value)
    return (int(value),) * levels


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The computation-relevant part of a diffusers ``UNet2DConditionModel`` config (one entry per level)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
    up_transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int | None = None
    dtype: str = "float32"

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def unet_config_from_diffusers(values: Mapping[str, Any], dtype: str = "float32") -> UNet2DConditionConfig:
    """:class:`UNet2DConditionConfig` from a diffusers ``UNet2DConditionModel`` ``config.json`` dict.

    Raises ValueError naming the first setting this port does not implement (and its accepted value).
    """
    class_name = values.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise ValueError(f"diffusers config has _class_name={class_name!r}; expected 'UNet2DConditionModel'")
    unknown = sorted(set(values) - set(_DEFAULTS) - _INFORMATIONAL)
    if unknown:
        logger.warning("diffusers UNet2DConditionModel config: ignoring unknown fields %s", unknown)
    cfg = {**_DEFAULTS, **values}
    for field in _FIXED:
        if cfg[field] != _DEFAULTS[field] and not (field == "mid_block_scale_factor" and float(cfg[field]) == 1.0):
            raise ValueError(f"diffusers config has {field}={cfg[field]!r}; flaxdiff supports only "
                             f"{_DEFAULTS[field]!r}")
    levels = len(cfg["block_out_channels"])
    down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"diffusers config has {levels} block_out_channels but {len(down)} down_block_types and "
                         f"{len(up)} up_block_types")
    for name in down:
        if name not in _DOWN_TYPES:
            raise ValueError(f"diffusers config has down block {name!r}; supported: {', '.join(_DOWN_TYPES)}")
    for name in up:
        if name not in _UP_TYPES:
            raise ValueError(f"diffusers config has up block {name!r}; supported: {', '.join(_UP_TYPES)}")
    if cfg["addition_embed_type"] not in (None, "text_time"):
        raise ValueError(f"diffusers config has addition_embed_type={cfg['addition_embed_type']!r}; supported: "
                         f"None, 'text_time'")
    if isinstance(cfg["cross_attention_dim"], (list, tuple)):
        raise ValueError(f"diffusers config has per-level cross_attention_dim={cfg['cross_attention_dim']}; only "
                         f"one int is supported")
    heads = cfg["num_attention_heads"] if cfg["num_attention_heads"] is not None else cfg["attention_head_dim"]
    layers = _per_level(cfg["transformer_layers_per_block"], levels, "transformer_layers_per_block")
    if cfg["reverse_transformer_layers_per_block"] is not None:
        up_layers = _per_level(cfg["reverse_transformer_layers_per_block"], levels,
                               "reverse_transformer_layers_per_block")
    else:
        up_layers = tuple(reversed(layers))
    if cfg["addition_embed_type"] == "text_time" and (cfg["addition_time_embed_dim"] is None or
                                                      cfg["projection_class_embeddings_input_dim"] is None):
        raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                         "projection_class_embeddings_input_dim")
    sample_size = cfg["sample_size"]
    return UNet2DConditionConfig(
        in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
        block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]), down_block_types=down,
        up_block_types=up, layers_per_block=_per_level(cfg["layers_per_block"], levels, "layers_per_block"),
        num_heads=_per_level(heads, levels, "attention heads"), transformer_layers=layers,
        up_transformer_layers=up_layers, cross_attention_dim=int(cfg["cross_attention_dim"]),
        norm_num_groups=int(cfg["norm_num_groups"]), norm_eps=float(cfg["norm_eps"]),
        use_linear_projection=bool(cfg["use_linear_projection"]), flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
        freq_shift=float(cfg["freq_shift"]), addition_embed_type=cfg["addition_embed_type"],
        addition_time_embed_dim=cfg["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"],
        sample_size=None if sample_size is None or isinstance(sample_size, (list, tuple)) else int(sample_size),
        dtype=dtype)


def diffusers_config_from_unet(config: UNet2DConditionConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` dict of ``config`` (inverse of :func:`unet_config_from_diffusers`)."""
    return {
        **_DEFAULTS, "_class_name": "UNet2DConditionModel",
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": list(config.block_out_channels), "down_block_types": list(config.down_block_types),
        "up_block_types": list(config.up_block_types), "layers_per_block": list(config.layers_per_block),
        "attention_head_dim": list(config.num_heads), "transformer_layers_per_block": list(config.transformer_layers),
        "reverse_transformer_layers_per_block": list(config.up_transformer_layers),
        "cross_attention_dim": config.cross_attention_dim, "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps, "use_linear_projection": config.use_linear_projection,
        "flip_sin_to_cos": config.flip_sin_to_cos, "freq_shift": config.freq_shift,
        "addition_embed_type": config.addition_embed_type, "addition_time_embed_dim": config.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": config.projection_class_embeddings_input_dim,
        "sample_size": config.sample_size,
    }


# --------------------------------------------------------------------------------------------------------------------
# Layers (shared with the DiT port)


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding, half = dim / 2, f_j = exp(-log(max_period) j / (half - freq_shift)):

        [sin(t f), cos(t f)]   (or [cos, sin] with flip_sin_to_cos),   shape (B, dim), float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMLP(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_2(silu(linear_1(x)))."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class Attention(nn.Module):
    """Multi-head attention softmax(q k^T / sqrt(d)) v with diffusers' to_q / to_k / to_v / to_out.0 names."""

    heads: int
    head_dim: int
    qkv_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)

        def split(a: Array) -> Array:
            return a.reshape(a.shape[:2] + (self.heads, self.head_dim))

        out = jax.nn.dot_product_attention(split(q), split(k), split(v))
        out = out.reshape(out.shape[:2] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


def _layer_norm(eps: float, affine: bool, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False, dtype=dtype,
                        name=name)


def _group_norm(groups: int, eps: float, dtype: Any, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, name=name)


# --------------------------------------------------------------------------------------------------------------------
# U-Net blocks


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D``: conv2(silu(GN(conv1(silu(GN(x))) + W silu(temb)))) + shortcut(x)."""

    features: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = _conv(self.features, 3, self.dtype, "conv1")(h)
        h = h + nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = _conv(self.features, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Linear(nn.Module):
    """A module holding one dense layer named ``proj`` (diffusers' ``GEGLU`` / ``GELU`` activation modules)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Dense(self.features, dtype=self.dtype, name="proj")(x)


class GEGLUFeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="geglu")``: net.2(a * gelu(g)), [a, g] = net.0.proj(x)."""

    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        hidden, gate = jnp.split(Linear(2 * self.mult * dim, self.dtype, name="net_0")(x), 2, axis=-1)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(hidden * nn.gelu(gate, approximate=False))


class CrossAttentionBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (layer_norm): self-attention, cross-attention, GEGLU feed-forward."""

    heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        x = x + Attention(self.heads, self.head_dim, dtype=self.dtype, name="attn1")(
            _layer_norm(1e-5, True, self.dtype, "norm1")(x))
        x = x + Attention(self.heads, self.head_dim, dtype=self.dtype, name="attn2")(
            _layer_norm(1e-5, True, self.dtype, "norm2")(x), context)
        return x + GEGLUFeedForward(dtype=self.dtype, name="ff")(_layer_norm(1e-5, True, self.dtype, "norm3")(x))


class SpatialTransformer(nn.Module):
    """diffusers ``Transformer2DModel`` on feature maps: x + proj_out(blocks(proj_in(GN(x)))) (1x1 conv or linear
    projections)."""

    heads: int
    layers: int
    groups: int
    use_linear_projection: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        batch, height, width, channels = x.shape
        h = _group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = _conv(channels, 1, self.dtype, "proj_in")(h).reshape(batch, height * width, channels)
        for index in range(self.layers):
            h = CrossAttentionBlock(self.heads, channels // self.heads, dtype=self.dtype,
                                    name=f"transformer_blocks_{index}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = _conv(channels, 1, self.dtype, "proj_out")(h.reshape(batch, height, width, channels))
        return x + h


class _Resample(nn.Module):
    """Downsample2D (3x3 conv, stride 2, pad 1) or Upsample2D (nearest 2x, then 3x3 conv), as module ``conv``."""

    features: int
    up: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return _conv(self.features, 3, self.dtype, "conv")(x)
        return _conv(self.features, 3, self.dtype, "conv", stride=2)(x)


class _Block(nn.Module):
    """One down or up level: (ResNet [+ Transformer2D]) x layers, then the resampler; ``skips`` is consumed by up
    blocks (concatenated on channels before each ResNet)."""

    features: int
    layers: int
    attention: bool
    heads: int
    transformer_layers: int
    resample: str | None
    config: UNet2DConditionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array, skips: list[Array] | None) -> tuple[Array, list[Array]]:
        outputs = []
        for index in range(self.layers):
            if skips is not None:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = ResnetBlock(self.features, self.config.norm_num_groups, self.config.norm_eps, dtype=self.dtype,
                            name=f"resnets_{index}")(h, temb)
            if self.attention:
                h = SpatialTransformer(self.heads, self.transformer_layers, self.config.norm_num_groups,
                                       self.config.use_linear_projection, dtype=self.dtype,
                                       name=f"attentions_{index}")(h, context)
            outputs.append(h)
        if self.resample == "down":
            h = _Resample(self.features, False, dtype=self.dtype, name="downsamplers_0")(h)
            outputs.append(h)
        elif self.resample == "up":
            h = _Resample(self.features, True, dtype=self.dtype, name="upsamplers_0")(h)
        return h, outputs


class _MidBlock(nn.Module):
    config: UNet2DConditionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> Array:
        cfg = self.config
        features = cfg.block_out_channels[-1]
        h = ResnetBlock(features, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="resnets_0")(h, temb)
        h = SpatialTransformer(cfg.num_heads[-1], cfg.transformer_layers[-1], cfg.norm_num_groups,
                               cfg.use_linear_projection, dtype=self.dtype, name="attentions_0")(h, context)
        return ResnetBlock(features, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="resnets_1")(h, temb)


class UNet2DConditionModel(nn.Module):
    """diffusers ``UNet2DConditionModel`` (NHWC): ``__call__(x, timesteps, cond, train=False) -> F``.

    ``timesteps``: diffusers' timestep k per example (B,) or a scalar; ``cond``: {"text": encoder hidden states
    (B, L, cross_attention_dim)} plus, for SDXL ("text_time"), "pooled" (B, P) and "time_ids" (B, 6) =
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
    """

    config: UNet2DConditionConfig

    @nn.compact
    def __call__(self, x: Array, timesteps: Array, cond: Mapping[str, Array], train: bool = False) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        batch = x.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        context = jnp.asarray(cond["text"], dtype)
        temb = TimestepMLP(cfg.time_embed_dim, dtype=dtype, name="time_embedding")(
            timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype))
        if cfg.addition_embed_type == "text_time":
            if "pooled" not in cond or "time_ids" not in cond:
                raise ValueError(f"an SDXL ('text_time') U-Net needs cond['pooled'] and cond['time_ids']; got keys "
                                 f"{sorted(cond)}")
            time_ids = jnp.asarray(cond["time_ids"], jnp.float32)
            time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                             cfg.freq_shift).reshape(batch, -1)
            added = jnp.concatenate([jnp.asarray(cond["pooled"], jnp.float32), time_embeds], axis=-1).astype(dtype)
            temb = temb + TimestepMLP(cfg.time_embed_dim, dtype=dtype, name="add_embedding")(added)

        h = _conv(cfg.block_out_channels[0], 3, dtype, "conv_in")(jnp.asarray(x, dtype))
        skips = [h]
        levels = len(cfg.block_out_channels)
        for level, block_type in enumerate(cfg.down_block_types):
            h, outputs = _Block(cfg.block_out_channels[level], cfg.layers_per_block[level],
                                block_type.startswith("CrossAttn"), cfg.num_heads[level],
                                cfg.transformer_layers[level], "down" if level < levels - 1 else None, cfg,
                                dtype=dtype, name=f"down_blocks_{level}")(h, temb, context, None)
            skips.extend(outputs)
        h = _MidBlock(cfg, dtype=dtype, name="mid_block")(h, temb, context)
        up_channels = tuple(reversed(cfg.block_out_channels))
        up_heads = tuple(reversed(cfg.num_heads))
        up_layers = tuple(reversed(cfg.layers_per_block))
        for level, block_type in enumerate(cfg.up_block_types):
            h, _ = _Block(up_channels[level], up_layers[level] + 1, block_type.startswith("CrossAttn"),
                          up_heads[level], cfg.up_transformer_layers[level], "up" if level < levels - 1 else None,
                          cfg, dtype=dtype, name=f"up_blocks_{level}")(h, temb, context, skips)
        h = nn.silu(_group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(h))
        return _conv(cfg.out_channels, 3, dtype, "conv_out")(h)


def c_noise_apply_fn(module: nn.Module, num_train_timesteps: int = 1000) -> Callable[[Any, Array, Array, Any], Array]:
    """``apply_fn(params, x, c_noise, cond) -> F`` (the toolkit's convention) for a diffusers-timestep module:
    c_noise = 1000 t of a ``DiscreteVPSchedule`` with T = num_train_timesteps is the timestep
    k = c_noise T / 1000 - 1."""

    def apply_fn(params: Any, x: Array, c_noise: Array, cond: Any) -> Array:
        timesteps = jnp.asarray(c_noise, jnp.float32) * (num_train_timesteps / 1000.0) - 1.0
        return module.apply({"params": params}, x, timesteps, cond).astype(x.dtype)

    return apply_fn


# --------------------------------------------------------------------------------------------------------------------
# Key map (the naming rule is used by the DiT port too; layouts: flaxdiff.interop.torch_weights)


def flax_path_to_torch_key(flax_path: Sequence[str]) -> str:
    """``("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "kernel")`` ->
    ``"down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"``."""
    *modules, leaf = flax_path
    if leaf not in _LEAF_TO_TORCH:
        raise ValueError(f"flax param {'/'.join(flax_path)} ends in {leaf!r}; expected one of {sorted(_LEAF_TO_TORCH)}")
    parts = []
    for name in modules:
        match = re.fullmatch(r"(.+)_(\d+)", name)
        parts.append(f"{match.group(1)}.{match.group(2)}" if match and match.group(1) in LIST_MODULES else name)
    return ".".join(parts + [_LEAF_TO_TORCH[leaf]])


def _example_inputs(config: UNet2DConditionConfig) -> tuple[Array, Array, dict[str, Array]]:
    size = config.downsample_factor
    cond = {"text": jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond["pooled"] = jnp.zeros((1, pooled), jnp.float32)
        cond["time_ids"] = jnp.zeros((1, 6), jnp.float32)
    return jnp.zeros((1, size, size, config.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32), cond


def param_shapes(config: UNet2DConditionConfig) -> dict[str, Any]:
    """ShapeDtypeStructs of every parameter of ``UNet2DConditionModel(config)`` (no computation, no memory)."""
    x, t, cond = _example_inputs(config)
    return jax.eval_shape(lambda: UNet2DConditionModel(config).init(jax.random.key(0), x, t, cond))["params"]


def unet_key_map(config: UNet2DConditionConfig) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """``{torch key: (flax path, layout, flax shape)}`` for every parameter of the U-Net."""
    return torch_weights.key_map_from_shapes(param_shapes(config), flax_path_to_torch_key)


def from_torch_state_dict(state_dict: Mapping[str, Any], config: UNet2DConditionConfig,
                          source: str = "state dict") -> dict[str, Any]:
    """flax params from a diffusers ``UNet2DConditionModel`` state dict (numpy arrays in torch layouts)."""
    return torch_weights.convert_state_dict(state_dict, unet_key_map(config), "diffusers UNet2DConditionModel",
                                            source)


def to_torch_state_dict(params: Mapping[str, Any], config: UNet2DConditionConfig) -> dict[str, np.ndarray]:
    """The diffusers ``UNet2DConditionModel`` state dict of flax params (inverse of :func:`from_torch_state_dict`)."""
    return torch_weights.export_state_dict(params, unet_key_map(config), "UNet2DConditionModel")


# --------------------------------------------------------------------------------------------------------------------
# Files


def read_diffusers_dir(path: str | Path, what: str) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """``(config dict, state dict, weights path)`` of a diffusers model directory (config.json +
    diffusion_pytorch_model.safetensors, or its shards listed in diffusion_pytorch_model.safetensors.index.json)."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise ValueError(f"no {CONFIG_FILE} in {path}; expected a diffusers {what} directory")
    index_path = path / f"{WEIGHTS_FILE}.index.json"
    if not weights_path.is_file() and index_path.is_file():
        shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise ValueError(f"{index_path} lists shard {missing[0]}, which is not in {path}")
        state: dict[str, np.ndarray] = {}
        for name in shards:
            state.update(load_file(str(path / name)))
        return json.loads(config_path.read_text()), state, str(index_path)
    if not weights_path.is_file():
        found = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
        raise ValueError(f"no {WEIGHTS_FILE} in {path}; safetensors files there: {found} (.bin checkpoints must be "
                         f"converted to safetensors first)")
    return json.loads(config_path.read_text()), load_file(str(weights_path)), str(weights_path)


def load_diffusers_unet(path: str | Path, dtype: str = "float32"
                        ) -> tuple[UNet2DConditionModel, dict[str, Any], UNet2DConditionConfig]:
    """``(module, params, config)`` from a diffusers ``UNet2DConditionModel`` directory; params are float32,
    ``dtype`` is the compute dtype."""
    values, state_dict, source = read_diffusers_dir(path, "UNet2DConditionModel")
    config = unet_config_from_diffusers(values, dtype=dtype)
    params = from_torch_state_dict(state_dict, config, source)
    logger.info("loaded diffusers UNet2DConditionModel from %s (block_out_channels=%s)", source,
                list(config.block_out_channels))
    return UNet2DConditionModel(config), params, config


def save_diffusers_unet(out_dir: str | Path, params: Mapping[str, Any], config: UNet2DConditionConfig) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers'
    ``UNet2DConditionModel.from_pretrained(out_dir)`` loads; returns ``out_dir``."""
    return torch_weights.save_model_dir(out_dir, WEIGHTS_FILE, to_torch_state_dict(params, config), CONFIG_FILE,
                                        diffusers_config_from_unet(config))
