"""ADM / DDPM++-style U-Net with optional class, pooled-vector and text (cross-attention) conditioning.

Structure (Dhariwal & Nichol 2021): ``emb = MLP(embed(c_noise)) [+ label_emb] [+ Dense(pooled)]``;
``conv_in``; per level ``l`` (resolution ``H / 2^l``, width ``base_channels * channel_mult[l]``)
``num_res_blocks`` residual blocks, each followed by attention when ``l in attention_levels``, then a
downsample except at the last level; a middle res-attn-res; the mirrored up path with skip
concatenations and ``num_res_blocks + 1`` blocks per level; ``GroupNorm -> SiLU -> conv_out`` (zero
initialised, so a fresh model outputs zeros).

``patch_size = p > 1`` runs the whole network on p x p patches ("patching", as in simple diffusion /
U-ViT): x (B, H, W, C) is rearranged losslessly to (B, H/p, W/p, p*p*C) before ``conv_in`` and the output
(B, H/p, W/p, p*p*C_out) back to (B, H, W, C_out). Every feature map is p^2 times smaller, so a step costs
~p^2 less at the same widths; the first level then sees each pixel's p x p neighbourhood as channels.

Residual block with scale-shift norm: ``h = conv(SiLU(GN(x)))``, ``h = GN(h) * (1 + s) + b`` with
``(s, b) = Dense(SiLU(emb))``, ``out = skip(x) + conv0(dropout(SiLU(h)))``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxdiff.models import layers
from flaxdiff.models.configs import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """U-Net hyper-parameters (one line each)."""

    registry_name = "unet"

    in_channels: int = 3                        # channels of x
    out_channels: int | None = None             # output channels (None: same as in_channels)
    base_channels: int = 128                    # width of level 0
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # width multiplier per level; level l runs at H / 2^l
    num_res_blocks: int = 2                     # residual blocks per level on the down path
    attention_levels: tuple[int, ...] = (1,)    # levels (indices into channel_mult) with attention
    num_heads: int = 4                          # attention heads, used when num_head_channels <= 0
    num_head_channels: int = -1                 # head width; > 0 overrides num_heads (heads = C / width)
    dropout: float = 0.0                        # dropout inside residual blocks (train=True only)
    norm_num_groups: int = 32                   # GroupNorm groups
    resblock_updown: bool = False               # resample with residual blocks (BigGAN style) instead of convs
    use_scale_shift_norm: bool = True           # emb modulates the norm (FiLM) instead of being added
    num_classes: int = 0                        # > 0: class-conditional with learned null class num_classes
    text_dim: int = 0                           # > 0: cross-attention to cond['text'] (B, L, text_dim) in every
                                                #      attention block (attention_levels and the middle block)
    pooled_dim: int = 0                         # > 0: cond['pooled'] (B, pooled_dim) is added to emb
    noise_embedding: str = "sinusoidal"         # "sinusoidal" or "fourier" embedding of c_noise
    fourier_scale: float = 16.0                 # std of the Fourier frequencies
    dtype: str = "float32"                      # compute dtype; params are always float32
    remat: bool = False                         # rematerialise every block (saves activation memory)
    patch_size: int = 1                         # p > 1: run on p x p patches (space-to-depth in, depth-to-space out)

    def make(self) -> "UNet":
        return UNet(self)


class ResBlock(nn.Module):
    """Residual block with noise/condition embedding, optional up/down resampling inside."""

    out_channels: int
    num_groups: int
    dropout: float
    use_scale_shift_norm: bool
    resample: str = "none"
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        layers.check_groups(x.shape[-1], self.num_groups, "ResBlock input")
        layers.check_groups(self.out_channels, self.num_groups, "ResBlock output")
        h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
        if self.resample == "up":
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.resample == "down":
            h, x = _avg_pool(h), _avg_pool(x)
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        e = nn.Dense(width, dtype=self.dtype, name="emb_proj")(nn.silu(emb))[:, None, None, :]
        norm2 = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = norm2(h) * (1.0 + scale) + shift
        else:
            h = norm2(h + e)
        h = nn.Dropout(self.dropout, deterministic=not self.train)(nn.silu(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """``x + proj(SelfAttn(GN(x)))`` over the H*W tokens, then ``x + CrossAttn(LN(x), text)`` if text."""

    num_heads: int
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        batch, height, width, channels = x.shape
        head_dim = channels // self.num_heads
        h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x).reshape(batch, height * width, channels)
        h = layers.Attention(self.num_heads, head_dim, channels, dtype=self.dtype,
                             out_kernel_init=nn.initializers.zeros, name="attn")(h)
        tokens = x.reshape(batch, height * width, channels) + h
        if context is not None:
            h = nn.LayerNorm(dtype=self.dtype, name="norm_cross")(tokens)
            tokens = tokens + layers.Attention(self.num_heads, head_dim, channels, null_kv=True, dtype=self.dtype,
                                               out_kernel_init=nn.initializers.zeros,
                                               name="cross_attn")(h, context, context_mask)
        return tokens.reshape(batch, height, width, channels)


def space_to_depth(x: Array, p: int) -> Array:
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C); channel index ``(i * p + j) * C + c`` holds pixel (p y + i, p x + j)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // p, p, width // p, p, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // p, width // p, p * p * channels)


def depth_to_space(x: Array, p: int) -> Array:
    """The inverse of :func:`space_to_depth`: (B, h, w, p*p*C) -> (B, h*p, w*p, C)."""
    batch, height, width, depth = x.shape
    channels = depth // (p * p)
    x = x.reshape(batch, height, width, p, p, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * p, width * p, channels)


def _upsample_nearest(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x: Array) -> Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class UNet(nn.Module):
    """ADM-style U-Net; call ``apply({'params': p}, x, c_noise, cond, train=False)``.

    x (B, H, W, in_channels) with H, W divisible by ``patch_size * 2^(len(channel_mult) - 1)``; c_noise (B,);
    cond None or a dict (see :func:`flaxdiff.models.layers.parse_cond`). Returns (B, H, W, out_channels).
    """

    config: UNetConfig

    def _heads(self, channels: int) -> int:
        cfg = self.config
        if cfg.num_head_channels > 0:
            if channels % cfg.num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={cfg.num_head_channels}")
            return channels // cfg.num_head_channels
        if channels % cfg.num_heads:
            raise ValueError(f"{channels} channels are not divisible by num_heads={cfg.num_heads}")
        return cfg.num_heads

    @nn.compact
    def __call__(self, x: Array, c_noise: Array, cond: Mapping[str, Array] | None = None,
                 train: bool = False) -> Array:
        cfg = self.config
        dtype = layers.resolve_dtype(cfg.dtype)
        levels = len(cfg.channel_mult)
        bad = [lvl for lvl in cfg.attention_levels if not 0 <= lvl < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {levels} levels (0..{levels - 1})")
        if cfg.patch_size < 1:
            raise ValueError(f"patch_size={cfg.patch_size} must be a positive integer (1 = no patching)")
        layers.check_input(x, c_noise, cfg.in_channels, cfg.patch_size * 2 ** (levels - 1),
                           f"patch_size {cfg.patch_size} and {levels - 1} downsamplings")
        labels, text, text_mask, pooled = layers.parse_cond(cond, x.shape[0], cfg.num_classes, cfg.text_dim,
                                                            cfg.pooled_dim)
        emb_dim = 4 * cfg.base_channels
        emb = layers.NoiseEmbedding(emb_dim, cfg.base_channels, cfg.noise_embedding, cfg.fourier_scale,
                                    dtype=dtype, kernel_init=nn.initializers.lecun_normal(),
                                    name="noise_embed")(c_noise)
        if labels is not None:
            emb = emb + layers.LabelEmbedding(cfg.num_classes, emb_dim, dtype=dtype, name="label_embed")(labels)
        if pooled is not None:
            emb = emb + nn.Dense(emb_dim, dtype=dtype, name="pooled_proj")(pooled.astype(dtype))
        if text is not None:
            text = text.astype(dtype)

        res_cls = nn.remat(ResBlock) if cfg.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if cfg.remat else AttentionBlock

        def res(out_channels: int, name: str, resample: str = "none") -> nn.Module:
            return res_cls(out_channels, cfg.norm_num_groups, cfg.dropout, cfg.use_scale_shift_norm, resample,
                           train=train, dtype=dtype, name=name)

        def attn(channels: int, name: str) -> nn.Module:
            return attn_cls(self._heads(channels), cfg.norm_num_groups, dtype=dtype, name=name)

        if cfg.patch_size > 1:
            x = space_to_depth(x, cfg.patch_size)
        h = nn.Conv(cfg.base_channels, (3, 3), padding=1, dtype=dtype, name="conv_in")(x.astype(dtype))
        skips = [h]
        for level, mult in enumerate(cfg.channel_mult):
            channels = cfg.base_channels * mult
            for block in range(cfg.num_res_blocks):
                h = res(channels, f"down_{level}_res_{block}")(h, emb)
                if level in cfg.attention_levels:
                    h = attn(channels, f"down_{level}_attn_{block}")(h, text, text_mask)
                skips.append(h)
            if level != levels - 1:
                if cfg.resblock_updown:
                    h = res(channels, f"down_{level}_downsample", "down")(h, emb)
                else:
                    h = nn.Conv(channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype,
                                name=f"down_{level}_downsample")(h)
                skips.append(h)
        mid_channels = cfg.base_channels * cfg.channel_mult[-1]
        h = res(mid_channels, "mid_res_0")(h, emb)
        h = attn(mid_channels, "mid_attn")(h, text, text_mask)
        h = res(mid_channels, "mid_res_1")(h, emb)
        for level in reversed(range(levels)):
            channels = cfg.base_channels * cfg.channel_mult[level]
            for block in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(channels, f"up_{level}_res_{block}")(h, emb)
                if level in cfg.attention_levels:
                    h = attn(channels, f"up_{level}_attn_{block}")(h, text, text_mask)
            if level != 0:
                if cfg.resblock_updown:
                    h = res(channels, f"up_{level}_upsample", "up")(h, emb)
                else:
                    h = nn.Conv(channels, (3, 3), padding=1, dtype=dtype,
                                name=f"up_{level}_upsample")(_upsample_nearest(h))
        h = nn.silu(nn.GroupNorm(cfg.norm_num_groups, dtype=dtype, name="norm_out")(h))
        out_channels = cfg.out_channels or cfg.in_channels
        h = nn.Conv(out_channels * cfg.patch_size ** 2, (3, 3), padding=1, dtype=dtype,
                    kernel_init=nn.initializers.zeros, name="conv_out")(h)
        if cfg.patch_size > 1:
            h = depth_to_space(h, cfg.patch_size)
        return h.astype(jnp.float32)
