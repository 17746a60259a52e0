"""Parameterisations ("predictors"): pure maps between raw network output F and (x0_hat, eps_hat).

With x_t = alpha x0 + sigma eps, each predictor fixes what the network regresses:

    epsilon   F -> eps                  x0_hat = (x_t - sigma F) / alpha
    x0        F -> x0                   eps_hat = (x_t - alpha F) / sigma
    v         F -> (alpha eps - sigma x0) / n,  n = sqrt(alpha^2 + sigma^2)   (n = 1 on VP schedules)
    velocity  F -> d x_t / dt = alpha' x0 + sigma' eps                        (flow matching)
    edm       x0_hat = c_skip x~ + c_out F(c_in x~, c_noise), x~ = x_t / alpha, s = sigma / alpha (Karras et al.
              2022, Table 1), written directly in (alpha, sigma) so it stays finite where alpha = 0.

Each predictor also chooses the network's input scaling (``network_input``) and its noise-conditioning scalar
(``c_noise``: 1000 t for time-based predictors, log(sigma / alpha) / 4 for EDM), and reports ``x0_error_scale`` k
with ||x0_hat - x0||^2 = k ||F - target||^2, which is how loss weightings defined on x0 are carried into the
predictor's own target space.

All arrays in a ``NoiseLevel`` have shape (B,); predictor methods broadcast them against x of shape (B, ...).
Registry: ``get(name, **kwargs)``, ``available()``, ``from_config(config)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from flaxdiff.registry import Registry, to_config
from flaxdiff.schedules import NoiseSchedule

Array = jax.Array

__all__ = [
    "NoiseLevel",
    "noise_level",
    "Predictor",
    "EpsilonPredictor",
    "X0Predictor",
    "VPredictor",
    "VelocityPredictor",
    "EDMPredictor",
    "get",
    "available",
    "from_config",
    "register",
]

# log-SNR is clipped to this magnitude before it becomes EDM's c_noise, so that alpha = 0 (t = 1 on rectified flow
# or zero-terminal-SNR schedules) conditions the network on a large finite value rather than infinity.
EDM_LOG_SNR_CLIP = 40.0


@flax.struct.dataclass
class NoiseLevel:
    """Schedule values at per-example times t: alpha, sigma and their time derivatives, each of shape (B,)."""

    t: Array
    alpha: Array
    sigma: Array
    d_alpha: Array
    d_sigma: Array


def noise_level(schedule: NoiseSchedule, t: Array) -> NoiseLevel:
    """Evaluate ``schedule`` and its derivatives at ``t``."""
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    alpha, sigma = schedule.alpha_sigma(t)
    d_alpha, d_sigma = schedule.alpha_sigma_derivatives(t)
    return NoiseLevel(t=t, alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)


def _bc(value: Array, like: Array) -> Array:
    """Broadcast a per-example (B,) array against x of shape (B, ...)."""
    value = jnp.asarray(value, like.dtype)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


@dataclasses.dataclass(frozen=True)
class Predictor:
    """Base class: subclasses implement ``target`` and ``to_x0_eps``; the rest has defaults."""

    name: ClassVar[str] = ""

    def network_input(self, x_t: Array, level: NoiseLevel) -> Array:
        """What the network sees (identity unless the predictor preconditions its input)."""
        return x_t

    def c_noise(self, level: NoiseLevel) -> Array:
        """Noise-conditioning scalar per example: 1000 t."""
        return 1000.0 * level.t

    def target(self, x0: Array, eps: Array, level: NoiseLevel) -> Array:
        raise NotImplementedError

    def to_x0_eps(self, output: Array, x_t: Array, level: NoiseLevel) -> tuple[Array, Array]:
        raise NotImplementedError

    def x0_error_scale(self, level: NoiseLevel) -> Array:
        """k(t) with ||x0_hat - x0||^2 = k ||F - target||^2 (a per-example (B,) array)."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        return to_config(self)


@dataclasses.dataclass(frozen=True)
class EpsilonPredictor(Predictor):
    """F = eps; x0_hat = (x_t - sigma F) / alpha; k = sigma^2 / alpha^2 = 1 / SNR."""

    name: ClassVar[str] = "epsilon"

    def target(self, x0: Array, eps: Array, level: NoiseLevel) -> Array:
        return eps

    def to_x0_eps(self, output: Array, x_t: Array, level: NoiseLevel) -> tuple[Array, Array]:
        alpha, sigma = _bc(level.alpha, x_t), _bc(level.sigma, x_t)
        return (x_t - sigma * output) / alpha, output

    def x0_error_scale(self, level: NoiseLevel) -> Array:
        return (level.sigma / level.alpha) ** 2


@dataclasses.dataclass(frozen=True)
class X0Predictor(Predictor):
    """F = x0; eps_hat = (x_t - alpha F) / sigma; k = 1."""

    name: ClassVar[str] = "x0"

    def target(self, x0: Array, eps: Array, level: NoiseLevel) -> Array:
        return x0

    def to_x0_eps(self, output: Array, x_t: Array, level: NoiseLevel) -> tuple[Array, Array]:
        alpha, sigma = _bc(level.alpha, x_t), _bc(level.sigma, x_t)
        return output, (x_t - alpha * output) / sigma

    def x0_error_scale(self, level: NoiseLevel) -> Array:
        return jnp.ones_like(level.alpha)


