"""diffusers ``DiTTransformer2DModel`` (facebook DiT-XL/2, class-conditional, learned sigma) in Flax Linen.

    module, params, config = load_diffusers_dit("DiT-XL-2-256/transformer")
    out = module.apply({"params": params}, latents_nhwc, timesteps, {"label": labels})   # (B, H, W, out_channels)

The computation (Peebles & Xie 2023, as diffusers writes it), NHWC with p x p patches:

    h   = PatchConv(x) + pos2d                     pos2d(i, j) = [sincos(j), sincos(i)] (fixed, not a parameter)
    c_b = MLP_b(sinusoid_256(t)) + E_b[y]          every block b has its own time / label embedder
    (b1, a1, g1, b2, a2, g2) = W_b silu(c_b)
    h  += g1 * Attn(LN(h) (1 + a1) + b1);   h += g2 * FF(LN(h) (1 + a2) + b2)
    out = unpatchify(W_out (LN(h) (1 + a) + b)),   (b, a) = W silu(c_0)  (block 0's embedding)

With learned sigma ``out_channels = 2 in_channels``: the first half is eps, the second the variance interpolation
(DiT's Sec. 3.1), which samplers do not use; :func:`c_noise_apply_fn` returns the eps half. The label table
has ``num_embeds_ada_norm + 1`` rows, the last being the classifier-free-guidance null class.
Key map: the scheme of :mod:`~flaxdiff.interop.diffusers_unet` (``flax_path_to_torch_key``).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.interop import diffusers_unet as du
from flaxdiff.interop import torch_weights

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = [
    "DiTConfig",
    "DiTTransformer2DModel",
    "c_noise_apply_fn",
    "diffusers_config_from_dit",
    "dit_config_from_diffusers",
    "dit_key_map",
    "from_torch_state_dict",
    "load_diffusers_dit",
    "save_diffusers_dit",
    "to_torch_state_dict",
]

_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
_FIXED = ("activation_fn", "norm_type", "norm_elementwise_affine")
_INFORMATIONAL = {"_class_name", "_diffusers_version", "_name_or_path", "dropout", "norm_num_groups",
                  "upcast_attention"}
_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The computation-relevant part of a diffusers ``DiTTransformer2DModel`` config."""

    num_heads: int = 16
    head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8
    num_layers: int = 28
    sample_size: int = 32
    patch_size: int = 2
    num_classes: int = 1000
    attention_bias: bool = True
    norm_eps: float = 1e-5
    dtype: str = "float32"

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def learned_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels


def dit_config_from_diffusers(values: Mapping[str, Any], dtype: str = "float32") -> DiTConfig:
    """:class:`DiTConfig` from a diffusers DiT ``config.json`` dict (``DiTTransformer2DModel``, or a legacy
    ``Transformer2DModel`` with ``norm_type="ada_norm_zero"``); ValueError on what the port does not implement."""
    class_name = values.get("_class_name", "DiTTransformer2DModel")
    if class_name not in _CLASS_NAMES:
        raise ValueError(f"diffusers config has _class_name={class_name!r}; expected one of {', '.join(_CLASS_NAMES)}")
    cfg = {**_DEFAULTS, **values}
    for field in _FIXED:
        if cfg[field] != _DEFAULTS[field]:
            raise ValueError(f"diffusers DiT config has {field}={cfg[field]!r}; flaxdiff supports only "
                             f"{_DEFAULTS[field]!r}")
    if cfg["num_embeds_ada_norm"] is None:
        raise ValueError("diffusers DiT config has num_embeds_ada_norm=None; the class-conditional DiT needs the "
                         "number of classes")
    unknown = sorted(set(values) - set(_DEFAULTS) - _INFORMATIONAL)
    if unknown:
        logger.warning("diffusers DiT config: ignoring fields %s", unknown)
    in_channels = int(cfg["in_channels"])
    return DiTConfig(
        num_heads=int(cfg["num_attention_heads"]), head_dim=int(cfg["attention_head_dim"]), in_channels=in_channels,
        out_channels=in_channels if cfg["out_channels"] is None else int(cfg["out_channels"]),
        num_layers=int(cfg["num_layers"]), sample_size=int(cfg["sample_size"]), patch_size=int(cfg["patch_size"]),
        num_classes=int(cfg["num_embeds_ada_norm"]), attention_bias=bool(cfg["attention_bias"]),
        norm_eps=float(cfg["norm_eps"]), dtype=dtype)


