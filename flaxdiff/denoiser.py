"""The denoiser: the one place where a model, a predictor and a schedule meet.

    denoise(x_t, t, cond) -> x0_hat,      eps_hat = (x_t - alpha(t) x0_hat) / sigma(t)

Samplers work in the VE-equivalent coordinates x~ = x_t / alpha at the level s = sigma / alpha (Karras et al. 2022,
Sec. 4: every such ODE is the same ODE after this change of variables), through

    D(x~, s, cond) = denoise(alpha(t) x~, t, cond),   t = schedule.t_from_sigma_ratio(s),

so that any plain function ``D(x, sigma) -> x0_hat`` on a ``ve`` schedule (alpha = 1) is a valid sampler input.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flaxdiff.losses import ApplyFn
from flaxdiff.predictors import Predictor, noise_level
from flaxdiff.schedules import NoiseSchedule

Array = jax.Array
# denoise(x_t, t, cond) -> x0_hat; t has shape (B,).
TimeDenoiser = Callable[[Array, Array, Any], Array]
# D(x~, sigma_ratio, cond) -> x0_hat; sigma_ratio has shape (B,).
VEDenoiser = Callable[[Array, Array, Any], Array]

__all__ = ["model_denoiser", "ve_denoiser", "TimeDenoiser", "VEDenoiser"]


def _per_example(value: Array, batch: int, dtype: Any) -> Array:
    value = jnp.asarray(value, dtype)
    return jnp.broadcast_to(value, (batch,)) if value.ndim == 0 else value


def model_denoiser(apply_fn: ApplyFn, params: Any, schedule: NoiseSchedule, predictor: Predictor) -> TimeDenoiser:
    """Build denoise(x_t, t, cond) -> x0_hat from apply_fn(params, network_input, c_noise, cond) -> F."""

    def denoise(x_t: Array, t: Array, cond: Any = None) -> Array:
        level = noise_level(schedule, _per_example(t, x_t.shape[0], jnp.float32))
        output = apply_fn(params, predictor.network_input(x_t, level), predictor.c_noise(level), cond)
        x0_hat, _ = predictor.to_x0_eps(output.astype(x_t.dtype), x_t, level)
        return x0_hat

    return denoise


def ve_denoiser(denoise: TimeDenoiser, schedule: NoiseSchedule) -> VEDenoiser:
    """Wrap denoise(x_t, t, cond) as D(x~, s, cond) in VE-equivalent coordinates (x_t = alpha x~, s = sigma / alpha)."""

    def denoise_ve(x_ve: Array, sigma_ratio: Array, cond: Any = None) -> Array:
        sigma_ratio = _per_example(sigma_ratio, x_ve.shape[0], jnp.result_type(sigma_ratio, jnp.float32))
        t = schedule.t_from_sigma_ratio(sigma_ratio)
        alpha = schedule.alpha(t).astype(x_ve.dtype).reshape((-1,) + (1,) * (x_ve.ndim - 1))
        return denoise(alpha * x_ve, t, cond)

    return denoise_ve