@dataclasses.dataclass(frozen=True)
class VPredictor(Predictor):
    """F = v = (alpha eps - sigma x0) / n with n = sqrt(alpha^2 + sigma^2) (Salimans & Ho 2022).

    Inverse: x0_hat = (alpha x_t - sigma n F) / n^2, eps_hat = (sigma x_t + alpha n F) / n^2; k = sigma^2 / n^2.
    """

    name: ClassVar[str] = "v"

    def target(self, x0: Array, eps: Array, level: NoiseLevel) -> Array:
        alpha, sigma = _bc(level.alpha, x0), _bc(level.sigma, x0)
        return (alpha * eps - sigma * x0) / jnp.sqrt(alpha**2 + sigma**2)

    def to_x0_eps(self, output: Array, x_t: Array, level: NoiseLevel) -> tuple[Array, Array]:
        alpha, sigma = _bc(level.alpha, x_t), _bc(level.sigma, x_t)
        norm_sq = alpha**2 + sigma**2
        norm = jnp.sqrt(norm_sq)
        return (alpha * x_t - sigma * norm * output) / norm_sq, (sigma * x_t + alpha * norm * output) / norm_sq

    def x0_error_scale(self, level: NoiseLevel) -> Array:
        return level.sigma**2 / (level.alpha**2 + level.sigma**2)


@dataclasses.dataclass(frozen=True)
class VelocityPredictor(Predictor):
    """Flow matching: F = u = d x_t / dt = alpha' x0 + sigma' eps.

    With det = alpha sigma' - sigma alpha':  x0_hat = (sigma' x_t - sigma F) / det,
    eps_hat = (alpha F - alpha' x_t) / det;  k = sigma^2 / det^2.
    """

    name: ClassVar[str] = "velocity"

    def target(self, x0: Array, eps: Array, level: NoiseLevel) -> Array:
        return _bc(level.d_alpha, x0) * x0 + _bc(level.d_sigma, x0) * eps

    def to_x0_eps(self, output: Array, x_t: Array, level: NoiseLevel) -> tuple[Array, Array]:
        alpha, sigma = _bc(level.alpha, x_t), _bc(level.sigma, x_t)
        d_alpha, d_sigma = _bc(level.d_alpha, x_t), _bc(level.d_sigma, x_t)
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x_t - sigma * output) / det, (alpha * output - d_alpha * x_t) / det

    def x0_error_scale(self, level: NoiseLevel) -> Array:
        det = level.alpha * level.d_sigma - level.sigma * level.d_alpha
        return (level.sigma / det) ** 2


@dataclasses.dataclass(frozen=True)
class EDMPredictor(Predictor):
    """EDM preconditioning (Karras et al. 2022, Table 1) at the VE-equivalent level s = sigma / alpha:

        c_skip = sd^2 / (s^2 + sd^2),  c_out = s sd / sqrt(s^2 + sd^2),  c_in = 1 / sqrt(s^2 + sd^2),
        c_noise = log(s) / 4,          x0_hat = c_skip x~ + c_out F(c_in x~, c_noise),  x~ = x_t / alpha.

    Multiplying through by alpha gives the coefficients on x_t used here, with d = sqrt(sigma^2 + alpha^2 sd^2):
    network input x_t / d, x0_hat = (sd^2 alpha / d^2) x_t + (sigma sd / d) F; k = c_out^2.
    """

    sigma_data: float = 0.5

    name: ClassVar[str] = "edm"

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data={self.sigma_data!r} must be > 0")

    def coefficients(self, level: NoiseLevel) -> tuple[Array, Array, Array]:
        """(c_skip, c_out, c_in) acting on x_t (not on x~): each a (B,) array."""
        sd = self.sigma_data
        denom = jnp.sqrt(level.sigma**2 + (level.alpha * sd) ** 2)
        return sd**2 * level.alpha / denom**2, level.sigma * sd / denom, 1.0 / denom

    def network_input(self, x_t: Array, level: NoiseLevel) -> Array:
        return x_t * _bc(self.coefficients(level)[2], x_t)

    def c_noise(self, level: NoiseLevel) -> Array:
        log_snr = 2.0 * (jnp.log(level.alpha) - jnp.log(level.sigma))
        return -0.125 * jnp.clip(log_snr, -EDM_LOG_SNR_CLIP, EDM_LOG_SNR_CLIP)

    def target(self, x0: Array, eps: Array, level: NoiseLevel) -> Array:
        c_skip, c_out, _ = self.coefficients(level)
        x_t = _bc(level.alpha, x0) * x0 + _bc(level.sigma, x0) * eps
        return (x0 - _bc(c_skip, x0) * x_t) / _bc(c_out, x0)

    def to_x0_eps(self, output: Array, x_t: Array, level: NoiseLevel) -> tuple[Array, Array]:
        c_skip, c_out, _ = self.coefficients(level)
        x0_hat = _bc(c_skip, x_t) * x_t + _bc(c_out, x_t) * output
        return x0_hat, (x_t - _bc(level.alpha, x_t) * x0_hat) / _bc(level.sigma, x_t)

    def x0_error_scale(self, level: NoiseLevel) -> Array:
        return self.coefficients(level)[1] ** 2


_REGISTRY: Registry[Predictor] = Registry("predictor")
register = _REGISTRY.register
available = _REGISTRY.available
get = _REGISTRY.get
from_config = _REGISTRY.from_config

for _cls in (EpsilonPredictor, X0Predictor, VPredictor, VelocityPredictor, EDMPredictor):
    register(_cls.name, _cls)
