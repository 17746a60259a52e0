"""DiT: Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023), optional text cross-attention.

``tokens = PatchEmbed_p(x) + sincos_2d`` (fixed); ``c = MLP(embed(c_noise)) [+ label_emb] [+ Dense(pooled)]``;
each block, with ``(b1, s1, g1, b2, s2, g2) = Dense_0(SiLU(c))`` (zero-initialised):

    x = x + g1 * SelfAttn(LN(x) * (1 + s1) + b1)
    x = x + CrossAttn(LN(x), text)                       (only when text_dim > 0)
    x = x + g2 * MLP(LN(x) * (1 + s2) + b2)

then ``Dense_0(LN(x) * (1 + s) + b)`` per token (zero-initialised) and unpatchify. Because every gate and the
final projection start at zero, a freshly initialised DiT outputs exactly zero.

With ``learn_sigma=True`` the output has ``2 * in_channels`` channels:
``mean_out, var_out = jnp.split(out, 2, axis=-1)``; ``mean_out`` is the parameterised prediction
(eps, x0, v, ...) and ``var_out`` the IDDPM variance interpolation ``v`` in
``log Sigma = v log beta + (1 - v) log beta_tilde`` (after mapping ``(v + 1) / 2``).

Options (all off by default):

- ``num_experts > 0``: every ``moe_every``-th block (indices moe_every-1, 2 moe_every-1, ...) replaces its MLP by an
  expert-choice mixture of experts (:mod:`flaxdiff.models.moe`), each expert taking ``capacity_factor T / E`` tokens.
- ``patch_mixer_depth > 0``: that many extra blocks run on all tokens before masking (MicroDiT's patch mixer).
- ``mask_ratio > 0``: with ``train=True`` the backbone runs on the ``N - round(r N)`` kept tokens only, masked
  positions output 0 (:mod:`flaxdiff.models.masking`: key choice, visible-only loss, finetune at ratio 0).
- ``pos_embed_grid > 0``: positions rescaled to a fixed range for progressive resolution.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxdiff.models import layers, masking, moe
from flaxdiff.models.configs import ModelConfig

Array = jax.Array

DIT_SIZES = {  # name: (depth, hidden_size, num_heads) from the DiT paper, Table 1
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PATCHES = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class DiTConfig(ModelConfig):
    """DiT hyper-parameters (one line each)."""

    registry_name = "dit"

    input_size: int = 32            # nominal image side, documentation only: any H, W divisible by patch_size work
    in_channels: int = 4            # channels of x (4 for a Stable Diffusion latent)
    patch_size: int = 2             # p: tokens are p x p patches
    hidden_size: int = 1152         # transformer width
    depth: int = 28                 # number of DiT blocks
    num_heads: int = 16             # attention heads
    mlp_ratio: float = 4.0          # MLP hidden width / hidden_size
    num_classes: int = 0            # > 0: class-conditional with learned null class num_classes
    learn_sigma: bool = False       # output 2 * in_channels channels (prediction, variance interpolation)
    text_dim: int = 0               # > 0: cross-attention to cond['text'] (B, L, text_dim) in every block
    pooled_dim: int = 0             # > 0: cond['pooled'] (B, pooled_dim) is added to the conditioning vector
    frequency_dim: int = 256        # width of the fixed c_noise embedding fed to the MLP
    noise_embedding: str = "sinusoidal"  # "sinusoidal" or "fourier"
    fourier_scale: float = 16.0     # std of the Fourier frequencies
    dtype: str = "float32"          # compute dtype; params are always float32
    remat: bool = False             # rematerialise every block
    num_experts: int = 0            # > 0: expert-choice MoE MLP (this many experts) in every moe_every-th block
    moe_every: int = 2              # MoE in blocks moe_every-1, 2 moe_every-1, ... (2: alternate blocks)
    capacity_factor: float = 2.0    # MoE: each expert takes round(capacity_factor * tokens / num_experts) tokens
    mask_ratio: float = 0.0         # masked training: fraction of patches dropped per example when train=True
    patch_mixer_depth: int = 0      # blocks run on all patches before masking (MicroDiT patch mixer)
    pos_embed_grid: int = 0         # > 0: sin-cos positions rescaled to span this many patches at any resolution

    def make(self) -> "DiT":
        return DiT(self)


def dit_preset(name: str) -> DiTConfig:
    """The paper's ImageNet-256 latent configs: "DiT-{S,B,L,XL}/{2,4,8}" on 32x32x4 latents, 1000 classes,
    learn_sigma=True."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in DIT_PATCHES:
        raise ValueError(f"unknown DiT preset {name!r}; use DiT-{{S,B,L,XL}}/{{2,4,8}}")
    depth, hidden, heads = DIT_SIZES[size]
    return DiTConfig(input_size=32, in_channels=4, patch_size=int(patch), hidden_size=hidden, depth=depth,
                     num_heads=heads, num_classes=1000, learn_sigma=True)


