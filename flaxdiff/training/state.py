"""The train state: one pytree of global arrays, everything an exact resume needs.

    step n uses key_n = fold_in(rng, n);   ema_{n+1} = d_n ema_n + (1 - d_n) params_{n+1},
    d_n = min(decay, (1 + n) / (10 + n)) with warm-up, d_n = decay without.

Every leaf (including optax's step count and the counters) is a jax.Array placed on the mesh, so orbax can save it
from any number of processes.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["TrainState", "ema_decay_at", "ema_update", "all_finite"]


@flax.struct.dataclass
class TrainState:
    """step: updates attempted so far (int32); rng: raw uint32[2] base key; bad_steps: non-finite steps skipped in
    total; consecutive_bad: the current run of them."""

    step: Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: Array
    bad_steps: Array
    consecutive_bad: Array


def ema_decay_at(step: Array, decay: float, warmup: bool) -> Array:
    """d_n = min(decay, (1 + n) / (10 + n)) if ``warmup`` else decay (n = number of updates before this one)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: Array) -> Any:
    """ema <- decay * ema + (1 - decay) * params, leafwise."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def all_finite(tree: Any) -> Array:
    """True iff every floating element of ``tree`` is finite (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
