"""Layers shared by the U-Net, the DiT, the autoencoder and the text encoder.

Everything here is a plain Flax Linen module or a pure function:

- noise embeddings: sinusoidal ``[cos(c f_k), sin(c f_k)]`` with ``f_k = P^(-k/half)`` (P = 10000) and
  random Fourier features ``[cos(2 pi c w_k), sin(2 pi c w_k)]`` whose ``w_k ~ N(0, s^2)`` are derived
  deterministically from a seed held in the config (so checkpoints are self-contained);
- a class-label embedding with one extra learned row, index ``num_classes``, the null class used by
  classifier-free guidance;
- multi-head (self / cross) attention through :func:`dot_product_attention` (``jax.nn.dot_product_attention``
  on GPU/TPU, a heads-major batched-matmul formulation on CPU);
- adaLN modulation ``x * (1 + scale) + shift`` and fixed 2D sin-cos position embeddings;
- parsing of the conditioning dict shared by every diffusion model.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NOISE_EMBEDDINGS = ("sinusoidal", "fourier")


def resolve_dtype(name: str) -> Any:
    """Map a dtype name from a config ("float32", "bfloat16", "float16") to the jnp dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def sinusoidal_embedding(c_noise: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of a scalar per example.

    ``emb[:, k] = cos(c f_k)``, ``emb[:, half + k] = sin(c f_k)``, ``f_k = max_period^(-k / half)``,
    ``half = dim // 2`` (a zero column is appended for odd ``dim``). The highest frequency is 1, the
    lowest ``1 / max_period``, so it resolves both ``c = 1000 t`` (range [0, 1000]) and
    ``c = log(sigma) / 4`` (range about [-2, 2]).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(c_noise, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_frequencies(dim: int, scale: float, seed: int = 0) -> np.ndarray:
    """The ``dim // 2`` fixed frequencies ``w_k ~ N(0, scale^2)`` of the Fourier embedding.

    Drawn with numpy's legacy ``RandomState(seed)``, whose stream is frozen across numpy versions, so
    the frequencies are a pure function of the config and need not be stored in checkpoints.
    """
    return (np.random.RandomState(seed).standard_normal(dim // 2) * scale).astype(np.float32)


def fourier_embedding(c_noise: Array, dim: int, scale: float = 16.0, seed: int = 0) -> Array:
    """Random Fourier features ``[cos(2 pi c w_k), sin(2 pi c w_k)]`` (EDM / NCSN++ style).

    Suited to small-range inputs such as the EDM ``c_noise = log(sigma) / 4``; for ``c = 1000 t`` use a
    small ``scale`` (for example 0.02) or the sinusoidal embedding.
    """
    freqs = jnp.asarray(fourier_frequencies(dim, scale, seed))
    args = 2.0 * jnp.pi * jnp.asarray(c_noise, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class NoiseEmbedding(nn.Module):
    """``MLP(embed(c_noise))``: a fixed sinusoidal or Fourier embedding of width ``frequency_dim``
    followed by ``Dense(features) -> SiLU -> Dense(features)``."""

    features: int
    frequency_dim: int = 256
    kind: str = "sinusoidal"
    fourier_scale: float = 16.0
    dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, c_noise: Array) -> Array:
        if self.kind == "sinusoidal":
            emb = sinusoidal_embedding(c_noise, self.frequency_dim)
        elif self.kind == "fourier":
            emb = fourier_embedding(c_noise, self.frequency_dim, self.fourier_scale)
        else:
            raise ValueError(f"noise_embedding={self.kind!r} is unknown; use one of {NOISE_EMBEDDINGS}")
        emb = nn.Dense(self.features, dtype=self.dtype, kernel_init=self.kernel_init, name="linear_1")(emb)
        emb = nn.silu(emb)
        return nn.Dense(self.features, dtype=self.dtype, kernel_init=self.kernel_init, name="linear_2")(emb)


class LabelEmbedding(nn.Module):
    """Class-label embedding table of ``num_classes + 1`` rows; row ``num_classes`` is the learned null
    class used for classifier-free guidance (and when no label is given)."""

    num_classes: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels: Array) -> Array:
        table = nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embedding_table")
        return table(labels)


def dense_tokens(dense: nn.Module, x: Array) -> Array:
    """``dense(x)`` for x (..., D) applied to x reshaped to (prod(...), D), result reshaped back: the same numbers
    and params. XLA:CPU gives the weight gradient of a Dense over (B, T, D) activations, a contraction over two
    axes, a transposed copy of the activations first; as a 2-D matmul it needs none. On the main job's DiT
    train step this removed 36 activation copies.
    """
    lead = x.shape[:-1]
    out = dense(x.reshape(-1, x.shape[-1]))
    return out.reshape(*lead, out.shape[-1])


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation ``x * (1 + scale) + shift`` with (B, D) shift/scale broadcast over tokens."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """1D sin-cos embedding: ``[sin(p w_k), cos(p w_k)]``, ``w_k = 10000^(-k / (dim/2))``."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, height: int, width: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding (H*W, dim): first half encodes the row, second half the
    column, each with :func:`sincos_1d` (the DiT / MAE construction). ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                             indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)
    return emb.astype(np.float32)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
    """``softmax(q k^T / sqrt(H)) v`` for q (B, T, N, H), k and v (B, S, N, H), optional bool mask
    broadcastable to (B, N, T, S) (False = masked out). Returns (B, T, N, H).

    On GPU/TPU this is ``jax.nn.dot_product_attention(implementation=None)`` (fused kernels where the
    backend has them). On CPU the same math runs heads-major: q, k, v are moved to (B*N, T, H) once, the
    two products are plain batched matmuls, and optimisation barriers keep XLA from fusing the softmax
    into them. XLA:CPU runs the generic path's (B, T, N, H)-layout products at ~40 GFLOP/s against ~400
    for a 2048^2 matmul (``benchmarks/bench_kernels.py``), and fused matmul+reduction kernels were slower
    still; on the DiT-S/2 train step (batch 32, 32x32x4) this path measured 8.6-9.0 s/step against
    10.6-10.7 s/step, back to back in one process.
    """
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)
    batch, tq, heads, dim = q.shape
    ts = k.shape[1]
    acc = jnp.promote_types(q.dtype, jnp.float32)   # logits and softmax in at least float32
    qh = jnp.swapaxes(q, 1, 2).reshape(batch * heads, tq, dim)
    kh = jnp.swapaxes(k, 1, 2).reshape(batch * heads, ts, dim)
    vh = jnp.swapaxes(v, 1, 2).reshape(batch * heads, ts, dim)
    qh, kh, vh = jax.lax.optimization_barrier((qh, kh, vh))
    logits = jax.lax.dot_general(qh, kh, (((2,), (2,)), ((0,), (0,))), preferred_element_type=acc)
    logits = jax.lax.optimization_barrier(logits).reshape(batch, heads, tq, ts) * (1.0 / math.sqrt(dim))
    if mask is not None:
        logits = jnp.where(jnp.broadcast_to(mask, logits.shape), logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(batch * heads, tq, ts)
    out = jax.lax.dot_general(jax.lax.optimization_barrier(probs), vh, (((2,), (1,)), ((0,), (0,))))
    return jnp.swapaxes(jax.lax.optimization_barrier(out).reshape(batch, heads, tq, dim), 1, 2)


class Attention(nn.Module):
    """Multi-head attention ``softmax(q k^T / sqrt(d)) v`` with separate q/k/v/out projections.

    Self-attention when ``context`` is None, else cross-attention from ``x`` (B, T, C) to ``context``
    (B, S, D) with an optional key mask (B, S) bool. With ``null_kv=True`` a learned null key/value is
    prepended to the context and never masked, so a fully masked context (the unconditional row of
    classifier-free guidance) attends to a learned "no text" token instead of averaging padding.
    The kernel is :func:`dot_product_attention`.
    """

    num_heads: int
    head_dim: int
    out_features: int
    use_bias: bool = True
    null_kv: bool = False
    dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    out_kernel_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        inner = self.num_heads * self.head_dim
        dense = lambda name, init=self.kernel_init: nn.Dense(  # noqa: E731
            inner, use_bias=self.use_bias, dtype=self.dtype, kernel_init=init, name=name)
        source = x if context is None else context
        batch = x.shape[0]
        q = dense_tokens(dense("to_q"), x).reshape(batch, x.shape[1], self.num_heads, self.head_dim)
        k = dense_tokens(dense("to_k"), source)
        v = dense_tokens(dense("to_v"), source)
        mask = None
        if context_mask is not None:
            mask = jnp.asarray(context_mask, bool)
        if self.null_kv:
            null_k = self.param("null_k", nn.initializers.normal(0.02), (inner,), jnp.float32)
            null_v = self.param("null_v", nn.initializers.normal(0.02), (inner,), jnp.float32)
            k = jnp.concatenate([jnp.broadcast_to(null_k.astype(k.dtype), (batch, 1, inner)), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(null_v.astype(v.dtype), (batch, 1, inner)), v], axis=1)
            if mask is not None:
                mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
        k = k.reshape(batch, k.shape[1], self.num_heads, self.head_dim)
        v = v.reshape(batch, v.shape[1], self.num_heads, self.head_dim)
        if mask is not None:
            mask = mask[:, None, None, :]
        out = dot_product_attention(q, k, v.astype(q.dtype), mask)
        out = out.reshape(batch, x.shape[1], inner)
        out_init = self.out_kernel_init or self.kernel_init
        return dense_tokens(nn.Dense(self.out_features, use_bias=self.use_bias, dtype=self.dtype,
                                     kernel_init=out_init, name="to_out"), out)


def check_groups(channels: int, num_groups: int, where: str) -> None:
    """Raise if GroupNorm with ``num_groups`` cannot split ``channels``."""
    if channels % num_groups:
        raise ValueError(f"{where}: {channels} channels are not divisible by norm_num_groups={num_groups}")


def parse_cond(cond: Mapping[str, Array] | None, batch: int, num_classes: int, text_dim: int,
               pooled_dim: int) -> tuple[Array | None, Array | None, Array | None, Array | None]:
    """Validate the conditioning dict and return ``(labels, text, text_mask, pooled)``.

    - ``label`` (B,) int: missing on a class-conditional model means the null class ``num_classes``
      (the unconditional path); given to a model with ``num_classes=0`` is an error.
    - ``text`` (B, L, text_dim) float with optional ``text_mask`` (B, L) bool (default all True):
      required when ``text_dim > 0``, an error otherwise.
    - ``pooled`` (B, pooled_dim) float: required when ``pooled_dim > 0``, an error otherwise.
    """
    cond = dict(cond or {})
    unknown = set(cond) - {"label", "text", "text_mask", "pooled"}
    if unknown:
        raise ValueError(f"unknown conditioning keys {sorted(unknown)}; accepted: label, text, text_mask, pooled")
    labels = cond.get("label")
    if num_classes > 0:
        if labels is None:
            labels = jnp.full((batch,), num_classes, jnp.int32)
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (batch,):
            raise ValueError(f"cond['label'] has shape {labels.shape}; expected ({batch},)")
    elif labels is not None:
        raise ValueError("cond['label'] was given but the model has num_classes=0; set num_classes > 0")
    text, mask = cond.get("text"), cond.get("text_mask")
    if text_dim > 0:
        if text is None:
            raise ValueError(f"the model was built with text_dim={text_dim} but cond has no 'text'; pass "
                             f"cond['text'] of shape (B, L, {text_dim}) (an all-False text_mask for no text)")
        if text.ndim != 3 or text.shape[0] != batch or text.shape[-1] != text_dim:
            raise ValueError(f"cond['text'] has shape {tuple(text.shape)}; expected ({batch}, L, {text_dim})")
        if mask is None:
            mask = jnp.ones(text.shape[:2], bool)
        if tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"cond['text_mask'] has shape {tuple(mask.shape)}; expected {tuple(text.shape[:2])}")
    elif text is not None:
        raise ValueError(f"cond['text'] of width {text.shape[-1]} was given but the model has text_dim=0")
    pooled = cond.get("pooled")
    if pooled_dim > 0:
        if pooled is None:
            raise ValueError(f"the model was built with pooled_dim={pooled_dim} but cond has no 'pooled'")
        if tuple(pooled.shape) != (batch, pooled_dim):
            raise ValueError(f"cond['pooled'] has shape {tuple(pooled.shape)}; expected ({batch}, {pooled_dim})")
    elif pooled is not None:
        raise ValueError(f"cond['pooled'] of width {pooled.shape[-1]} was given but the model has pooled_dim=0")
    return labels, text, mask, pooled


class ImageSizeError(ValueError):
    """The input's height or width is not a multiple of what the model needs (patch size, downsamplings)."""


def check_input(x: Array, c_noise: Array, in_channels: int, multiple: int, what: str) -> None:
    """Raise if ``x`` is not (B, H, W, in_channels) with H, W divisible by ``multiple``, or ``c_noise``
    is not (B,)."""
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C); got shape {tuple(x.shape)}")
    if x.shape[-1] != in_channels:
        raise ValueError(f"x has {x.shape[-1]} channels but the model expects in_channels={in_channels}")
    height, width = x.shape[1:3]
    if height % multiple or width % multiple:
        raise ImageSizeError(f"image size {height}x{width} is not divisible by {multiple} ({what})")
    if jnp.shape(c_noise) != (x.shape[0],):
        raise ValueError(f"c_noise has shape {tuple(jnp.shape(c_noise))}; expected ({x.shape[0]},)")
