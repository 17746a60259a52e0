"""flaxdiff.models.layers helpers: dense_tokens is Dense over flattened tokens (same numbers, no layout copies)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.models import layers


class _Proj(nn.Module):
    flat: bool

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(24, name="proj")
        return layers.dense_tokens(dense, x) if self.flat else dense(x)


def _layout_copies(flat: bool, x: jax.Array) -> int:
    """Copy instructions (plain or fused) in the compiled entry computation of the weight gradient."""
    model = _Proj(flat)
    params = model.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2)))
    text = grad.lower(params, x).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return len(re.findall(r"^\s*(?:ROOT )?%copy[\w.]* = ", entry, re.MULTILINE))


def test_dense_tokens_matches_dense_with_the_same_params():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5, 16))
    flat, plain = _Proj(True), _Proj(False)
    params = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, flat.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, params)
    out = flat.apply(params, x)
    assert out.shape == (2, 3, 5, 24)
    np.testing.assert_allclose(out, plain.apply(params, x), rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params) for m in (flat, plain)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)


def test_dense_tokens_weight_gradient_needs_no_transposed_copy_on_cpu():
    x = jax.random.normal(jax.random.PRNGKey(2), (16, 64, 128))
    assert _layout_copies(False, x) > 0   # the transposed copy that dense_tokens exists to avoid
    assert _layout_copies(True, x) == 0
