"""The compiled driver: one jit around the sampler's own loop (``Sampler.run``: ``lax.scan`` over the grid;
``lax.while_loop`` for dpm_adaptive, which overrides it).

Sampling happens in VE-equivalent coordinates x~ = x_t / alpha at s = sigma / alpha (``flaxdiff.denoiser``):

    x~_0 = s_0 eps  (eps = the unit Gaussian ``noise``; for img2img x~ = x_init + s_start eps)
    x~_{i+1} = step(x~_i, s_i, s_{i+1})      i < N - 1, inside lax.scan
    x0 = D(x~_{N-1}, s_{N-1})                the first-order final step into s = 0 (see ``flaxdiff.timesteps``)

NFE is exact and static for fixed grids: nfe_per_step * (N - 1) + 1 (dpm_adaptive counts its evaluations in the
loop). Randomness: step i draws from fold_in(base, i), base = fold_in(key, 1); with ``sample_keys`` (one key per
row) every draw of row i comes only from sample_keys[i], so a sample does not depend on its batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import guidance as guidance_lib
from flaxdiff import predictors as predictors_lib
from flaxdiff import schedules as schedules_lib
from flaxdiff import timesteps
from flaxdiff.denoiser import model_denoiser, ve_denoiser
from flaxdiff.losses import ApplyFn
from flaxdiff.predictors import Predictor
from flaxdiff.samplers.common import Denoise, Sampler, gaussian_like, sub_key
from flaxdiff.schedules import NoiseSchedule

Array = jax.Array

__all__ = ["DEFAULT_SAMPLER", "DEFAULT_GRID", "run", "sample", "sample_model"]

# Chosen by benchmarks/bench_samplers.py (docs/samplers.md): iPNDM-3 on the VP time-quadratic grid was the best
# deterministic pair at NFE 5-6 on both Gaussian-mixture problems, and the most robust across grids.
DEFAULT_SAMPLER = "ipndm"
DEFAULT_GRID = timesteps.DEFAULT_GRID


def run(sampler: Sampler, denoise: Denoise, x: Array, sigmas: Array, key: Array | None,
        final_zero: bool) -> tuple[Array, Array]:
    """Run ``sampler`` over the grid ``sigmas`` (traceable; call inside jit): its own loop, ``Sampler.run``.
    Returns (x at the last level, nfe)."""
    return sampler.run(denoise, x, sigmas, key, final_zero)


@dataclasses.dataclass(frozen=True)
class _PlainDenoiser:
    """D(x, sigma[, cond]) given by the user on a ve schedule, or denoise(x_t, t, cond) on ``schedule``."""

    fn: Callable[..., Array]
    schedule: NoiseSchedule | None
    with_cond: bool

    def __call__(self, cond: Any, x: Array, sigma: Array) -> Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        if self.schedule is not None:
            return ve_denoiser(self.fn, self.schedule)(x, sigma, cond)
        return self.fn(x, sigma, cond) if self.with_cond else self.fn(x, sigma)


@dataclasses.dataclass(frozen=True)
class _ModelDenoiser:
    """apply_fn + schedule + predictor (+ classifier-free guidance) as D(x~, s); params and cond are traced."""

    apply_fn: ApplyFn
    schedule: NoiseSchedule
    predictor: Predictor
    guided: bool
    interval: tuple[float, float] | None

    def __call__(self, aux: Any, x: Array, sigma: Array) -> Array:
        params, cond, null_cond, scale = aux
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        denoise = ve_denoiser(model_denoiser(self.apply_fn, params, self.schedule, self.predictor), self.schedule)
        if self.guided:
            denoise = guidance_lib.guided_denoiser(denoise, scale, null_cond, self.interval)
        return denoise(x, sigma, cond)


@functools.partial(jax.jit, static_argnames=("sampler", "model", "final_zero"))
def _compiled(sampler: Sampler, model: Callable[..., Array], aux: Any, x: Array, sigmas: Array,
              key: Array | None, final_zero: bool) -> tuple[Array, Array]:
    return run(sampler, functools.partial(model, aux), x, sigmas, key, final_zero)


def _resolve_sampler(sampler: str | Sampler, options: dict[str, Any]) -> Sampler:
    if isinstance(sampler, Sampler):
        if options:
            raise ValueError(f"sampler options {sorted(options)} given with a Sampler instance; set them on it")
        return sampler
    from flaxdiff import samplers as registry

    return registry.get(sampler, **options)


def _make_grid(grid: str | Any, steps: int, schedule: NoiseSchedule | None, sigma_min: float | None,
               sigma_max: float | None, rho: float | None, grid_options: dict[str, Any] | None) -> np.ndarray:
    if not isinstance(grid, str):
        return timesteps.validate(grid)
    options = {**({} if rho is None else {"rho": rho}), **(grid_options or {})}
    try:
        frozen_options = tuple(sorted(options.items()))
        hash(frozen_options)
    except TypeError:
        return timesteps.get(grid, steps, schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max, **options)
    return _cached_grid(grid, steps, schedule, sigma_min, sigma_max, frozen_options).copy()


@functools.lru_cache(maxsize=256)
def _cached_grid(grid: str, steps: int, schedule: NoiseSchedule | None, sigma_min: float | None,
                 sigma_max: float | None, options: tuple[tuple[str, Any], ...]) -> np.ndarray:
    """Grids are pure functions of hashable arguments; building one runs many small host-side JAX ops, so a
    repeated ``sample_model`` call reuses it instead of paying that cost per call."""
    return timesteps.get(grid, steps, schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max, **dict(options))


def _check_keys(sampler: Sampler, key: Array | None, sample_keys: Array | None) -> Array | None:
    if key is not None and sample_keys is not None:
        raise ValueError("pass either key= or sample_keys=, not both")
    chosen = sample_keys if sample_keys is not None else key
    if sampler.stochastic and chosen is None:
        raise ValueError(f"sampler {sampler.name!r} is stochastic: pass key= or sample_keys=")
    return chosen


def sample(denoise: Callable[..., Array], noise: Array, sampler: str | Sampler = DEFAULT_SAMPLER, steps: int = 10,
           grid: str | Any = DEFAULT_GRID, sigma_min: float | None = None, sigma_max: float | None = None,
           rho: float | None = None, key: Array | None = None, schedule: NoiseSchedule | None = None, cond: Any = None,
           sample_keys: Array | None = None, grid_options: dict[str, Any] | None = None,
           **sampler_options: Any) -> tuple[Array, Array]:
    """Sample with a plain denoiser; returns (samples, nfe).

    With ``schedule=None`` (a ve schedule, alpha = 1), ``denoise(x, sigma) -> x0_hat`` (``denoise(x, sigma, cond)``
    when ``cond`` is given) with sigma of shape (B,); s_min / s_max default to 0.002 / 80. With a schedule,
    ``denoise(x_t, t, cond)`` works in its native time. ``noise`` is unit Gaussian: the start is x~ = s_0 noise.
    ``grid`` is a grid name (``flaxdiff.timesteps``) or an array of decreasing sigma ratios; ``grid_options`` are
    the grid's own options (``rho=`` is short for ``grid_options={"rho": ...}``, the karras exponent).
    """
    sampler_obj = _resolve_sampler(sampler, sampler_options)
    sigmas = _make_grid(grid, steps, schedule, sigma_min, sigma_max, rho, grid_options)
    chosen_key = _check_keys(sampler_obj, key, sample_keys)
    noise = jnp.asarray(noise)
    model = _PlainDenoiser(denoise, schedule, cond is not None)
    x_start = noise * jnp.asarray(sigmas[0], noise.dtype)
    x, nfe = _compiled(sampler_obj, model, cond, x_start, jnp.asarray(sigmas, noise.dtype),
                       chosen_key if sampler_obj.stochastic else None, bool(sigmas[-1] == 0))
    return _to_native(x, float(sigmas[-1]), schedule), nfe


def _to_native(x: Array, sigma_last: float, schedule: NoiseSchedule | None) -> Array:
    """x_t = alpha(t) x~ at the last level (identity at s = 0 and on ve schedules)."""
    if sigma_last == 0 or schedule is None:
        return x
    with jax.ensure_compile_time_eval():
        alpha = float(schedule.alpha(schedule.t_from_sigma_ratio(jnp.float32(sigma_last))))
    return x * alpha


def sample_model(apply_fn: ApplyFn, params: Any, schedule: NoiseSchedule | str, predictor: Predictor | str,
                 noise: Array | None = None, cond: Any = None, sampler: str | Sampler = DEFAULT_SAMPLER,
                 steps: int = 20, grid: str | Any = DEFAULT_GRID, guidance_scale: float | None = None,
                 null_cond: Any = None, guidance_interval: tuple[float, float] | None = None,
                 key: Array | None = None, init_image: Array | None = None, strength: float | None = None,
                 sample_keys: Array | None = None, shape: tuple[int, ...] | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
                 grid_options: dict[str, Any] | None = None, **sampler_options: Any) -> tuple[Array, Array]:
    """Sample from a network ``apply_fn(params, x_in, c_noise, cond) -> F``; returns (samples, nfe).

    noise: unit Gaussian of the sample shape, or None to draw it (needs ``shape``) from ``key`` or, row by row,
    from ``sample_keys`` (B keys: row i uses only sample_keys[i]). guidance_scale: classifier-free guidance weight
    w (None = no guidance), with ``null_cond`` (e.g. {"label": num_classes}) and an optional guidance_interval
    (lo, hi) in s = sigma / alpha. init_image + strength in (0, 1]: img2img, running the last round(strength N)
    steps from x~ = init_image + s_start noise.
    """
    schedule = schedules_lib.get(schedule) if isinstance(schedule, str) else schedule
    predictor = predictors_lib.get(predictor) if isinstance(predictor, str) else predictor
    sampler_obj = _resolve_sampler(sampler, sampler_options)
    sigmas = _make_grid(grid, steps, schedule, sigma_min, sigma_max, rho, grid_options)
    chosen_key = _check_keys(sampler_obj, key, sample_keys)
    guidance_lib.check_interval(guidance_interval)
    if guidance_scale is not None and null_cond is None:
        raise ValueError("guidance_scale needs null_cond (e.g. {'label': num_classes} or flaxdiff.guidance."
                         "null_condition(cond, num_classes))")

    if noise is None:
        if shape is None:
            raise ValueError("pass noise= or shape= (with key= or sample_keys=) to draw it")
        if chosen_key is None:
            raise ValueError("drawing the initial noise needs key= or sample_keys=")
        noise = gaussian_like(sub_key(chosen_key, 0), jnp.zeros(shape, jnp.float32))
    noise = jnp.asarray(noise)

    if init_image is not None or strength is not None:
        if init_image is None or strength is None or not 0 < strength <= 1:
            raise ValueError(f"img2img needs init_image and strength in (0, 1], got strength={strength!r}")
        run_steps = int(round(strength * (sigmas.shape[0] - 1)))
        if run_steps < 1:
            raise ValueError(f"strength={strength!r} runs no step of a {sigmas.shape[0] - 1}-step grid")
        sigmas = sigmas[sigmas.shape[0] - 1 - run_steps:]
        x_start = jnp.asarray(init_image, noise.dtype) + noise * jnp.asarray(sigmas[0], noise.dtype)
    else:
        x_start = noise * jnp.asarray(sigmas[0], noise.dtype)

    model = _ModelDenoiser(apply_fn, schedule, predictor, guidance_scale is not None,
                           None if guidance_interval is None else tuple(float(v) for v in guidance_interval))
    scale = None if guidance_scale is None else jnp.asarray(guidance_scale, jnp.float32)
    aux = (params, cond, null_cond, scale)
    x, nfe = _compiled(sampler_obj, model, aux, x_start, jnp.asarray(sigmas, noise.dtype),
                       chosen_key if sampler_obj.stochastic else None, bool(sigmas[-1] == 0))
    return _to_native(x, float(sigmas[-1]), schedule), nfe
