"""Tests of the KL autoencoder (flaxdiff.models.autoencoder)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from sklearn.datasets import load_digits

from flaxdiff import models
from flaxdiff.models import autoencoder

INIT_KEY = jax.random.key(0, impl="unsafe_rbg")
TRAIN_STEPS = 100
RECON_MSE = 0.02   # reconstruction MSE (images in [-1, 1], pixel variance 0.55) required; measured 0.0074
KL_WEIGHT = 1e-4


@pytest.fixture(scope="module")
def digits():
    images = load_digits().images[:8] / 16.0 * 2.0 - 1.0
    return jnp.asarray(np.kron(images, np.ones((2, 2)))[..., None], jnp.float32)


@pytest.fixture(scope="module")
def trained(digits):
    """autoencoder-tiny (f4, 4 latent channels) after TRAIN_STEPS adam steps on 8 digits."""
    model = models.get("autoencoder-tiny")
    params = jax.jit(lambda x: model.init({"params": INIT_KEY, "sample": INIT_KEY}, x)["params"])(digits)
    opt = optax.adam(2e-3)

    def loss(params, key):
        recon, mean, logvar = model.apply({"params": params}, digits, rngs={"sample": key})
        return jnp.mean((recon - digits) ** 2) + KL_WEIGHT * jnp.mean(autoencoder.kl_divergence(mean, logvar))

    loss_and_grad = jax.jit(jax.value_and_grad(loss))

    @jax.jit
    def update(params, grads, opt_state):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for key in jax.random.split(jax.random.key(1), TRAIN_STEPS):
        params, opt_state = update(params, loss_and_grad(params, key)[1], opt_state)
    return model, params


def test_reconstruction_after_short_training(trained, digits):
    model, params = trained
    recon, mean, logvar = jax.jit(lambda p: model.apply({"params": p}, digits, sample_posterior=False))(params)
    assert recon.shape == digits.shape and mean.shape == logvar.shape == (8, 4, 4, 4)
    mse = float(jnp.mean((recon - digits) ** 2))
    assert mse < RECON_MSE, mse
    assert mse < 0.2 * float(jnp.var(digits))   # far better than predicting the mean image
    kl = np.asarray(autoencoder.kl_divergence(mean, logvar))
    assert kl.shape == (8,) and np.all(np.isfinite(kl)) and np.all(kl > 0)


def test_latent_scale_is_inverse_std(trained, digits):
    model, params = trained
    mean, _ = autoencoder._encode(model, params, digits)
    scale = models.estimate_latent_scale(model, params, digits)
    assert scale == pytest.approx(1.0 / float(np.std(np.asarray(mean))), rel=1e-5)
    assert model.estimate_latent_scale(params, digits) == scale
    config = model.config.replace(scaling_factor=scale, shift_factor=0.3)
    scaled = models.scale_latents(config, mean)
    assert float(jnp.std(scaled)) == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(models.unscale_latents(config, scaled), mean, rtol=1e-5, atol=1e-5)
    sampled = models.estimate_latent_scale(model, params, digits, key=jax.random.key(2))
    assert 0 < sampled <= scale * 1.01   # posterior noise can only widen the latents (up to sampling error)


def test_kl_closed_form():
    mean = jnp.array([[[[0.0, 1.0]]], [[[0.5, -0.5]]]])
    logvar = jnp.array([[[[0.0, 0.0]]], [[[jnp.log(2.0), 0.0]]]])
    expected = [0.5 * 1.0, 0.5 * (0.25 + 2.0 - 1.0 - np.log(2.0) + 0.25)]
    np.testing.assert_allclose(autoencoder.kl_divergence(mean, logvar), expected, rtol=1e-6)


def test_stable_diffusion_layout():
    model = models.get("autoencoder")
    shapes = jax.eval_shape(model.init, {"params": INIT_KEY, "sample": INIT_KEY},
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
    assert models.count_params(shapes) == 83_653_863   # diffusers' SD AutoencoderKL
    flat = flatten_dict(shapes)
    assert len(flat) == 248                            # tensors in the diffusers state dict
    for key, shape in [
        ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", (1, 1, 128, 256)),
        ("encoder.down_blocks.0.downsamplers.0.conv.weight", (3, 3, 128, 128)),
        ("encoder.mid_block.attentions.0.to_out.0.weight", (512, 512)),
        ("encoder.mid_block.attentions.0.group_norm.weight", (512,)),
        ("decoder.up_blocks.3.resnets.2.norm2.bias", (128,)),
        ("decoder.up_blocks.0.upsamplers.0.conv.weight", (3, 3, 512, 512)),
        ("quant_conv.weight", (1, 1, 8, 8)),
        ("post_quant_conv.bias", (4,)),
        ("decoder.conv_norm_out.weight", (128,)),
    ]:
        path, name = autoencoder.flax_path_from_diffusers(key)
        assert flat[path + (name,)].shape == shape, key
    with pytest.raises(ValueError, match="must end in .weight or .bias"):
        autoencoder.flax_path_from_diffusers("encoder.conv_in.running_mean")


def test_downsampling_factor_8_and_errors():
    model = models.get("autoencoder-tiny", block_out_channels=(8, 16, 16, 16), latent_channels=6)
    x = jax.ShapeDtypeStruct((2, 32, 24, 1), jnp.float32)
    mean, logvar = jax.eval_shape(lambda x: model.init_with_output(
        {"params": INIT_KEY}, x, method=models.AutoencoderKL.encode)[0], x)
    assert mean.shape == logvar.shape == (2, 4, 3, 6)
    with pytest.raises(ValueError, match="image size 20x24 is not divisible by 8"):
        jax.eval_shape(lambda x: model.init({"params": INIT_KEY}, x, False),
                       jax.ShapeDtypeStruct((2, 20, 24, 1), jnp.float32))
    with pytest.raises(ValueError, match="x has 3 channels but the model expects in_channels=1"):
        jax.eval_shape(lambda x: model.init({"params": INIT_KEY}, x, False),
                       jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"z has shape \(2, 2, 2, 4\); expected \(B, h, w, 6\)"):
        jax.eval_shape(lambda z: model.init({"params": INIT_KEY}, z, method=models.AutoencoderKL.decode),
                       jax.ShapeDtypeStruct((2, 2, 2, 4), jnp.float32))