_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (see the module docstring)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    cross_attention: bool
    dtype: Any = jnp.float32
    num_experts: int = 0            # > 0: expert-choice MoE in place of the MLP
    capacity_factor: float = 2.0

    @nn.compact
    def __call__(self, x: Array, c: Array, context: Array | None = None,
                 context_mask: Array | None = None) -> Array:
        width, heads = self.hidden_size, self.num_heads
        mod = nn.Dense(6 * width, dtype=self.dtype, kernel_init=_zeros, name="adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        norm = lambda name: nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False,  # noqa: E731
                                         dtype=self.dtype, name=name)
        h = layers.modulate(norm("norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None, :] * layers.Attention(heads, width // heads, width, dtype=self.dtype,
                                                        name="attn")(h)
        if self.cross_attention:
            h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm_cross")(x)
            x = x + layers.Attention(heads, width // heads, width, null_kv=True, dtype=self.dtype,
                                     name="cross_attn")(h, context, context_mask)
        h = layers.modulate(norm("norm2")(x), shift_mlp, scale_mlp)
        if self.num_experts > 0:
            h = moe.ExpertChoiceMLP(self.num_experts, int(width * self.mlp_ratio), self.capacity_factor,
                                    dtype=self.dtype, name="moe")(h)
        else:
            h = layers.dense_tokens(nn.Dense(int(width * self.mlp_ratio), dtype=self.dtype, kernel_init=_xavier,
                                             name="mlp_fc1"), h)
            h = layers.dense_tokens(nn.Dense(width, dtype=self.dtype, kernel_init=_xavier, name="mlp_fc2"),
                                    nn.gelu(h, approximate=True))
        return x + gate_mlp[:, None, :] * h


class DiT(nn.Module):
    """Diffusion Transformer; call ``apply({'params': p}, x, c_noise, cond, train=False)``.

    x (B, H, W, in_channels) with H, W divisible by ``patch_size``; returns (B, H, W, C_out) with
    ``C_out = 2 * in_channels`` if ``learn_sigma`` else ``in_channels`` (split with
    ``jnp.split(out, 2, axis=-1)`` into prediction and variance interpolation).
    With ``mask_ratio > 0`` and ``train=True`` patches are masked with ``mask_key`` (default: a key from the
    'mask' rng stream, else from 'dropout'); see :mod:`flaxdiff.models.masking`.
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x: Array, c_noise: Array, cond: Mapping[str, Array] | None = None,
                 train: bool = False, mask_key: Array | None = None) -> Array:
        cfg = self.config
        dtype = layers.resolve_dtype(cfg.dtype)
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
        if cfg.num_experts > 0 and cfg.moe_every < 1:
            raise ValueError(f"moe_every={cfg.moe_every} must be >= 1 when num_experts={cfg.num_experts} > 0")
        layers.check_input(x, c_noise, cfg.in_channels, cfg.patch_size, f"patch_size={cfg.patch_size}")
        labels, text, text_mask, pooled = layers.parse_cond(cond, x.shape[0], cfg.num_classes, cfg.text_dim,
                                                            cfg.pooled_dim)
        batch, height, width, _ = x.shape
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p

        tokens = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                         kernel_init=_xavier, name="x_embedder")(x.astype(dtype))
        tokens = tokens.reshape(batch, grid_h * grid_w, cfg.hidden_size)
        tokens = tokens + jnp.asarray(masking.position_embedding(cfg.hidden_size, grid_h, grid_w,
                                                                 cfg.pos_embed_grid), dtype)[None]

        c = layers.NoiseEmbedding(cfg.hidden_size, cfg.frequency_dim, cfg.noise_embedding, cfg.fourier_scale,
                                  dtype=dtype, name="t_embedder")(c_noise)
        if labels is not None:
            c = c + layers.LabelEmbedding(cfg.num_classes, cfg.hidden_size, dtype=dtype, name="y_embedder")(labels)
        if pooled is not None:
            c = c + nn.Dense(cfg.hidden_size, dtype=dtype, kernel_init=_xavier, name="pooled_embedder")(
                pooled.astype(dtype))
        if text is not None:
            text = text.astype(dtype)

        block_cls = nn.remat(DiTBlock) if cfg.remat else DiTBlock
        for index in range(cfg.patch_mixer_depth):
            tokens = block_cls(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, text is not None, dtype=dtype,
                               name=f"patch_mixer_{index}")(tokens, c, text, text_mask)
        num_patches = grid_h * grid_w
        keep = None
        if cfg.mask_ratio != 0:
            masking.num_kept(num_patches, cfg.mask_ratio)  # validates the ratio in every mode
        if train and cfg.mask_ratio > 0:
            if mask_key is None:
                if not (self.has_rng("mask") or self.has_rng("dropout")):
                    raise ValueError(f"mask_ratio={cfg.mask_ratio} with train=True needs mask_key=... or a 'mask' "
                                     f"or 'dropout' rng in apply(..., rngs=...)")
                mask_key = self.make_rng("mask" if self.has_rng("mask") else "dropout")
            keep = masking.keep_indices(mask_key, batch, num_patches, cfg.mask_ratio)
            tokens = masking.gather_tokens(tokens, keep)
        for index in range(cfg.depth):
            use_moe = cfg.num_experts > 0 and cfg.moe_every > 0 and index % cfg.moe_every == cfg.moe_every - 1
            tokens = block_cls(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, text is not None, dtype=dtype,
                               num_experts=cfg.num_experts if use_moe else 0, capacity_factor=cfg.capacity_factor,
                               name=f"blocks_{index}")(tokens, c, text, text_mask)

        out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        shift, scale = jnp.split(nn.Dense(2 * cfg.hidden_size, dtype=dtype, kernel_init=_zeros,
                                          name="final_adaLN_modulation")(nn.silu(c)), 2, axis=-1)
        tokens = layers.modulate(nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype,
                                              name="final_norm")(tokens), shift, scale)
        tokens = layers.dense_tokens(nn.Dense(p * p * out_channels, dtype=dtype, kernel_init=_zeros,
                                              name="final_linear"), tokens)
        if keep is not None:
            tokens = masking.scatter_tokens(tokens, keep, num_patches)
        out = tokens.reshape(batch, grid_h, grid_w, p, p, out_channels)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, out_channels)
        return out.astype(jnp.float32)