def diffusers_config_from_dit(config: DiTConfig) -> dict[str, Any]:
    """The diffusers ``DiTTransformer2DModel`` ``config.json`` dict of ``config``."""
    return {**_DEFAULTS, "_class_name": "DiTTransformer2DModel", "num_attention_heads": config.num_heads,
            "attention_head_dim": config.head_dim, "in_channels": config.in_channels,
            "out_channels": config.out_channels, "num_layers": config.num_layers, "sample_size": config.sample_size,
            "patch_size": config.patch_size, "num_embeds_ada_norm": config.num_classes,
            "attention_bias": config.attention_bias, "norm_eps": config.norm_eps}


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid^2, dim) fixed position embedding, row-major tokens (i, j): [sincos(j), sincos(i)], where
    sincos(p) = [sin(p w), cos(p w)], w_k = 10000^(-k / (dim / 4)), k < dim / 4."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def sincos(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([sincos(cols), sincos(rows)], axis=1).astype(np.float32)


class _Table(nn.Module):
    """diffusers ``LabelEmbedding``: one table named ``embedding_table``."""

    rows: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        return nn.Embed(self.rows, self.features, dtype=self.dtype, name="embedding_table")(ids)


class _PatchEmbed(nn.Module):
    """diffusers ``PatchEmbed`` (its parameter part): a p x p convolution with stride p named ``proj``."""

    hidden: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        return nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(x)


class _TimestepLabelEmbedding(nn.Module):
    """diffusers ``CombinedTimestepLabelEmbeddings``: MLP(sinusoid_256(t), flip, shift 1) + table[y]."""

    hidden: int
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timesteps: Array, labels: Array) -> Array:
        t_emb = du.TimestepMLP(self.hidden, dtype=self.dtype, name="timestep_embedder")(
            du.timestep_embedding(timesteps, 256, True, 1.0).astype(self.dtype))
        return t_emb + _Table(self.num_classes + 1, self.hidden, self.dtype, name="class_embedder")(labels)


class _AdaNormZero(nn.Module):
    hidden: int
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timesteps: Array, labels: Array) -> tuple[Array, Array]:
        emb = _TimestepLabelEmbedding(self.hidden, self.num_classes, dtype=self.dtype, name="emb")(timesteps, labels)
        return emb, nn.Dense(6 * self.hidden, dtype=self.dtype, name="linear")(nn.silu(emb))


class _GELUFeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: net.2(gelu_tanh(net.0.proj(x)))."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        hidden = du.Linear(4 * dim, self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(nn.gelu(hidden, approximate=True))


class _DiTBlock(nn.Module):
    config: DiTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, timesteps: Array, labels: Array) -> tuple[Array, Array]:
        cfg = self.config
        emb, mod = _AdaNormZero(cfg.hidden, cfg.num_classes, dtype=self.dtype, name="norm1")(timesteps, labels)
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in jnp.split(mod, 6, axis=-1))
        norm = du._layer_norm(1e-6, False, self.dtype)(h) * (1 + scale1) + shift1
        h = h + gate1 * du.Attention(cfg.num_heads, cfg.head_dim, qkv_bias=cfg.attention_bias, dtype=self.dtype,
                                     name="attn1")(norm)
        norm = du._layer_norm(cfg.norm_eps, False, self.dtype)(h) * (1 + scale2) + shift2
        return h + gate2 * _GELUFeedForward(dtype=self.dtype, name="ff")(norm), emb


