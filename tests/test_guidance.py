"""Classifier-free guidance: one batched forward, the x0 combination, the guidance interval, null conditions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import guidance, samplers, schedules

NUM_CLASSES = 3
MEANS = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])  # last row: the null class


def class_denoiser(calls):
    """D(x, s, cond) = m_label + 0.25^2 / (0.25^2 + s^2) (x - m_label); records each call's batch size."""

    def denoise(x, sigma, cond):
        calls.append(x.shape[0])
        mean = MEANS[cond["label"]]
        k = (0.0625 / (0.0625 + sigma**2))[:, None]
        return mean + k * (x - mean)

    return denoise


def test_guided_denoiser_is_one_batched_call_and_combines_x0():
    calls = []
    inner = class_denoiser(calls)
    x = jnp.array([[0.3, -0.2], [1.0, 2.0]])
    sigma = jnp.array([0.5, 2.0])
    cond = {"label": jnp.array([0, 2])}
    guided = guidance.guided_denoiser(inner, 3.0, {"label": NUM_CLASSES})
    out = guided(x, sigma, cond)
    assert calls == [4]
    x0_c = inner(x, sigma, cond)
    x0_u = inner(x, sigma, {"label": jnp.array([NUM_CLASSES, NUM_CLASSES])})
    np.testing.assert_allclose(out, x0_u + 3.0 * (x0_c - x0_u), rtol=1e-6)


def test_guidance_interval_switches_guidance_off_outside():
    inner = class_denoiser([])
    x = jnp.ones((3, 2))
    sigma = jnp.array([0.1, 1.0, 10.0])
    cond = {"label": jnp.array([1, 1, 1])}
    guided = guidance.guided_denoiser(inner, 4.0, {"label": NUM_CLASSES}, interval=(0.5, 5.0))
    out = guided(x, sigma, cond)
    x0_c = inner(x, sigma, cond)
    x0_u = inner(x, sigma, {"label": jnp.full((3,), NUM_CLASSES)})
    np.testing.assert_allclose(out[0], x0_c[0], rtol=1e-6)
    np.testing.assert_allclose(out[2], x0_c[2], rtol=1e-6)
    np.testing.assert_allclose(out[1], (x0_u + 4.0 * (x0_c - x0_u))[1], rtol=1e-6)
    np.testing.assert_array_equal(guidance.guidance_weight(sigma, 4.0, (0.5, 5.0)), [1.0, 4.0, 1.0])


def test_null_condition_and_errors():
    null = guidance.null_condition({"label": jnp.array([0, 2]), "text": jnp.ones((2, 4))}, num_classes=10)
    np.testing.assert_array_equal(null["label"], [10, 10])
    np.testing.assert_array_equal(null["text"], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="num_classes"):
        guidance.null_condition({"label": jnp.array([1])})
    with pytest.raises(ValueError, match=r"guidance_interval=\(2.0, 1.0\)"):
        guidance.check_interval((2.0, 1.0))


def test_sample_model_with_cfg_counts_one_forward_per_evaluation():
    schedule = schedules.get("ve", sigma_min=0.002, sigma_max=80.0)
    calls = []

    def apply_fn(params, net_in, c_noise, cond):
        jax.debug.callback(lambda: calls.append(1))
        mean = MEANS[cond["label"]] * params
        return jnp.broadcast_to(mean, net_in.shape)

    cond = {"label": jnp.array([0, 1, 2, 0])}
    noise = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
    x, nfe = samplers.sample_model(apply_fn, 1.0, schedule, "x0", noise=noise, cond=cond, sampler="heun",
                                   steps=4, guidance_scale=2.0, null_cond={"label": NUM_CLASSES})
    jax.effects_barrier()
    assert len(calls) == int(nfe) == 7
    # x0 predictor returning the class mean: guided x0 = m_null + 2 (m_c - m_null), and the last step returns it.
    np.testing.assert_allclose(x, 2.0 * MEANS[cond["label"]] - MEANS[NUM_CLASSES], atol=1e-5)
    with pytest.raises(ValueError, match="null_cond"):
        samplers.sample_model(apply_fn, 1.0, schedule, "x0", noise=noise, cond=cond, guidance_scale=2.0)


def test_guidance_interval_runs_the_null_rows_only_inside():
    batches = []

    def inner(x, sigma, cond):
        jax.debug.callback(lambda: batches.append(x.shape[0]))   # fires only in the branch that runs
        return class_denoiser([])(x, sigma, cond)

    guided = jax.jit(guidance.guided_denoiser(inner, 4.0, {"label": NUM_CLASSES}, interval=(0.5, 5.0)))
    x = jnp.array([[0.3, -0.2], [1.0, 2.0], [-0.5, 0.5]])
    cond = {"label": jnp.array([0, 1, 2])}
    outside = jnp.full((3,), 10.0)
    out = guided(x, outside, cond)
    jax.effects_barrier()
    assert batches == [3]   # the conditional rows alone
    np.testing.assert_array_equal(out, jax.jit(inner)(x, outside, cond))
    batches.clear()
    mixed = jnp.array([0.1, 1.0, 10.0])
    out = guided(x, mixed, cond)
    jax.effects_barrier()
    assert batches == [6]   # one row inside: conditional and null rows in one call
    x0_c = inner(x, mixed, cond)
    x0_u = inner(x, mixed, {"label": jnp.full((3,), NUM_CLASSES)})
    np.testing.assert_allclose(out, x0_u + guidance.guidance_weight(mixed, 4.0, (0.5, 5.0))[:, None] * (x0_c - x0_u),
                               rtol=1e-6)
