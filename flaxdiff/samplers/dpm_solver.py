"""DPM-Solver++ family (Lu et al. 2022) in data-prediction form, stepping in lambda = -log s.

With h = lambda' - lambda = log(s / s'), the exact solution of the PF-ODE is

    x(s') = (s' / s) x(s) + integral_lambda^lambda' e^{-(lambda' - u)} x0_hat(u) du,

and the solvers approximate x0_hat(u) by a polynomial in u built from the current and earlier denoiser outputs.
The SDE variants (Gonzalez et al. 2023; k-diffusion) integrate the reverse SDE with the same structure, adding
fresh noise s' sqrt(1 - e^{-2 eta h}) z.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flaxdiff.samplers.common import (Denoise, EtaSampler, Multistep, ancestral_step, check_choice, exp_step,
                                      gaussian_like, history_init, history_push)

Array = jax.Array

__all__ = ["DPMPP2SAncestral", "DPMPP2M", "DPMPP2MSDE", "DPMPP3MSDE"]


@dataclasses.dataclass(frozen=True)
class DPMPP2SAncestral(EtaSampler):
    """DPM-Solver++(2S) with an ancestral step (k-diffusion ``sample_dpmpp_2s_ancestral``); 2 NFE per step.

        (s_d, s_u) = ancestral_step(s, s', eta),  s_mid = sqrt(s s_d),
        x_mid = (s_mid / s) x + (1 - s_mid / s) D(x, s),   x' = (s_d / s) x + (1 - s_d / s) D(x_mid, s_mid) + s_u z
    """

    s_noise: float = 1.0

    name = "dpmpp_2s_ancestral"
    nfe_per_step = 2
    order = 2
    deterministic_options = ({"eta": 0.0},)
    stochastic_options = ({},)

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        x0_hat = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
        sigma_mid = jnp.sqrt(sigma * sigma_down)
        x0_mid = denoise(exp_step(x, x0_hat, sigma, sigma_mid), sigma_mid)
        x = jnp.where(sigma_down > 0, exp_step(x, x0_mid, sigma, sigma_down), x0_hat)
        if self.eta > 0:
            x = x + gaussian_like(key, x) * (self.s_noise * sigma_up)
        return x, state


@dataclasses.dataclass(frozen=True)
class DPMPP2M(Multistep):
    """DPM-Solver++(2M): second-order multistep, 1 NFE per step (first step first-order).

        order 1:  x' = (s' / s) x + (1 - s' / s) D_i
        order 2:  r = h_{i-1} / h,   D' = (1 + 1 / (2 r)) D_i - (1 / (2 r)) D_{i-1},   x' = (s' / s) x + (1 - s' / s) D'
    """

    name = "dpmpp_2m"
    order = 2

    def init_state(self, x: Array, sigmas: Array) -> Any:
        return history_init(x, 1)

    def update(self, x: Array, x0_hat: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        if order == 1:
            x0_combined = x0_hat
        else:
            (x0_prev,), (lambda_prev,) = state
            half_inv_r = 0.5 * jnp.log(sigma / sigma_next) / (-jnp.log(sigma) - lambda_prev)
            x0_combined = (1.0 + half_inv_r) * x0_hat - half_inv_r * x0_prev
        return exp_step(x, x0_combined, sigma, sigma_next), history_push(state, x0_hat, sigma)


@dataclasses.dataclass(frozen=True)
class DPMPP2MSDE(Multistep, EtaSampler):
    """DPM-Solver++(2M) SDE (k-diffusion ``sample_dpmpp_2m_sde``), 1 NFE per step; eta = 0 is an ODE solver.

        x' = (s' / s) e^{-eta h} x + (1 - e^{-(1 + eta) h}) D_i + c (D_i - D_{i-1}) / r + s' sqrt(1 - e^{-2 eta h}) z
        c = (1 - e^{-(1 + eta) h}) / 2 (midpoint)  or  1 - (1 - e^{-(1 + eta) h}) / ((1 + eta) h) (heun)

    r = h_{i-1} / h; the order-1 step (warm-up) drops the c term.
    """

    s_noise: float = 1.0
    solver_type: str = "midpoint"

    name = "dpmpp_2m_sde"
    order = 2
    deterministic_options = ({"eta": 0.0}, {"eta": 0.0, "solver_type": "heun"})
    stochastic_options = ({},)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))

    def init_state(self, x: Array, sigmas: Array) -> Any:
        return history_init(x, 1)

    def update(self, x: Array, x0_hat: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        h = jnp.log(sigma / sigma_next)
        eta_h = self.eta * h
        one_minus = -jnp.expm1(-h - eta_h)
        x_new = (sigma_next / sigma) * jnp.exp(-eta_h) * x + one_minus * x0_hat
        if order == 2:
            (x0_prev,), (lambda_prev,) = state
            coef = 0.5 * one_minus if self.solver_type == "midpoint" else 1.0 - one_minus / (h + eta_h)
            x_new = x_new + coef * (h / (-jnp.log(sigma) - lambda_prev)) * (x0_hat - x0_prev)
        if self.eta > 0:
            x_new = x_new + gaussian_like(key, x) * (self.s_noise * sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta_h)))
        return x_new, history_push(state, x0_hat, sigma)


@dataclasses.dataclass(frozen=True)
class DPMPP3MSDE(Multistep, EtaSampler):
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``), 1 NFE per step; eta = 0 is the third-order ODE
    multistep solver. With h_eta = (1 + eta) h, phi_2 = expm1(-h_eta) / h_eta + 1, phi_3 = phi_2 / h_eta - 1 / 2:

        order 1:  x' = e^{-h_eta} x + (1 - e^{-h_eta}) D_i                    (+ s' sqrt(1 - e^{-2 eta h}) z)
        order 2:  ... + phi_2 d1_0
        order 3:  ... + phi_2 d1 - phi_3 d2

    with r_k = h_{i-1-k} / h, d1_0 = (D_i - D_{i-1}) / r_0, d1_1 = (D_{i-1} - D_{i-2}) / r_1, the divided differences
    d1 = d1_0 + (d1_0 - d1_1) r_0 / (r_0 + r_1), d2 = (d1_0 - d1_1) / (r_0 + r_1).
    """

    s_noise: float = 1.0

    name = "dpmpp_3m_sde"
    order = 3
    deterministic_options = ({"eta": 0.0},)
    stochastic_options = ({},)

    def init_state(self, x: Array, sigmas: Array) -> Any:
        return history_init(x, 2)

    def update(self, x: Array, x0_hat: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        h = jnp.log(sigma / sigma_next)
        h_eta = h * (self.eta + 1.0)
        x_new = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * x0_hat
        phi_2 = jnp.expm1(-h_eta) / h_eta + 1.0
        (x0_1, x0_2), (lambda_1, lambda_2) = state
        r0 = (-jnp.log(sigma) - lambda_1) / h
        d1_0 = (x0_hat - x0_1) / r0
        if order == 2:
            x_new = x_new + phi_2 * d1_0
        elif order == 3:
            r1 = (lambda_1 - lambda_2) / h
            d1_1 = (x0_1 - x0_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_new = x_new + phi_2 * d1 - 2.0 * (phi_2 / h_eta - 0.5) * d2
        if self.eta > 0:
            noise_scale = self.s_noise * sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * h * self.eta))
            x_new = x_new + gaussian_like(key, x) * noise_scale
        return x_new, history_push(state, x0_hat, sigma)
