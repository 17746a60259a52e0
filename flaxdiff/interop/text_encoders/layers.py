"""Layers shared by the CLIP, OpenCLIP and T5 text encoders: activations by their torch names, exact LayerNorm,
multi-head attention through ``jax.nn.dot_product_attention``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxdiff.models import layers as model_layers

Array = jax.Array

__all__ = ["ACTIVATIONS", "activation", "attention", "resolve_dtype"]


def _quick_gelu(x: Array) -> Array:
    """``x * sigmoid(1.702 x)`` (OpenAI CLIP)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_tanh(x: Array) -> Array:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


#: torch / transformers activation names -> functions.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation called ``name`` in transformers' ``ACT2FN``; ValueError for others."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; accepted: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def resolve_dtype(name: str) -> Any:
    """"float32" / "bfloat16" / "float16" -> jnp dtype (ValueError otherwise)."""
    return model_layers.resolve_dtype(name)


def layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with the two-pass variance of torch, statistics in float32."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=dtype, use_fast_variance=False, name=name)


def attention(q: Array, k: Array, v: Array, scale: float, bias: Array | None = None,
              mask: Array | None = None) -> Array:
    """``softmax(scale q k^T + bias, masked) v`` over heads: q, k, v (B, L, H, Dh); bias (B|1, H|1, L, L) additive;
    mask (B|1, 1, L, L) bool, True = attend. Softmax in float32."""
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
