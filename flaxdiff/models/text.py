"""A small trainable text encoder with a byte-level tokenizer (no download), and the interface for
precomputed embeddings from any pretrained encoder.

Tokenizer: ``PAD = 0``, ``BOS = 1``, ``EOS = 2``, byte ``b`` -> ``b + 3`` (vocabulary 259). A text becomes
``[BOS, utf8 bytes..., EOS, PAD...]`` truncated to ``max_len`` (the EOS is kept).

Encoder: token + learned position embeddings, ``depth`` pre-LN transformer blocks with key-padding mask,
final LayerNorm. Returns ``(tokens (B, L, D), pooled (B, D), mask (B, L))`` with ``pooled`` the mean of
the unmasked token embeddings. Any diffusion model built with ``text_dim = D`` (and ``pooled_dim = D``
if pooled is used) takes these as ``cond = {"text": tokens, "text_mask": mask, "pooled": pooled}`` — or
embeddings from any other encoder via :func:`text_condition`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.models import layers
from flaxdiff.models.configs import ModelConfig

Array = jax.Array

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def tokenize(texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level tokenisation: ``(ids (N, max_len) int32, mask (N, max_len) bool)``."""
    if max_len < 2:
        raise ValueError(f"max_len={max_len} leaves no room for BOS and EOS; use max_len >= 2")
    if isinstance(texts, str):
        raise ValueError("tokenize expects a list of strings, got a single str; wrap it in a list")
    ids = np.full((len(texts), max_len), PAD_ID, np.int32)
    for row, text in enumerate(texts):
        body = np.frombuffer(text.encode("utf-8"), np.uint8)[: max_len - 2].astype(np.int32) + BYTE_OFFSET
        ids[row, 0] = BOS_ID
        ids[row, 1:1 + len(body)] = body
        ids[row, 1 + len(body)] = EOS_ID
    return ids, ids != PAD_ID


def detokenize(ids: np.ndarray) -> list[str]:
    """Inverse of :func:`tokenize` up to truncation: drop special tokens, decode the bytes as UTF-8."""
    out = []
    for row in np.asarray(ids):
        data = bytes(int(i) - BYTE_OFFSET for i in row if i >= BYTE_OFFSET)
        out.append(data.decode("utf-8", errors="replace"))
    return out


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig(ModelConfig):
    """Text encoder hyper-parameters (one line each)."""

    registry_name = "text_encoder"

    max_len: int = 64         # maximum token length (learned positions)
    width: int = 256          # embedding width D
    depth: int = 4            # transformer blocks
    num_heads: int = 4        # attention heads
    mlp_ratio: float = 4.0    # MLP hidden width / width
    dropout: float = 0.0      # dropout on attention/MLP outputs (train=True only)
    dtype: str = "float32"    # compute dtype; params are always float32

    def make(self) -> "TextEncoder":
        return TextEncoder(self)


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` with a key-padding mask."""

    width: int
    num_heads: int
    mlp_ratio: float
    dropout: float
    train: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        drop = nn.Dropout(self.dropout, deterministic=not self.train)
        h = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        h = layers.Attention(self.num_heads, self.width // self.num_heads, self.width, dtype=self.dtype,
                             name="attn")(h, h, mask)
        x = x + drop(h)
        h = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        h = nn.Dense(int(self.width * self.mlp_ratio), dtype=self.dtype, name="mlp_fc1")(h)
        h = nn.Dense(self.width, dtype=self.dtype, name="mlp_fc2")(nn.gelu(h))
        return x + drop(h)


class TextEncoder(nn.Module):
    """``apply({'params': p}, ids, mask, train=False) -> (tokens (B, L, D), pooled (B, D), mask (B, L))``."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, ids: Array, mask: Array | None = None, train: bool = False) -> tuple[Array, Array, Array]:
        cfg = self.config
        dtype = layers.resolve_dtype(cfg.dtype)
        if cfg.width % cfg.num_heads:
            raise ValueError(f"width={cfg.width} is not divisible by num_heads={cfg.num_heads}")
        if ids.ndim != 2 or ids.shape[1] > cfg.max_len:
            raise ValueError(f"ids have shape {tuple(ids.shape)}; expected (B, L) with L <= max_len={cfg.max_len}")
        ids = jnp.asarray(ids, jnp.int32)
        mask = (ids != PAD_ID) if mask is None else jnp.asarray(mask, bool)
        x = nn.Embed(VOCAB_SIZE, cfg.width, embedding_init=nn.initializers.normal(0.02), dtype=dtype,
                     name="token_embedding")(ids)
        positions = self.param("position_embedding", nn.initializers.normal(0.01), (cfg.max_len, cfg.width))
        x = x + positions[: ids.shape[1]].astype(dtype)[None]
        for index in range(cfg.depth):
            x = TransformerBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, train=train, dtype=dtype,
                                 name=f"blocks_{index}")(x, mask)
        x = nn.LayerNorm(dtype=dtype, name="final_norm")(x).astype(jnp.float32)
        weights = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return x, pooled, mask


def text_condition(tokens: Array, mask: Array | None = None, pooled: Array | None = None) -> dict[str, Array]:
    """Conditioning dict from precomputed text embeddings of any encoder (T5, CLIP, ... or ours).

    ``tokens`` (B, L, D); ``mask`` (B, L) bool (default all True); ``pooled`` (B, D') optional (default
    absent). The diffusion model must be built with ``text_dim = D`` (and ``pooled_dim = D'``).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"text embeddings must be (B, L, D); got shape {tuple(tokens.shape)}")
    mask = jnp.ones(tokens.shape[:2], bool) if mask is None else jnp.asarray(mask, bool)
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"text mask has shape {tuple(mask.shape)}; expected {tuple(tokens.shape[:2])}")
    cond = {"text": tokens, "text_mask": mask}
    if pooled is not None:
        pooled = jnp.asarray(pooled)
        if pooled.ndim != 2 or pooled.shape[0] != tokens.shape[0]:
            raise ValueError(f"pooled embedding has shape {tuple(pooled.shape)}; expected ({tokens.shape[0]}, D)")
        cond["pooled"] = pooled
    return cond


def encode_text(model: TextEncoder, params: Any, texts: Sequence[str]) -> dict[str, Array]:
    """Tokenise ``texts`` to ``model.config.max_len`` and encode them into a conditioning dict."""
    ids, mask = tokenize(texts, model.config.max_len)
    tokens, pooled, mask = _encode(model, params, jnp.asarray(ids), jnp.asarray(mask))
    return text_condition(tokens, mask, pooled)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: TextEncoder, params: Any, ids: Array, mask: Array) -> tuple[Array, Array, Array]:
    return model.apply({"params": params}, ids, mask)
