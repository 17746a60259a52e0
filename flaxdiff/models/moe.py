"""Expert-choice mixture-of-experts feed-forward (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Tokens are routed within each example (a group is one example's T tokens), so an example's output never depends
on the other rows of the batch (classifier-free guidance rows and per-sample seeds stay independent).
With E experts and capacity factor c, every expert takes exactly ``k = round(c T / E)`` tokens (clipped to [1, T]):

    S = softmax(x W_g)                       (B, T, E)  gating over experts, per token
    G, I = top_k(S^T, k)                     (B, E, k)  each expert picks its k highest-scoring tokens
    P = one_hot(I, T)                        (B, E, k, T)
    x_in = P x                               (B, E, k, D)  dispatch (einsum)
    y_e = W2_e gelu(W1_e x_in_e + b1_e) + b2_e
    out_t = sum_{e, j} G_ej P_ejt y_ej       (B, T, D)  combine (einsum)

A token may be chosen by several experts or by none (then its MoE output is zero and the block's residual
carries it). With ``c = E`` every expert takes every token and ``out_t = sum_e S_te expert_e(x_t)``, a dense
mixture. Expert weights are stacked on a leading expert axis (``w1`` (E, D, H), ``b1`` (E, H), ``w2`` (E, H, D),
``b2`` (E, D)); dispatch and combine are einsums, so XLA partitions the expert axis when the params carry a
``NamedSharding`` over a mesh axis (:func:`expert_partition_spec`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

__all__ = ["ExpertChoiceMLP", "expert_capacity", "expert_choice_route", "expert_partition_spec", "EXPERT_PARAMS"]

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert ``k = round(capacity_factor * num_tokens / num_experts)``, clipped to [1, num_tokens]."""
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0")
    return int(min(num_tokens, max(1, round(capacity_factor * num_tokens / num_experts))))


def expert_choice_route(logits: Array, capacity: int) -> tuple[Array, Array, Array]:
    """Expert-choice routing of router ``logits`` (B, T, E).

    Returns ``(gates, indices, probs)``: ``probs = softmax(logits, axis=-1)`` (B, T, E); for each expert e the
    ``capacity`` tokens with the largest ``probs[:, :, e]``: ``indices`` (B, E, k) int32 (distinct per expert) and
    their ``gates = probs[b, indices, e]`` (B, E, k).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    gates, indices = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)
    return gates, indices.astype(jnp.int32), probs


def expert_partition_spec(name: str, ndim: int, axis: str = "fsdp") -> P:
    """PartitionSpec of an expert parameter: its leading expert axis over mesh ``axis`` (expert parallelism);
    the router and everything else are replicated (``P()``)."""
    return P(axis, *([None] * (ndim - 1))) if name in EXPERT_PARAMS else P()


class ExpertChoiceMLP(nn.Module):
    """Expert-choice MoE replacement of the transformer MLP: (B, T, D) -> (B, T, D) (see the module docstring)."""

    num_experts: int                 # E
    hidden_features: int             # H, each expert's MLP width
    capacity_factor: float = 2.0     # c: each expert takes round(c T / E) tokens
    dtype: Any = jnp.float32         # compute dtype; params are float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, tokens, width = x.shape
        experts, hidden = self.num_experts, self.hidden_features
        capacity = expert_capacity(tokens, experts, self.capacity_factor)
        logits = nn.Dense(experts, use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                          name="router")(x)
        gates, indices, _ = expert_choice_route(logits, capacity)
        xavier = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        w1 = self.param("w1", xavier, (experts, width, hidden), jnp.float32).astype(self.dtype)
        b1 = self.param("b1", nn.initializers.zeros, (experts, hidden), jnp.float32).astype(self.dtype)
        w2 = self.param("w2", xavier, (experts, hidden, width), jnp.float32).astype(self.dtype)
        b2 = self.param("b2", nn.initializers.zeros, (experts, width), jnp.float32).astype(self.dtype)
        dispatch = jax.nn.one_hot(indices, tokens, dtype=self.dtype)                       # (B, E, k, T)
        expert_in = jnp.einsum("bekt,btd->bekd", dispatch, x.astype(self.dtype))
        h = nn.gelu(jnp.einsum("bekd,edh->bekh", expert_in, w1) + b1[None, :, None, :], approximate=True)
        expert_out = jnp.einsum("bekh,ehd->bekd", h, w2) + b2[None, :, None, :]
        combine = dispatch * gates.astype(self.dtype)[..., None]                           # (B, E, k, T)
        return jnp.einsum("bekt,bekd->btd", combine, expert_out).reshape(batch, tokens, width)
