"""The training objective: exact-denoiser stationarity, weighting closed forms, densities, condition dropout."""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import losses, predictors, schedules
from flaxdiff.predictors import noise_level

MU, S0 = 0.3, 0.7  # x0 ~ N(MU, S0^2 I)


def _recover_t_and_x(predictor, schedule, network_input, c_noise):
    """Undo the predictor's input scaling and noise conditioning to get (t, x_t) back inside apply_fn."""
    if isinstance(predictor, predictors.EDMPredictor):
        t = schedule.t_from_log_snr(-8.0 * c_noise)
    else:
        t = c_noise / 1000.0
    level = noise_level(schedule, t)
    c_in = predictor.network_input(jnp.ones((t.shape[0], 1), network_input.dtype), level)[:, 0]
    return level, network_input / c_in.reshape((-1,) + (1,) * (network_input.ndim - 1))


def _exact_apply(predictor, schedule, data_std=S0):
    """apply_fn(scale, ...) = scale * F*, where F* = E[target | x_t] for Gaussian data N(MU, data_std^2 I)."""

    def apply_fn(scale, network_input, c_noise, cond):
        level, x_t = _recover_t_and_x(predictor, schedule, network_input, c_noise)
        a = level.alpha.reshape((-1, 1))
        s = level.sigma.reshape((-1, 1))
        x0_hat = MU + data_std**2 * a / (a**2 * data_std**2 + s**2) * (x_t - a * MU)
        eps_hat = (x_t - a * x0_hat) / s
        return scale * predictor.target(x0_hat, eps_hat, level)

    return apply_fn


def _scale_gradient_z(schedule, predictor, weighting, data_std):
    """z-score of d loss / d scale at scale = 1: its Monte Carlo mean over per-example gradients divided by the
    standard error of that mean. The exact denoiser makes the expectation exactly 0 (orthogonality of the MMSE
    residual), so |z| stays small; a wrong denoiser gives a large |z|."""
    time_sampler = losses.time_samplers.get("uniform", t_min=0.02, t_max=0.98)
    key_data, key_loss = jax.random.split(jax.random.key(0))
    x0 = MU + S0 * jax.random.normal(key_data, (16384, 4), jnp.float64)
    apply_fn = _exact_apply(predictor, schedule, data_std)

    def per_example_loss(scale):
        loss, metrics = losses.diffusion_loss(apply_fn, scale, x0, None, key_loss, schedule, predictor, weighting,
                                              time_sampler)
        return metrics["loss_per_example"], loss

    per_example_grad, loss_grad = jax.jacfwd(per_example_loss)(jnp.float64(1.0))
    per_example_grad = np.asarray(per_example_grad)
    assert float(loss_grad) == pytest.approx(per_example_grad.mean(), rel=1e-9)
    return per_example_grad.mean() / (per_example_grad.std() / np.sqrt(per_example_grad.size))


@pytest.mark.parametrize(
    "schedule_name, predictor_name, weighting_name",
    [(s, p, w) for s, p in itertools.product(schedules.available(), predictors.available())
     for w in ("uniform", "min_snr")],
)
def test_exact_denoiser_is_stationary(schedule_name, predictor_name, weighting_name, x64):
    """The loss gradient with respect to a scalar scale on the exact denoiser's output is 0 within Monte Carlo
    error (|z| < 4.5, i.e. a false alarm rate below 1e-5 per case)."""
    z = _scale_gradient_z(schedules.get(schedule_name), predictors.get(predictor_name),
                          losses.weightings.get(weighting_name), S0)
    assert abs(z) < 4.5, z


@pytest.mark.parametrize("schedule_name, predictor_name", [("cosine", "epsilon"), ("rectified_flow", "velocity"),
                                                            ("edm", "edm"), ("linear", "v"), ("ve", "x0")])
def test_wrong_denoiser_is_not_stationary(schedule_name, predictor_name, x64):
    """The same statistic detects a denoiser built for the wrong data variance."""
    z = _scale_gradient_z(schedules.get(schedule_name), predictors.get(predictor_name),
                          losses.weightings.get("uniform"), 1.6 * S0)
    assert abs(z) > 6, z


