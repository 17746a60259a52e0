"""Sampling grids: strictly decreasing VE-equivalent noise levels s_0 > s_1 > ... > s_N = 0.

A grid is a float64 numpy array of sigma ratios s = sigma / alpha (see ``flaxdiff.denoiser``), separate from the
training schedule; ``from_times(schedule, t)`` converts schedule times. ``steps`` is the number of intervals N,
so a grid has N + 1 entries.

Conventions (the same for every grid and sampler):

* Final step. The grid ends at s = 0 exactly once (no repeated last sigma, no double zero). The last interval
  s_{N-1} -> 0 is always taken by the first-order (Euler = DDIM) step x <- D(x, s_{N-1}), 1 NFE, whatever the
  sampler's order (as in EDM and k-diffusion), so no evaluation is wasted at s = 0. ``append_zero=False`` gives a
  grid that stops at s_{N-1} > 0 (no final denoising).
* Infinite start. Schedules with zero terminal SNR (rectified_flow, cosine_continuous, zero_terminal_snr VP) have
  s = inf at t = 1. Grids start at the finite s_max = min(sigma_ratio(t = 1), SIGMA_RATIO_CAP) and the sampler
  starts from x~ = s_max * eps, i.e. the prior N(0, s_max^2 I) whose neglected signal is O(1 / s_max) of the noise.

Grids (``get(name, steps, schedule=..., sigma_min=..., sigma_max=..., **options)``), a shared ``Registry``; every
grid is a function ``grid(steps, sigma_min, sigma_max, *options, append_zero=True, schedule=None)``:

    karras          (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho       (Karras et al. 2022)
    exponential     log-uniform in s from s_max to s_min
    logsnr_uniform  uniform in log-SNR = -2 log s (the same levels as exponential)
    time_uniform    uniform in t of the VP-SDE beta(t) = 0.1 + 19.9 t, whose s(t)^2 = exp(9.95 t^2 + 0.1 t) - 1
    time_quadratic  uniform in sqrt(t) of that VP-SDE (DPM-Solver's default for pixel models)
    flow_shift      uniform in rectified-flow time u with the SD3 shift t' = k u / (1 + (k - 1) u), s = t' / (1 - t')
    flow_time       uniform in rectified-flow time t = 1 - i / N, s = t / (1 - t), first level s_max (reflow)
    uniform         uniform in the schedule's own time t, spacing "linspace" / "leading" / "trailing" (diffusers)
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.registry import Registry
from flaxdiff.schedules import DiscreteVPSchedule, NoiseSchedule, VESchedule

__all__ = [
    "SIGMA_RATIO_CAP",
    "DEFAULT_GRID",
    "get",
    "available",
    "register",
    "sigma_range",
    "from_times",
    "validate",
    "karras",
    "exponential",
    "logsnr_uniform",
    "time_uniform",
    "time_quadratic",
    "flow_shift",
    "flow_time",
    "uniform",
]

# The default sampling grid, chosen by benchmarks/bench_samplers.py together with samplers.DEFAULT_SAMPLER.
DEFAULT_GRID = "time_quadratic"
# Largest starting sigma ratio s = sigma / alpha for schedules whose terminal SNR is 0 (s = inf at t = 1).
SIGMA_RATIO_CAP = 1000.0
# Smallest schedule time used by default for schedules whose s(0) = 0 (one training step for discrete VP tables).
DEFAULT_T_MIN = 1e-3
_VP_BETA_MIN, _VP_BETA_D = 0.1, 19.9


def _check_steps(steps: Any) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} must be >= 1 (an integer)")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")


def _finish(levels: np.ndarray, append_zero: bool) -> np.ndarray:
    levels = np.asarray(levels, np.float64)
    return validate(np.concatenate([levels, [0.0]]) if append_zero else levels)


def _sigma_ratio(schedule: NoiseSchedule, t: np.ndarray) -> np.ndarray:
    with jax.ensure_compile_time_eval():
        return np.asarray(schedule.sigma_ratio(jnp.asarray(t, jnp.float32)), np.float64)


def sigma_range(schedule: NoiseSchedule, sigma_min: float | None = None,
                sigma_max: float | None = None) -> tuple[float, float]:
    """Default (s_min, s_max) for a schedule: s at t = 0 (or at t_min = 1 / T for discrete tables, DEFAULT_T_MIN for
    schedules with s(0) = 0) and s at t = 1 capped at SIGMA_RATIO_CAP; explicit values win."""
    low, high = schedule.sigma_ratio_range
    if sigma_min is None:
        if low > 0:
            sigma_min = low
        else:
            t_min = 1.0 / schedule.num_timesteps if isinstance(schedule, DiscreteVPSchedule) else DEFAULT_T_MIN
            sigma_min = float(_sigma_ratio(schedule, np.asarray(t_min)))
    if sigma_max is None:
        sigma_max = min(high, SIGMA_RATIO_CAP) if math.isfinite(high) else SIGMA_RATIO_CAP
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    _check_range(sigma_min, sigma_max)
    return sigma_min, sigma_max


def validate(sigmas: Any) -> np.ndarray:
    """Check a user grid: 1-D, finite, > 0 except a single final 0, strictly decreasing; returns it as float64."""
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"a grid needs at least 2 noise levels in a 1-D array, got shape {sigmas.shape}")
    if not np.all(np.isfinite(sigmas)) or np.any(sigmas[:-1] <= 0) or sigmas[-1] < 0:
        raise ValueError(f"grid {sigmas.tolist()} must be finite and > 0 (only its last entry may be 0)")
    if np.any(np.diff(sigmas) >= 0):
        raise ValueError(f"grid {sigmas.tolist()} is not strictly decreasing in noise")
    return sigmas


def from_times(schedule: NoiseSchedule, t: Any, append_zero: bool = True) -> np.ndarray:
    """Grid from decreasing schedule times t (e.g. a diffusers timestep list / T); s = sigma_ratio(t)."""
    return _finish(_sigma_ratio(schedule, np.asarray(t, np.float64)), append_zero)


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, append_zero: bool = True,
           schedule: NoiseSchedule | None = None) -> np.ndarray:
    """Karras et al. 2022, eq. 5: uniform in s^(1/rho); N levels from s_max to s_min, then 0."""
    _check_steps(steps)
    _check_range(sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho={rho!r} must be > 0")
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, append_zero)


def exponential(steps: int, sigma_min: float, sigma_max: float, append_zero: bool = True,
                schedule: NoiseSchedule | None = None) -> np.ndarray:
    """log s uniform from log s_max to log s_min (k-diffusion ``get_sigmas_exponential``)."""
    _check_steps(steps)
    _check_range(sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    return _finish(np.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max))), append_zero)


def logsnr_uniform(steps: int, sigma_min: float, sigma_max: float, append_zero: bool = True,
                   schedule: NoiseSchedule | None = None) -> np.ndarray:
    """Uniform in log-SNR lambda = -2 log s between lambda(s_max) and lambda(s_min): the ``exponential`` levels."""
    return exponential(steps, sigma_min, sigma_max, append_zero)


def _vp_time(sigma: float) -> float:
    """Inverse of s(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1 (the VP-SDE of Song et al. 2021)."""
    return (-_VP_BETA_MIN + math.sqrt(_VP_BETA_MIN**2 + 2.0 * _VP_BETA_D * math.log1p(sigma**2))) / _VP_BETA_D


def _vp_sigma(t: np.ndarray) -> np.ndarray:
    return np.sqrt(np.expm1(0.5 * _VP_BETA_D * t**2 + _VP_BETA_MIN * t))


def time_uniform(steps: int, sigma_min: float, sigma_max: float, append_zero: bool = True,
                 schedule: NoiseSchedule | None = None) -> np.ndarray:
    """DPM-Solver's ``time_uniform`` (k-diffusion ``get_sigmas_vp``): uniform t of the VP-SDE between t(s_max)
    and t(s_min)."""
    _check_steps(steps)
    _check_range(sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    t_hi, t_lo = _vp_time(sigma_max), _vp_time(sigma_min)
    return _finish(_vp_sigma(t_hi + ramp * (t_lo - t_hi)), append_zero)


def time_quadratic(steps: int, sigma_min: float, sigma_max: float, append_zero: bool = True,
                   schedule: NoiseSchedule | None = None) -> np.ndarray:
    """DPM-Solver's ``time_quadratic``: uniform in sqrt(t) of the VP-SDE, t from t(s_max) to t(s_min)."""
    _check_steps(steps)
    _check_range(sigma_min, sigma_max)
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    r_hi, r_lo = math.sqrt(_vp_time(sigma_max)), math.sqrt(_vp_time(sigma_min))
    return _finish(_vp_sigma((r_hi + ramp * (r_lo - r_hi)) ** 2), append_zero)


def flow_shift(steps: int, sigma_min: float, sigma_max: float, shift: float = 3.0,
               append_zero: bool = True, schedule: NoiseSchedule | None = None) -> np.ndarray:
    """Uniform in rectified-flow time u, mapped by the SD3 shift t' = k u / (1 + (k - 1) u), s = t' / (1 - t');
    u runs between the values whose s equals s_max and s_min."""
    _check_steps(steps)
    _check_range(sigma_min, sigma_max)
    if not shift > 0:
        raise ValueError(f"shift={shift!r} must be > 0")

    def unshift(sigma: float) -> float:
        t_shifted = sigma / (1.0 + sigma)
        return t_shifted / (shift - (shift - 1.0) * t_shifted)

    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    u = unshift(sigma_max) + ramp * (unshift(sigma_min) - unshift(sigma_max))
    t_shifted = shift * u / (1.0 + (shift - 1.0) * u)
    return _finish(t_shifted / (1.0 - t_shifted), append_zero)


def flow_time(steps: int, sigma_min: float, sigma_max: float, append_zero: bool = True,
              schedule: NoiseSchedule | None = None) -> np.ndarray:
    """Uniform in rectified-flow time t = s / (1 + s): t_i = 1 - i / N, so s_i = t_i / (1 - t_i), with the
    infinite s(t_0 = 1) replaced by s_max (the grid of reflow, Liu et al. 2023). s_min is not used: the last
    level is s = 1 / (N - 1)."""
    _check_steps(steps)
    _check_range(sigma_min, sigma_max)
    t = 1.0 - np.arange(1, steps, dtype=np.float64) / steps
    levels = np.concatenate([[sigma_max], t / (1.0 - t)])
    return _finish(levels, append_zero)


def uniform(steps: int, sigma_min: float | None = None, sigma_max: float | None = None, spacing: str = "linspace",
            append_zero: bool = True, schedule: NoiseSchedule | None = None) -> np.ndarray:
    """Uniform in the schedule's time t between t_max = t(s_max) and t_min = t(s_min) (diffusers' spacings):

        linspace  t_i = t_max + i / (N - 1) (t_min - t_max),   i = 0..N-1
        trailing  t_i = t_max (N - i) / N                      (ends at t_max / N; "trailing" of Lin et al. 2023)
        leading   t_i = t_min + (t_max - t_min) (N - 1 - i) / N

    ``schedule`` is required (s_min / s_max default to ``sigma_range(schedule)``).
    """
    if schedule is None:
        raise ValueError("grid 'uniform' is uniform in a schedule's time: pass schedule=")
    _check_steps(steps)
    if spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"spacing={spacing!r} is not one of 'linspace', 'leading', 'trailing'")
    s_min, s_max = sigma_range(schedule, sigma_min, sigma_max)
    with jax.ensure_compile_time_eval():
        t_max = float(schedule.t_from_sigma_ratio(jnp.float32(s_max)))
        t_min = float(schedule.t_from_sigma_ratio(jnp.float32(s_min)))
    i = np.arange(steps, dtype=np.float64)
    if spacing == "linspace":
        t = t_max + (i / max(steps - 1, 1)) * (t_min - t_max)
    elif spacing == "trailing":
        t = t_max * (steps - i) / steps
    else:
        t = t_min + (t_max - t_min) * (steps - 1 - i) / steps
    return _finish(_sigma_ratio(schedule, t), append_zero)


_REGISTRY: Registry[np.ndarray] = Registry("grid")
for _name, _grid in (("karras", karras), ("exponential", exponential), ("logsnr_uniform", logsnr_uniform),
                     ("time_uniform", time_uniform), ("time_quadratic", time_quadratic), ("flow_shift", flow_shift),
                     ("flow_time", flow_time), ("uniform", uniform)):
    _REGISTRY.register(_name, _grid)
register = _REGISTRY.register
available = _REGISTRY.available


def get(name: str, steps: int, schedule: NoiseSchedule | None = None, sigma_min: float | None = None,
        sigma_max: float | None = None, **options: Any) -> np.ndarray:
    """Build grid ``name`` with ``steps`` intervals: every registered grid is called as
    ``grid(steps, s_min, s_max, schedule=schedule, **options)``, with s_min / s_max defaulting to
    ``sigma_range(schedule)`` (schedule defaults to ``ve``: [0.002, 80])."""
    _REGISTRY.check(name)
    schedule = VESchedule() if schedule is None else schedule
    s_min, s_max = sigma_range(schedule, sigma_min, sigma_max)
    return _REGISTRY.get(name, steps=steps, sigma_min=s_min, sigma_max=s_max, schedule=schedule, **options)
