"""The shared schedule battery: every registered schedule is checked here with no per-schedule test code."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import schedules

ALL = schedules.available()


def _grid(dtype=jnp.float32, n=2001):
    return jnp.linspace(0.0, 1.0, n, dtype=dtype)


@pytest.mark.parametrize("name", ALL)
def test_alpha_sigma_finite_and_in_range(name):
    sched = schedules.get(name)
    alpha, sigma = sched.alpha_sigma(_grid())
    assert bool(jnp.all(jnp.isfinite(alpha))) and bool(jnp.all(jnp.isfinite(sigma)))
    assert bool(jnp.all(alpha >= 0)) and bool(jnp.all(sigma >= 0))
    if sched.variance_preserving or name == "rectified_flow":
        assert bool(jnp.all(alpha <= 1)) and bool(jnp.all(sigma <= 1))
    if name in ("ve", "karras", "edm"):
        np.testing.assert_array_equal(np.asarray(alpha), 1.0)
        assert float(sigma.min()) == pytest.approx(sched.sigma_min, rel=1e-5)
        assert float(sigma.max()) == pytest.approx(sched.sigma_max, rel=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_strictly_decreasing(name, x64):
    sched = schedules.get(name)
    t = _grid(jnp.float64)[1:-1]
    log_snr = np.asarray(sched.log_snr(t))
    assert np.all(np.isfinite(log_snr))
    assert np.all(np.diff(log_snr) < 0), f"{name}: log-SNR is not strictly decreasing"


@pytest.mark.parametrize("name", ALL)
def test_log_snr_round_trip_float64(name, x64):
    sched = schedules.get(name)
    t = _grid(jnp.float64)[1:-1]
    back = sched.t_from_log_snr(sched.log_snr(t))
    assert back.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(back), np.asarray(t), atol=1e-6, rtol=0)
    back_ratio = sched.t_from_sigma_ratio(sched.sigma_ratio(t))
    np.testing.assert_allclose(np.asarray(back_ratio), np.asarray(t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_matches_alpha_sigma(name, x64):
    sched = schedules.get(name)
    t = _grid(jnp.float64)[1:-1]
    alpha, sigma = sched.alpha_sigma(t)
    np.testing.assert_allclose(np.asarray(sched.log_snr(t)), np.asarray(jnp.log(alpha**2 / sigma**2)), rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("name", [n for n in ALL if schedules.get(n).variance_preserving])
def test_variance_preserving(name, x64):
    alpha, sigma = schedules.get(name).alpha_sigma(_grid(jnp.float64))
    np.testing.assert_allclose(np.asarray(alpha**2 + sigma**2), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip(name):
    sched = schedules.get(name)
    config = json.loads(json.dumps(sched.to_config()))
    rebuilt = schedules.from_config(config)
    assert rebuilt == sched
    t = _grid()
    np.testing.assert_array_equal(np.asarray(rebuilt.log_snr(t)), np.asarray(sched.log_snr(t)))


def test_linear_matches_ddpm_table():
    sched = schedules.get("linear")
    betas, alpha_bar = sched.betas(), sched.alphas_cumprod()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert betas[499] == pytest.approx(1e-4 + 499 * (0.02 - 1e-4) / 999, rel=1e-12)
    # Ho et al. 2020: alpha_bar_T = 4.036e-5 for T = 1000, linear betas 1e-4 .. 0.02.
    assert alpha_bar[-1] == pytest.approx(4.0358e-5, rel=1e-3)
    # the continuous-time schedule is exact at t_i = i / T
    t = jnp.asarray([1, 250, 1000], jnp.float32) / 1000
    np.testing.assert_allclose(np.asarray(sched.alpha(t)) ** 2, alpha_bar[[0, 249, 999]], rtol=1e-5)


def test_cosine_matches_nichol_dhariwal():
    sched = schedules.get("cosine")
    s, T = 0.008, 1000

    def f(i):
        return math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2

    alpha_bar = sched.alphas_cumprod()
    for i in (1, 10, 500, 900):
        assert alpha_bar[i - 1] == pytest.approx(f(i) / f(0), rel=1e-9)
    assert sched.betas()[-1] == pytest.approx(0.999)  # the final beta is clipped at max_beta
    assert sched.betas()[0] == pytest.approx(1 - f(1) / f(0), rel=1e-12)


def test_sqrt_and_exp_tables():
    sqrt_sched = schedules.get("sqrt", num_timesteps=100)
    assert sqrt_sched.alphas_cumprod()[9] == pytest.approx((1 - math.sqrt(0.1 + 1e-4)) / (1 - math.sqrt(1e-4)),
                                                           rel=1e-9)
    exp_sched = schedules.get("exp", num_timesteps=10, beta_start=1e-3, beta_end=1e-1)
    np.testing.assert_allclose(exp_sched.betas(), np.geomspace(1e-3, 1e-1, 10), rtol=1e-12)


def test_zero_terminal_snr():
    plain = schedules.get("linear")
    ztsnr = schedules.get("linear", zero_terminal_snr=True)
    assert float(ztsnr.alpha(1.0)) == 0.0 and float(ztsnr.sigma(1.0)) == 1.0
    assert ztsnr.alphas_cumprod()[0] == pytest.approx(plain.alphas_cumprod()[0], rel=1e-9)
    assert float(ztsnr.log_snr(1.0)) == -math.inf


def test_rectified_flow_shift():
    shift = 3.0
    sched = schedules.get("rectified_flow", shift=shift)
    t = jnp.linspace(0.0, 1.0, 11)
    expected = shift * t / (1 + (shift - 1) * t)
    np.testing.assert_allclose(np.asarray(sched.sigma(t)), np.asarray(expected), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.alpha(t)), np.asarray(1 - expected), rtol=1e-6, atol=1e-7)


def test_karras_interpolation():
    sched = schedules.get("karras")
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    assert float(sched.sigma(0.5)) == pytest.approx((lo + 0.5 * (hi - lo)) ** 7, rel=1e-5)
    assert sched.sigma_ratio_range == pytest.approx((0.002, 80.0), rel=1e-5)


def test_derivatives_match_finite_differences(x64):
    for name in ALL:
        sched = schedules.get(name)
        t = jnp.asarray([0.2137, 0.5031, 0.7777], jnp.float64)
        d_alpha, d_sigma = sched.alpha_sigma_derivatives(t)
        h = 1e-7
        fd_alpha = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
        fd_sigma = (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h)
        np.testing.assert_allclose(np.asarray(d_alpha), np.asarray(fd_alpha), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(d_sigma), np.asarray(fd_sigma), rtol=1e-5, atol=1e-6)


def test_schedules_are_jittable():
    sched = schedules.get("cosine")
    fn = jax.jit(lambda t: sched.t_from_log_snr(sched.log_snr(t)))
    t = jnp.linspace(0.01, 0.99, 7)
    np.testing.assert_allclose(np.asarray(fn(t)), np.asarray(t), atol=1e-4)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("nope", {}, "unknown schedule 'nope'; available: cosine, cosine_continuous, edm"),
        ("ve", {"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min=5.0 must be < sigma_max=1.0"),
        ("ve", {"sigma_min": -1.0}, "sigma_min=-1.0 must be > 0"),
        ("linear", {"beta_end": 1.5}, "beta_end=1.5 is outside (0, 1)"),
        ("linear", {"beta_start": 0.0}, "beta_start=0.0 is outside (0, 1)"),
        ("linear", {"num_timesteps": -5}, "num_timesteps=-5 must be an integer >= 2"),
        ("rectified_flow", {"shift": 0.0}, "shift=0.0 must be > 0"),
        ("rectified_flow", {"bogus": 1}, "bad arguments for schedule 'rectified_flow'"),
    ],
)
def test_errors(name, kwargs, message):
    with pytest.raises(ValueError) as info:
        schedules.get(name, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_from_config_without_name():
    with pytest.raises(ValueError, match="has no 'name'; available: cosine"):
        schedules.from_config({"shift": 1.0})
