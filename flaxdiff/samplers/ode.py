"""Runge-Kutta samplers of the probability-flow ODE dx/ds = (x - D(x, s)) / s.

Euler and Heun follow Karras et al. 2022, Algorithm 2, including stochastic churn: for s in [s_tmin, s_tmax],

    gamma = min(s_churn / N, sqrt(2) - 1),   s_hat = s (1 + gamma),   x_hat = x + sqrt(s_hat^2 - s^2) s_noise z,

then the ODE step runs from s_hat (N is the number of steps of the grid). s_churn = 0 (default) is deterministic.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from flaxdiff.samplers.common import Denoise, Sampler, gaussian_like, to_d

Array = jax.Array

__all__ = ["Euler", "Heun", "RK4", "DPM2"]


@dataclasses.dataclass(frozen=True)
class _Churn(Sampler):
    """EDM's stochastic churn (module docstring); s_churn = 0 is the plain ODE solver."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    stochastic_options = ({"s_churn": 10.0},)

    def __post_init__(self) -> None:
        if not self.s_churn >= 0:
            raise ValueError(f"s_churn={self.s_churn!r} must be >= 0")

    @property
    def stochastic(self) -> bool:
        return self.s_churn > 0

    def init_state(self, x: Array, sigmas: Array) -> Any:
        """gamma_max = min(s_churn / N, sqrt(2) - 1) for a grid of N steps."""
        return jnp.asarray(min(self.s_churn / (sigmas.shape[0] - 1), math.sqrt(2.0) - 1.0), sigmas.dtype)

    def churn(self, x: Array, gamma_max: Array, sigma: Array, key: Array | None) -> tuple[Array, Array]:
        """(x_hat, s_hat): raise the noise level from s to s_hat = s (1 + gamma) by adding fresh noise."""
        if self.s_churn == 0:
            return x, sigma
        gamma = jnp.where((sigma >= self.s_tmin) & (sigma <= self.s_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        # sqrt(s_hat^2 - s^2) written as s sqrt(gamma (2 + gamma)): never the root of a rounded-negative number.
        x = x + gaussian_like(key, x) * (self.s_noise * sigma * jnp.sqrt(gamma * (2.0 + gamma)))
        return x, sigma_hat

    def final_step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, key: Array | None) -> Array:
        x, sigma_hat = self.churn(x, state, sigma, key)
        return denoise(x, sigma_hat)


@dataclasses.dataclass(frozen=True)
class Euler(_Churn):
    """Euler: x' = x + (s' - s_hat) d,  d = (x - D(x, s_hat)) / s_hat. First order, 1 NFE per step."""

    name = "euler"
    order = 1

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        x, sigma_hat = self.churn(x, state, sigma, key)
        d = to_d(x, sigma_hat, denoise(x, sigma_hat))
        return x + (sigma_next - sigma_hat) * d, state


@dataclasses.dataclass(frozen=True)
class Heun(_Churn):
    """Heun (Karras et al. 2022, Alg. 2): Euler predictor, trapezoidal corrector. Second order, 2 NFE per step.

        x_e = x + (s' - s_hat) d,   d' = (x_e - D(x_e, s')) / s',   x' = x + (s' - s_hat) (d + d') / 2
    """

    name = "heun"
    nfe_per_step = 2
    order = 2

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        x, sigma_hat = self.churn(x, state, sigma, key)
        h = sigma_next - sigma_hat
        d = to_d(x, sigma_hat, denoise(x, sigma_hat))
        x_euler = x + h * d
        d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))
        return x + h * 0.5 * (d + d_next), state


@dataclasses.dataclass(frozen=True)
class RK4(Sampler):
    """Classical fourth-order Runge-Kutta in s, h = s' - s; 4 NFE per step.

        k1 = f(x, s), k2 = f(x + h k1 / 2, s + h / 2), k3 = f(x + h k2 / 2, s + h / 2), k4 = f(x + h k3, s'),
        x' = x + h (k1 + 2 k2 + 2 k3 + k4) / 6,     f(x, s) = (x - D(x, s)) / s
    """

    name = "rk4"
    nfe_per_step = 4
    order = 4

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        def f(x_: Array, s: Array) -> Array:
            return to_d(x_, s, denoise(x_, s))

        h = sigma_next - sigma
        sigma_mid = sigma + 0.5 * h
        k1 = f(x, sigma)
        k2 = f(x + 0.5 * h * k1, sigma_mid)
        k3 = f(x + 0.5 * h * k2, sigma_mid)
        k4 = f(x + h * k3, sigma_next)
        return x + h * (k1 + 2.0 * k2 + 2.0 * k3 + k4) / 6.0, state


@dataclasses.dataclass(frozen=True)
class DPM2(Sampler):
    """DPM-Solver-2 in k-diffusion's form (``sample_dpm_2``): a midpoint step at the log-midpoint level.

        s_mid = sqrt(s s'),  x_mid = x + (s_mid - s) d,  x' = x + (s' - s) (x_mid - D(x_mid, s_mid)) / s_mid
    """

    name = "dpm_2"
    nfe_per_step = 2
    order = 2

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        sigma_mid = jnp.sqrt(sigma * sigma_next)
        x_mid = x + (sigma_mid - sigma) * to_d(x, sigma, denoise(x, sigma))
        d_mid = to_d(x_mid, sigma_mid, denoise(x_mid, sigma_mid))
        return x + (sigma_next - sigma) * d_mid, state
