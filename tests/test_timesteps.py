"""Sampling grids: closed forms, the final-zero convention, validation."""
import math

import numpy as np
import pytest

from flaxdiff import schedules, timesteps


@pytest.mark.parametrize("name", timesteps.available())
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_every_grid_is_strictly_decreasing_and_ends_in_one_zero(name, steps):
    grid = timesteps.get(name, steps, schedule=schedules.get("cosine"))
    assert grid.shape == (steps + 1,)
    assert grid[-1] == 0.0 and np.all(grid[:-1] > 0) and np.all(np.diff(grid) < 0)
    if steps > 1:
        no_zero = timesteps.get(name, steps, schedule=schedules.get("cosine"), append_zero=False)
        np.testing.assert_allclose(no_zero, grid[:-1])


def test_karras_closed_form():
    grid = timesteps.karras(5, 0.002, 80.0, rho=7.0)
    ramp = np.linspace(0, 1, 5)
    expected = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(grid[:-1], expected, rtol=1e-12)
    assert grid[0] == pytest.approx(80.0) and grid[-2] == pytest.approx(0.002)


def test_logsnr_uniform_is_uniform_in_log_snr():
    grid = timesteps.logsnr_uniform(6, 0.01, 100.0)
    log_snr = -2.0 * np.log(grid[:-1])
    np.testing.assert_allclose(np.diff(log_snr), np.full(5, 4.0 * math.log(100.0 / 0.01) / 5.0 / 2.0))
    np.testing.assert_allclose(timesteps.exponential(6, 0.01, 100.0), grid)


def test_time_uniform_matches_vp_sde_sigmas():
    grid = timesteps.time_uniform(4, 0.01, 80.0)
    t = (-0.1 + np.sqrt(0.01 + 2 * 19.9 * np.log1p(grid[:-1] ** 2))) / 19.9
    np.testing.assert_allclose(np.diff(t), np.full(3, (t[-1] - t[0]) / 3), rtol=1e-9)
    np.testing.assert_allclose([grid[0], grid[-2]], [80.0, 0.01], rtol=1e-9)
    quad = timesteps.time_quadratic(4, 0.01, 80.0)
    tq = (-0.1 + np.sqrt(0.01 + 2 * 19.9 * np.log1p(quad[:-1] ** 2))) / 19.9
    np.testing.assert_allclose(np.diff(np.sqrt(tq)), np.full(3, (np.sqrt(tq[-1]) - np.sqrt(tq[0])) / 3), rtol=1e-9)


def test_flow_shift_is_uniform_in_unshifted_time():
    shift = 3.0
    grid = timesteps.flow_shift(5, 0.01, 100.0, shift=shift)
    t_shifted = grid[:-1] / (1 + grid[:-1])
    u = t_shifted / (shift - (shift - 1) * t_shifted)
    np.testing.assert_allclose(np.diff(u), np.full(4, (u[-1] - u[0]) / 4), rtol=1e-9)


def test_uniform_spacings_in_schedule_time():
    schedule = schedules.get("cosine_continuous")
    s_min, s_max = timesteps.sigma_range(schedule)
    assert s_max == timesteps.SIGMA_RATIO_CAP
    t_max = 2 / np.pi * np.arctan(s_max)
    trailing = timesteps.uniform(4, spacing="trailing", schedule=schedule)
    t = 2 / np.pi * np.arctan(trailing[:-1])
    np.testing.assert_allclose(t, t_max * np.array([4, 3, 2, 1]) / 4, rtol=1e-5)
    linspace = timesteps.uniform(4, spacing="linspace", schedule=schedule)
    np.testing.assert_allclose([linspace[0], linspace[-2]], [s_max, s_min], rtol=1e-4)
    leading = timesteps.uniform(4, spacing="leading", schedule=schedule)
    assert leading[-2] == pytest.approx(s_min, rel=1e-4)


def test_sigma_range_defaults():
    assert timesteps.sigma_range(schedules.get("ve")) == pytest.approx((0.002, 80.0))
    vp = schedules.get("linear")
    s_min, s_max = timesteps.sigma_range(vp)
    assert s_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-4)
    assert s_max == pytest.approx(float(vp.sigma_ratio(1.0)), rel=1e-5)
    assert timesteps.sigma_range(schedules.get("rectified_flow"))[1] == timesteps.SIGMA_RATIO_CAP


def test_from_times_uses_the_schedule():
    schedule = schedules.get("rectified_flow")
    grid = timesteps.from_times(schedule, [0.75, 0.5, 0.25])
    np.testing.assert_allclose(grid, [3.0, 1.0, 1.0 / 3.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ([1.0, 1.0, 0.0], "not strictly decreasing"),
    ([1.0, 0.0, 0.0], "only its last entry may be 0"),
    ([2.0, np.inf, 0.0], "must be finite"),
    ([1.0], "at least 2 noise levels"),
])
def test_validate_rejects_bad_grids(bad, match):
    with pytest.raises(ValueError, match=match):
        timesteps.validate(bad)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="steps=0"):
        timesteps.karras(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="unknown grid 'cosine'; available: exponential, flow_shift"):
        timesteps.get("cosine", 4)
    with pytest.raises(ValueError, match="sigma_min=2.0, sigma_max=1.0"):
        timesteps.exponential(3, 2.0, 1.0)
    with pytest.raises(ValueError, match="spacing='middle'"):
        timesteps.uniform(3, spacing="middle", schedule=schedules.get("linear"))
    with pytest.raises(ValueError, match="rho=-1"):
        timesteps.karras(3, 0.1, 1.0, rho=-1)


def test_grid_registry_has_one_signature_and_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="grid 'karras' is already registered"):
        timesteps.register("karras", timesteps.exponential)
    np.testing.assert_allclose(timesteps.get("karras", 3, sigma_min=0.1, sigma_max=1.0, rho=3.0),
                               timesteps.karras(3, 0.1, 1.0, rho=3.0))
    with pytest.raises(ValueError, match="bad arguments for grid 'exponential'.*rho"):
        timesteps.get("exponential", 3, rho=3.0)
    with pytest.raises(ValueError, match="grid 'uniform' .* pass schedule="):
        timesteps.uniform(3)


def test_flow_time_is_uniform_in_rectified_flow_time():
    np.testing.assert_allclose(timesteps.flow_time(4, 0.01, 100.0), [100.0, 3.0, 1.0, 1.0 / 3.0, 0.0], rtol=1e-12)
    grid = timesteps.get("flow_time", 5, schedule=schedules.get("rectified_flow"))
    assert grid[0] == timesteps.SIGMA_RATIO_CAP
    np.testing.assert_allclose(grid[1:] / (1 + grid[1:]), [0.8, 0.6, 0.4, 0.2, 0.0], atol=1e-12)