class DiTTransformer2DModel(nn.Module):
    """diffusers ``DiTTransformer2DModel`` (NHWC): ``__call__(x, timesteps, cond, train=False)`` with
    cond = {"label": int (B,)} (label == num_classes is the null class) -> (B, H, W, out_channels)."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x: Array, timesteps: Array, cond: Mapping[str, Array], train: bool = False) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        batch, height, width, _ = x.shape
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p
        if grid_h != grid_w or grid_h * p != height:
            raise ValueError(f"DiT input {height}x{width} must be square and divisible by patch_size={p}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        labels = jnp.asarray(cond["label"], jnp.int32)
        h = _PatchEmbed(cfg.hidden, p, dtype, name="pos_embed")(jnp.asarray(x, dtype)).reshape(batch, -1, cfg.hidden)
        h = h + jnp.asarray(sincos_2d(cfg.hidden, grid_h), dtype)[None]
        first_emb = None
        for index in range(cfg.num_layers):
            h, emb = _DiTBlock(cfg, dtype=dtype, name=f"transformer_blocks_{index}")(h, timesteps, labels)
            first_emb = emb if first_emb is None else first_emb
        shift, scale = jnp.split(nn.Dense(2 * cfg.hidden, dtype=dtype, name="proj_out_1")(nn.silu(first_emb)), 2,
                                 axis=-1)
        h = du._layer_norm(1e-6, False, dtype)(h) * (1 + scale[:, None]) + shift[:, None]
        h = nn.Dense(p * p * cfg.out_channels, dtype=dtype, name="proj_out_2")(h)
        h = h.reshape(batch, grid_h, grid_w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(batch, height, width, cfg.out_channels)


def c_noise_apply_fn(module: DiTTransformer2DModel, num_train_timesteps: int = 1000
                     ) -> Callable[[Any, Array, Array, Any], Array]:
    """``apply_fn(params, x, c_noise, cond) -> eps`` (timestep k = c_noise T / 1000 - 1, see
    :func:`flaxdiff.interop.diffusers_unet.c_noise_apply_fn`); with learned sigma only the eps channels."""
    channels = module.config.in_channels

    def apply_fn(params: Any, x: Array, c_noise: Array, cond: Any) -> Array:
        timesteps = jnp.asarray(c_noise, jnp.float32) * (num_train_timesteps / 1000.0) - 1.0
        return module.apply({"params": params}, x, timesteps, cond)[..., :channels].astype(x.dtype)

    return apply_fn


def param_shapes(config: DiTConfig) -> dict[str, Any]:
    """ShapeDtypeStructs of every parameter of ``DiTTransformer2DModel(config)`` (no computation, no memory)."""
    x = jnp.zeros((1, config.patch_size, config.patch_size, config.in_channels), jnp.float32)
    cond = {"label": jnp.zeros((1,), jnp.int32)}
    return jax.eval_shape(lambda: DiTTransformer2DModel(config).init(jax.random.key(0), x, jnp.zeros((1,)), cond)
                          )["params"]


def dit_key_map(config: DiTConfig) -> dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """``{torch key: (flax path, layout, flax shape)}`` for every DiT parameter."""
    return torch_weights.key_map_from_shapes(param_shapes(config), du.flax_path_to_torch_key)


def from_torch_state_dict(state_dict: Mapping[str, Any], config: DiTConfig, source: str = "state dict"
                          ) -> dict[str, Any]:
    """flax params from a diffusers DiT state dict (numpy arrays in torch layouts)."""
    return torch_weights.convert_state_dict(state_dict, dit_key_map(config), "diffusers DiTTransformer2DModel",
                                            source)


def to_torch_state_dict(params: Mapping[str, Any], config: DiTConfig) -> dict[str, np.ndarray]:
    """The diffusers ``DiTTransformer2DModel`` state dict of flax params."""
    return torch_weights.export_state_dict(params, dit_key_map(config), "DiTTransformer2DModel")


def load_diffusers_dit(path: str | Path, dtype: str = "float32"
                       ) -> tuple[DiTTransformer2DModel, dict[str, Any], DiTConfig]:
    """``(module, params, config)`` from a diffusers DiT directory (config.json + safetensors)."""
    values, state_dict, source = du.read_diffusers_dir(path, "DiTTransformer2DModel")
    config = dit_config_from_diffusers(values, dtype=dtype)
    params = from_torch_state_dict(state_dict, config, source)
    logger.info("loaded diffusers DiT from %s (%d layers, hidden %d)", source, config.num_layers, config.hidden)
    return DiTTransformer2DModel(config), params, config


def save_diffusers_dit(out_dir: str | Path, params: Mapping[str, Any], config: DiTConfig) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` for ``DiTTransformer2DModel.from_pretrained``."""
    return torch_weights.save_model_dir(out_dir, du.WEIGHTS_FILE, to_torch_state_dict(params, config), du.CONFIG_FILE,
                                        diffusers_config_from_dit(config))
