"""Tests of masked DiT training (flaxdiff.models.masking): exact keep fraction, visible-only loss, patch mixer,
finetune at ratio 0 and progressive resolution with the same params."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from flaxdiff import losses, predictors, schedules
from flaxdiff import models
from flaxdiff.models import layers, masking

PIECES = (schedules.get("linear"), predictors.get("epsilon"), losses.weightings.get("uniform"),
          losses.time_samplers.get("uniform"))


def _perturbed_params(model, x):
    """Init params plus noise, so that the zero-initialised gates and final layer do not hide anything."""
    params = model.init(jax.random.key(0), x, jnp.zeros((x.shape[0],)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def digits():
    """8 fixed sklearn digits, 8x8 upsampled to 16x16, scaled to [-1, 1], shape (8, 16, 16, 1)."""
    images = load_digits().images[:8] / 16.0 * 2.0 - 1.0
    return jnp.asarray(np.kron(images, np.ones((2, 2)))[..., None], jnp.float32)


@pytest.mark.parametrize("ratio, kept", [(0.25, 12), (0.5, 8), (0.75, 4), (0.7, 5), (0.0, 16)])
def test_keep_indices_keep_exactly_the_stated_fraction(ratio, kept):
    indices = np.asarray(masking.keep_indices(jax.random.key(3), 64, 16, ratio))
    assert indices.shape == (64, kept) and masking.num_kept(16, ratio) == kept
    assert all(len(set(row)) == kept for row in indices.tolist())                 # distinct patches
    assert np.all(np.diff(indices, axis=1) > 0) and indices.min() >= 0 and indices.max() < 16
    mask = np.asarray(masking.keep_mask(jnp.asarray(indices), 16))
    np.testing.assert_array_equal(mask.sum(1), kept)
    if ratio > 0:
        assert len({tuple(row) for row in indices.tolist()}) > 32                 # examples draw their own masks
        np.testing.assert_array_equal(indices, masking.keep_indices(jax.random.key(3), 64, 16, ratio))
        assert not np.array_equal(indices, masking.keep_indices(jax.random.key(4), 64, 16, ratio))


def test_mask_ratio_errors():
    with pytest.raises(ValueError, match=r"mask_ratio=1.0 is outside \[0, 1\)"):
        masking.num_kept(16, 1.0)
    with pytest.raises(ValueError, match="mask_ratio=0.99 masks all 16 patches"):
        masking.num_kept(16, 0.99)
    with pytest.raises(ValueError, match=r"mask_ratio=-0.5 is outside"):
        model = models.get("dit-tiny", mask_ratio=-0.5)
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,))))


def test_gather_scatter_and_pixel_mask_follow_the_patch_layout():
    indices = jnp.asarray([[0, 5, 15], [1, 2, 3]])
    tokens = jnp.arange(2 * 16 * 2, dtype=jnp.float32).reshape(2, 16, 2)
    back = masking.scatter_tokens(masking.gather_tokens(tokens, indices), indices, 16)
    np.testing.assert_array_equal(back, tokens * masking.keep_mask(indices, 16)[..., None])
    mask = np.asarray(masking.pixel_loss_mask(indices, 16, 16, 4))[..., 0]       # 4x4 grid of 4x4 patches
    expected = np.zeros((2, 4, 4))
    expected[0].flat[[0, 5, 15]] = 1
    expected[1].flat[[1, 2, 3]] = 1
    np.testing.assert_array_equal(mask, np.kron(expected, np.ones((4, 4))))


def test_masked_backbone_sees_only_kept_patches_and_outputs_zero_elsewhere(digits):
    model = models.get("dit-tiny", mask_ratio=0.5)                                # no patch mixer
    x, c_noise, key = digits[:2], jnp.full((2,), 0.3), jax.random.key(7)
    params = _perturbed_params(model, x)
    apply = jax.jit(lambda v: model.apply({"params": params}, v, c_noise, train=True, mask_key=key))
    out = np.asarray(apply(x))
    visible = np.asarray(masking.pixel_loss_mask(masking.keep_indices(key, 2, 16, 0.5), 16, 16, 4))
    np.testing.assert_array_equal(out * (1 - visible), 0.0)
    assert np.all(out[visible > 0] != 0.0)                                       # kept patches have output
    changed = x + 5.0 * (1 - visible)                                             # edit masked pixels only
    np.testing.assert_array_equal(apply(changed), out)
    full = jax.jit(lambda v: model.apply({"params": params}, v, c_noise, train=False))(x)   # eval: never masked
    assert np.all(np.asarray(full) != 0.0)
    # the key comes from the 'mask' stream, else from 'dropout'
    by_stream = jax.jit(lambda v: model.apply({"params": params}, v, c_noise, train=True,
                                              rngs={"dropout": jax.random.key(1)}))(x)
    assert np.mean(np.asarray(by_stream) == 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs mask_key=... or a 'mask' or 'dropout' rng"):
        jax.eval_shape(lambda: model.apply({"params": params}, x, c_noise, train=True))


def test_loss_ignores_masked_targets_and_masked_outputs(digits):
    model = models.get("dit-tiny", mask_ratio=0.5)
    params = _perturbed_params(model, digits)
    key = jax.random.key(11)
    loss = jax.jit(lambda x0: masking.masked_diffusion_loss(model, params, x0, None, key, *PIECES))
    value, metrics = loss(digits)
    visible = masking.pixel_loss_mask(metrics["keep_indices"], 16, 16, 4)
    assert metrics["keep_indices"].shape == (8, 8)
    changed_value, _ = loss(digits + 3.0 * (1 - visible))    # x0 (and hence the target) changed at masked patches
    assert float(changed_value) == float(value)
    assert float(loss(digits + 3.0 * visible)[0]) != float(value)

    class Shifted:  # the model plus an output offset delta, to differentiate the loss w.r.t. the outputs
        config = models.get("dit-tiny", mask_ratio=0.5, patch_mixer_depth=1).config

        def __init__(self, delta):
            self.delta, self.module = delta, self.config.make()

        def apply(self, variables, *args, **kwargs):
            return self.module.apply(variables, *args, **kwargs) + self.delta

    mixer_params = _perturbed_params(Shifted.config.make(), digits)
    grad = jax.jit(jax.grad(lambda delta: masking.masked_diffusion_loss(
        Shifted(delta), mixer_params, digits, None, key, *PIECES)[0]))(jnp.zeros_like(digits))
    np.testing.assert_array_equal(np.asarray(grad) * (1 - np.asarray(visible)), 0.0)   # same key, same mask
    assert np.all(np.asarray(grad)[np.asarray(visible) > 0] != 0.0)


def test_position_embedding_rescaled_for_progressive_resolution():
    np.testing.assert_array_equal(masking.position_embedding(64, 4, 6), layers.sincos_2d(64, 4, 6))
    small = masking.position_embedding(64, 4, 4, base_grid=4)
    large = masking.position_embedding(64, 8, 8, base_grid=4)
    np.testing.assert_array_equal(small, layers.sincos_2d(64, 4, 4))
    np.testing.assert_allclose(large.reshape(8, 8, 64)[::2, ::2], small.reshape(4, 4, 64), atol=1e-6)


def _train(model, params, x0, steps, seed):
    """Adam on masked_diffusion_loss; returns (params, mean loss on 4 fixed draws before, after)."""
    opt = optax.adam(3e-3)
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p, key: masking.masked_diffusion_loss(model, p, x0, None, key, *PIECES)[0]))

    @jax.jit
    def update(p, grads, state):
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    def evaluate(p):
        return np.mean([float(loss_and_grad(p, jax.random.key(100 + i))[0]) for i in range(4)])

    before, state = evaluate(params), opt.init(params)
    for key in jax.random.split(jax.random.key(seed), steps):
        params, state = update(params, loss_and_grad(params, key)[1], state)
    return params, before, evaluate(params)


def test_masked_training_then_finetune_at_ratio_zero_and_double_resolution(digits):
    config = models.get_config("dit-tiny", mask_ratio=0.5, patch_mixer_depth=1, pos_embed_grid=4)
    masked = config.make()
    params = masked.init(jax.random.key(0), digits, jnp.zeros((8,)))["params"]
    params, before, after = _train(masked, params, digits, 30, seed=1)
    assert after < 0.8 * before, (before, after)
    # finetune phase: ratio 0, the same params, at 32x32 (progressive resolution)
    finetune = config.replace(mask_ratio=0.0).make()
    big = jnp.repeat(jnp.repeat(digits, 2, axis=1), 2, axis=2)
    assert jax.tree.map(jnp.shape, jax.eval_shape(finetune.init, jax.random.key(0), big, jnp.zeros((8,)))[
        "params"]) == jax.tree.map(jnp.shape, params)
    _, before_big, after_big = _train(finetune, params, big, 15, seed=2)
    assert after_big < before_big, (before_big, after_big)