def _level(schedule_name, t):
    return noise_level(schedules.get(schedule_name), jnp.asarray(t, jnp.float64))


def test_min_snr_closed_forms(x64):
    gamma = 5.0
    weighting = losses.weightings.get("min_snr", gamma=gamma)
    t = np.linspace(0.02, 0.98, 25)
    level = _level("cosine_continuous", t)
    snr = np.cos(np.pi * t / 2) ** 2 / np.sin(np.pi * t / 2) ** 2
    clipped = np.minimum(snr, gamma)
    np.testing.assert_allclose(np.asarray(weighting(level, predictors.get("epsilon"))), clipped / snr, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(weighting(level, predictors.get("x0"))), clipped, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(weighting(level, predictors.get("v"))), clipped / (snr + 1), rtol=1e-10)
    rf_level = _level("rectified_flow", t)
    rf_snr = (1 - t) ** 2 / t**2
    np.testing.assert_allclose(np.asarray(weighting(rf_level, predictors.get("velocity"))),
                               np.minimum(rf_snr, gamma) * t**2, rtol=1e-10)


def test_other_weightings_closed_forms(x64):
    t = np.linspace(0.02, 0.98, 25)
    level = _level("cosine_continuous", t)
    snr = np.cos(np.pi * t / 2) ** 2 / np.sin(np.pi * t / 2) ** 2
    eps = predictors.get("epsilon")
    np.testing.assert_allclose(np.asarray(losses.weightings.get("snr")(level, eps)), 1.0, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(losses.weightings.get("uniform")(level, predictors.get("x0"))), 1.0)
    np.testing.assert_allclose(np.asarray(losses.weightings.get("p2", gamma=1.0, k=1.0)(level, eps)), 1 / (1 + snr),
                               rtol=1e-10)
    edm_level = _level("edm", t)
    np.testing.assert_allclose(np.asarray(losses.weightings.get("edm")(edm_level, predictors.get("edm"))), 1.0,
                               rtol=1e-10)
    sigma = np.asarray(edm_level.sigma)
    np.testing.assert_allclose(np.asarray(losses.weightings.get("edm").x0_weight(edm_level)),
                               (sigma**2 + 0.25) / (sigma * 0.5) ** 2, rtol=1e-10)


def test_time_sampler_moments():
    key = jax.random.key(42)
    n = 200_000
    schedule = schedules.get("ve", sigma_min=1e-4, sigma_max=1e4)
    t = losses.time_samplers.get("logit_normal", loc=0.5, scale=0.8).sample(key, n, schedule)
    logit = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
    assert logit.mean() == pytest.approx(0.5, abs=0.01) and logit.std() == pytest.approx(0.8, abs=0.01)
    t = losses.time_samplers.get("edm_lognormal").sample(key, n, schedule)
    log_sigma = np.log(np.asarray(schedule.sigma(t), np.float64))
    assert log_sigma.mean() == pytest.approx(-1.2, abs=0.01) and log_sigma.std() == pytest.approx(1.2, abs=0.01)
    t = np.asarray(losses.time_samplers.get("uniform", t_min=0.2, t_max=0.6).sample(key, n, schedule))
    assert t.min() >= 0.2 and t.max() <= 0.6
    assert t.mean() == pytest.approx(0.4, abs=0.002) and t.std() == pytest.approx(0.4 / np.sqrt(12), abs=0.002)
    discrete = schedules.get("linear", num_timesteps=50)
    t = np.asarray(losses.time_samplers.get("discrete").sample(key, n, discrete))
    idx = t * 50
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-4)
    assert idx.min() == pytest.approx(1) and idx.max() == pytest.approx(50)
    assert idx.mean() == pytest.approx(25.5, abs=0.1)


