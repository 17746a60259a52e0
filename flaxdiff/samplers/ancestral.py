"""Ancestral samplers: a deterministic Euler step down to sigma_down, then fresh noise of size sigma_up.

    x0 = D(x, s),   (sigma_down, sigma_up) = ancestral_step(s, s', eta),
    x' = x0 + (sigma_down / s) (x - x0) + sigma_up z,      z ~ N(0, I)

In VE coordinates DDIM (Song et al. 2021) with parameter eta and the DDPM posterior (Ho et al. 2020, eta = 1) are
exactly this step; they keep their own names because users look for them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from flaxdiff.samplers.common import Denoise, EtaSampler, Sampler, ancestral_step, gaussian_like

Array = jax.Array

__all__ = ["EulerAncestral", "DDIM", "DDPM"]


def _ancestral(denoise: Denoise, x: Array, sigma: Array, sigma_next: Array, key: Array | None, eta: float,
               s_noise: float) -> Array:
    x0_hat = denoise(x, sigma)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
    x = x0_hat + (sigma_down / sigma) * (x - x0_hat)
    if eta > 0:
        x = x + gaussian_like(key, x) * (s_noise * sigma_up)
    return x


@dataclasses.dataclass(frozen=True)
class EulerAncestral(EtaSampler):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``); eta = 1 by default, s_noise scales the noise."""

    s_noise: float = 1.0

    name = "euler_ancestral"
    order = 1
    deterministic_options = ({"eta": 0.0},)
    stochastic_options = ({},)

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        return _ancestral(denoise, x, sigma, sigma_next, key, self.eta, self.s_noise), state


@dataclasses.dataclass(frozen=True)
class DDIM(EtaSampler):
    """DDIM (Song et al. 2021, eq. 12). With alpha-bar written through s = sigma / alpha:

        x0 = D(x, s),  eps = (x - x0) / s,  x' = x0 + sqrt(s'^2 - sigma_up^2) eps + sigma_up z,
        sigma_up = eta s' sqrt(s^2 - s'^2) / s     (DDIM's sigma_t(eta) divided by alpha_t').

    eta = 0 (default) is deterministic and equals Euler in s; eta = 1 is DDPM.
    """

    eta: float = 0.0

    name = "ddim"
    order = 1
    stochastic_options = ({"eta": 1.0},)

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        return _ancestral(denoise, x, sigma, sigma_next, key, self.eta, 1.0), state


@dataclasses.dataclass(frozen=True)
class DDPM(Sampler):
    """DDPM ancestral sampling (Ho et al. 2020): draw from the posterior q(x_s' | x_s, x0 = D(x_s, s)),

        mean = x0 + (s'^2 / s^2) (x - x0),   variance = s'^2 (s^2 - s'^2) / s^2   ("sigma_t^2 = beta~_t"),

    which is the ancestral step with eta = 1 (sigma_down = s'^2 / s).
    """

    name = "ddpm"
    order = 1
    deterministic_options = ()
    stochastic_options = ({},)

    @property
    def stochastic(self) -> bool:
        return True

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        return _ancestral(denoise, x, sigma, sigma_next, key, 1.0, 1.0), state
