"""The shared predictor battery: every schedule x every predictor, with no per-member test code."""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import predictors, schedules
from flaxdiff.predictors import noise_level

PAIRS = list(itertools.product(schedules.available(), predictors.available()))
T_VALUES = (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)


def _t_grid():
    return jnp.asarray(T_VALUES, jnp.float64)


def _forward(schedule, t, key=0, shape=(8, 5)):
    k0, k1 = jax.random.split(jax.random.key(key))
    x0 = jax.random.normal(k0, (t.shape[0],) + shape, jnp.float64)
    eps = jax.random.normal(k1, x0.shape, jnp.float64)
    level = noise_level(schedule, t)
    x_t = level.alpha[:, None, None] * x0 + level.sigma[:, None, None] * eps
    return x0, eps, x_t, level


@pytest.mark.parametrize("schedule_name, predictor_name", PAIRS)
def test_target_round_trip(schedule_name, predictor_name, x64):
    schedule, predictor = schedules.get(schedule_name), predictors.get(predictor_name)
    x0, eps, x_t, level = _forward(schedule, _t_grid())
    target = predictor.target(x0, eps, level)
    x0_hat, eps_hat = predictor.to_x0_eps(target, x_t, level)
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=1e-8, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("schedule_name, predictor_name", PAIRS)
def test_x0_error_scale(schedule_name, predictor_name, x64):
    """||x0_hat - x0||^2 = k ||F - target||^2 for a perturbed output."""
    schedule, predictor = schedules.get(schedule_name), predictors.get(predictor_name)
    x0, eps, x_t, level = _forward(schedule, _t_grid())
    target = predictor.target(x0, eps, level)
    delta = jax.random.normal(jax.random.key(7), target.shape, jnp.float64)
    x0_hat, _ = predictor.to_x0_eps(target + delta, x_t, level)
    lhs = jnp.sum((x0_hat - x0) ** 2, axis=(1, 2))
    rhs = predictor.x0_error_scale(level) * jnp.sum(delta**2, axis=(1, 2))
    np.testing.assert_allclose(np.asarray(lhs), np.asarray(rhs), rtol=1e-8)


@pytest.mark.parametrize("name", predictors.available())
def test_config_round_trip(name):
    predictor = predictors.get(name)
    assert predictors.from_config(json.loads(json.dumps(predictor.to_config()))) == predictor


def test_edm_matches_karras_table_1(x64):
    """On a VE schedule the coefficients are exactly EDM's Table 1 column."""
    sigma_data = 0.5
    predictor = predictors.get("edm", sigma_data=sigma_data)
    schedule = schedules.get("edm")
    t = _t_grid()
    level = noise_level(schedule, t)
    sigma = np.asarray(schedule.sigma(t))
    c_skip, c_out, c_in = (np.asarray(c) for c in predictor.coefficients(level))
    np.testing.assert_allclose(c_skip, sigma_data**2 / (sigma**2 + sigma_data**2), rtol=1e-12)
    np.testing.assert_allclose(c_out, sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2), rtol=1e-12)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sigma_data**2), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(predictor.c_noise(level)), np.log(sigma) / 4, rtol=1e-12)
    x = jnp.ones((t.shape[0], 3), jnp.float64)
    np.testing.assert_allclose(np.asarray(predictor.network_input(x, level)), c_in[:, None] * np.ones((1, 3)))
    out = jnp.full_like(x, 2.0)
    x0_hat, _ = predictor.to_x0_eps(out, x, level)
    np.testing.assert_allclose(np.asarray(x0_hat), (c_skip + 2 * c_out)[:, None] * np.ones((1, 3)), rtol=1e-12)


def test_edm_on_vp_uses_ve_equivalent_level(x64):
    """On a VP schedule EDM acts on x~ = x_t / alpha at s = sigma / alpha."""
    sigma_data = 0.5
    predictor = predictors.get("edm", sigma_data=sigma_data)
    schedule = schedules.get("cosine")
    level = noise_level(schedule, _t_grid())
    alpha, sig = np.asarray(level.alpha), np.asarray(level.sigma)
    s = sig / alpha
    x_t = jnp.asarray(np.linspace(-1, 1, _t_grid().shape[0])[:, None], jnp.float64)
    x_ve = np.asarray(x_t) / alpha[:, None]
    np.testing.assert_allclose(np.asarray(predictor.network_input(x_t, level)),
                               x_ve / np.sqrt(s**2 + sigma_data**2)[:, None], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(predictor.c_noise(level)), np.log(s) / 4, rtol=1e-10)
    x0_hat, _ = predictor.to_x0_eps(jnp.zeros_like(x_t), x_t, level)
    np.testing.assert_allclose(np.asarray(x0_hat), (sigma_data**2 / (s**2 + sigma_data**2))[:, None] * x_ve,
                               rtol=1e-10)


def test_edm_c_noise_finite_at_zero_alpha():
    predictor = predictors.get("edm")
    level = noise_level(schedules.get("rectified_flow"), jnp.asarray([1.0]))
    assert bool(jnp.isfinite(predictor.c_noise(level)).all())
    x0_hat, _ = predictor.to_x0_eps(jnp.ones((1, 4)), jnp.ones((1, 4)), level)
    assert bool(jnp.isfinite(x0_hat).all())


@pytest.mark.parametrize("schedule_name", schedules.available())
def test_velocity_is_time_derivative(schedule_name, x64):
    """velocity target = d x_t / dt for fixed (x0, eps), by central finite differences."""
    schedule = schedules.get(schedule_name)
    predictor = predictors.get("velocity")
    t = jnp.asarray([0.2137, 0.5031, 0.7777], jnp.float64)
    x0, eps, _, level = _forward(schedule, t)
    h = 1e-6

    def x_at(tt):
        a, s = schedule.alpha_sigma(tt)
        return a[:, None, None] * x0 + s[:, None, None] * eps

    finite_diff = (x_at(t + h) - x_at(t - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(predictor.target(x0, eps, level)), np.asarray(finite_diff), rtol=1e-5,
                               atol=1e-6)


def test_v_target_on_vp_is_salimans_ho(x64):
    schedule = schedules.get("cosine_continuous")
    x0, eps, _, level = _forward(schedule, _t_grid())
    a, s = level.alpha[:, None, None], level.sigma[:, None, None]
    np.testing.assert_allclose(np.asarray(predictors.get("v").target(x0, eps, level)), np.asarray(a * eps - s * x0),
                               rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match=r"unknown predictor 'eps'; available: edm, epsilon, v, velocity, x0"):
        predictors.get("eps")
    with pytest.raises(ValueError, match=r"sigma_data=-1.0 must be > 0"):
        predictors.get("edm", sigma_data=-1.0)
