"""Parameter count and FLOPs per forward pass of a Linen module, without allocating parameters.

``params`` is the number of scalars in the ``params`` collection (from ``jax.eval_shape`` of ``init``);
``flops`` is XLA's cost analysis of the compiled forward,
``jax.jit(f).lower(params, *inputs).compile().cost_analysis()["flops"]`` (a multiply-add counts 2).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

_RNG_STREAMS = ("params", "dropout", "sample")


def _abstract(value: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), getattr(a, "dtype", np.asarray(a).dtype)),
                        value)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def summary(model: nn.Module, *example_inputs: Any, method: Callable[..., Any] | str | None = None,
            **apply_kwargs: Any) -> dict[str, float]:
    """``{"params": int, "flops": float}`` for ``model.apply({'params': p}, *example_inputs, **apply_kwargs)``.

    ``example_inputs`` may be arrays or ``jax.ShapeDtypeStruct``s (nothing is allocated either way); extra
    keyword arguments such as ``train=False`` are passed to the module. Non-array inputs (a conditioning dict
    of arrays is fine) are treated as pytrees.
    """
    inputs = _abstract(example_inputs)
    rngs = {name: jax.random.key(index) for index, name in enumerate(_RNG_STREAMS)}

    def init() -> Any:
        zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), inputs)
        return model.init(rngs, *zeros, method=method, **apply_kwargs)["params"]

    params = jax.eval_shape(init)

    def forward(p: Any, *args: Any) -> Any:
        return model.apply({"params": p}, *args, method=method, rngs={k: v for k, v in rngs.items() if k != "params"},
                           **apply_kwargs)

    cost = jax.jit(forward).lower(params, *inputs).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {"params": count_params(params), "flops": float((cost or {}).get("flops", 0.0))}