def test_condition_dropout():
    labels = jnp.arange(1000) % 10
    text = jnp.ones((1000, 3, 2))
    cond = {"label": labels, "text": text, "text_mask": jnp.ones((1000, 3), bool)}
    out, mask = losses.drop_conditions(jax.random.key(0), cond, 0.25, {"label": 10})
    mask = np.asarray(mask)
    assert mask.mean() == pytest.approx(0.25, abs=0.04)
    np.testing.assert_array_equal(np.asarray(out["label"])[mask], 10)
    np.testing.assert_array_equal(np.asarray(out["label"])[~mask], np.asarray(labels)[~mask])
    np.testing.assert_array_equal(np.asarray(out["text"])[mask], 0.0)
    np.testing.assert_array_equal(np.asarray(out["text"])[~mask], 1.0)
    np.testing.assert_array_equal(np.asarray(out["text_mask"]), True)
    none_dropped, mask0 = losses.drop_conditions(jax.random.key(0), cond, 0.0, {"label": 10})
    np.testing.assert_array_equal(np.asarray(none_dropped["label"]), np.asarray(labels))
    assert not np.asarray(mask0).any()
    with pytest.raises(ValueError, match=r"needs null_cond\['label'\]"):
        losses.drop_conditions(jax.random.key(0), {"label": labels}, 0.5)
    with pytest.raises(ValueError, match=r"prob=1.5 is outside \[0, 1\]"):
        losses.drop_conditions(jax.random.key(0), cond, 1.5, {"label": 10})


def test_loss_mask_and_metrics():
    schedule, predictor = schedules.get("rectified_flow"), predictors.get("velocity")
    x0 = jnp.ones((4, 2, 2, 1))

    def apply_fn(params, x, c, cond):
        return jnp.zeros_like(x).at[:, 0].set(1e6)  # huge error only in row 0 of each image

    mask = jnp.zeros((4, 2, 2, 1)).at[:, 1].set(1.0)
    _, metrics = losses.diffusion_loss(apply_fn, None, x0, None, jax.random.key(0), schedule, predictor,
                                       losses.weightings.get("uniform"), losses.time_samplers.get("uniform"),
                                       loss_mask=mask)
    assert float(metrics["mse_per_example"].max()) < 100.0
    assert metrics["loss_per_example"].shape == (4,) and metrics["t"].shape == (4,)


def test_loss_is_jittable_and_deterministic():
    schedule, predictor = schedules.get("cosine"), predictors.get("epsilon")
    x0 = jax.random.normal(jax.random.key(1), (6, 4, 4, 1))

    def apply_fn(params, x, c, cond):
        return params * x

    fn = jax.jit(lambda p, k: losses.diffusion_loss(apply_fn, p, x0, None, k, schedule, predictor,
                                                    losses.weightings.get("min_snr"),
                                                    losses.time_samplers.get("discrete"))[0])
    assert float(fn(0.5, jax.random.key(3))) == float(fn(0.5, jax.random.key(3)))
    assert float(fn(0.5, jax.random.key(3))) != float(fn(0.5, jax.random.key(4)))


@pytest.mark.parametrize("registry", [losses.time_samplers, losses.weightings])
def test_registry_config_round_trip(registry):
    for name in registry.available():
        member = registry.get(name)
        assert registry.from_config(json.loads(json.dumps(member.to_config()))) == member


def test_errors():
    with pytest.raises(ValueError, match="unknown loss weighting 'minsnr'; available: edm, min_snr, p2, snr"):
        losses.weightings.get("minsnr")
    with pytest.raises(ValueError, match="unknown time sampler 'normal'; available: discrete, edm_lognormal"):
        losses.time_samplers.get("normal")
    with pytest.raises(ValueError, match=r"t_min=-0.1, t_max=1.0"):
        losses.time_samplers.get("uniform", t_min=-0.1)
    with pytest.raises(ValueError, match="gamma=0.0 must be > 0"):
        losses.weightings.get("min_snr", gamma=0.0)
    with pytest.raises(ValueError, match="needs num_timesteps for schedule 'rectified_flow'"):
        losses.time_samplers.get("discrete").sample(jax.random.key(0), 4, schedules.get("rectified_flow"))
