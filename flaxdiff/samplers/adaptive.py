"""DPM-Solver-23 with adaptive step size (Lu et al. 2022, Sec. 4 / Alg. 4), data prediction, run in lax.while_loop.

Each attempt steps lambda = -log s by h with r1 = 1/3, r2 = 2/3 and an embedded pair sharing evaluations:

    x_1  = (s_1 / s) x - phi_1(r1 h) D_s,                                   D_1 = D(x_1, s_1)
    x_lo = (s' / s) x - phi_1(h) D_s - (1 / (2 r1)) phi_1(h) (D_1 - D_s)    (DPM-Solver++ 2S, 2nd order)
    x_2  = (s_2 / s) x - phi_1(r2 h) D_s + (r2 / r1) phi_2(r2 h) (D_1 - D_s), D_2 = D(x_2, s_2)
    x_hi = (s' / s) x - phi_1(h) D_s + (1 / r2) phi_2(h) (D_2 - D_s)         (DPM-Solver++ 3S, 3rd order)

with phi_1(h) = expm1(-h), phi_2(h) = expm1(-h) / h + 1. The error E = RMS((x_lo - x_hi) / delta),
delta = max(atol, rtol max(|x_lo|, |x|)), over the whole batch; the step is accepted when E <= 1 and
h <- h clip(safety E^(-1/3), 0.2, 5). After acceptance D is evaluated at the new point (reused as the next D_s, and at
s_min it is the final first-order step to s = 0), so NFE = 1 + 2 attempts + accepted steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from flaxdiff.samplers.common import Denoise, Sampler

Array = jax.Array

__all__ = ["DPMAdaptive"]


@dataclasses.dataclass(frozen=True)
class DPMAdaptive(Sampler):
    """Adaptive DPM-Solver-23; rtol, atol set the accuracy (k-diffusion's defaults), h_init the first step in lambda."""

    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    safety: float = 0.9
    max_attempts: int = 10_000

    name = "dpm_adaptive"
    order = 3
    deterministic_options: ClassVar[tuple[dict[str, Any], ...]] = ({"rtol": 1e-4, "atol": 1e-4},)
    accuracy_sweep: ClassVar[tuple[dict[str, Any], ...]] = tuple({"rtol": tol, "atol": tol, "h_init": 0.5}
                                                                 for tol in (1e-3, 1e-4, 1e-5, 1e-6))

    def __post_init__(self) -> None:
        for field in ("rtol", "atol", "h_init"):
            if not getattr(self, field) >= 0 or (field != "atol" and getattr(self, field) == 0):
                raise ValueError(f"{field}={getattr(self, field)!r} must be > 0")

    def run(self, denoise: Denoise, x: Array, sigmas: Array, key: Array | None,
            final_zero: bool) -> tuple[Array, Array]:
        """Only the ends of the grid matter: solve from sigmas[0] to the last positive level, then (``final_zero``)
        the first-order step to 0, whose D(x, s_last) the solver has already evaluated."""
        sigma_end = sigmas[-2] if final_zero else sigmas[-1]
        x_end, x0_end, nfe = self.solve(denoise, x, sigmas[0], sigma_end)
        return (x0_end if final_zero else x_end), nfe

    def solve(self, denoise: Denoise, x: Array, sigma_start: Array, sigma_end: Array) -> tuple[Array, Array, Array]:
        """Integrate the PF-ODE from sigma_start to sigma_end; returns (x(sigma_end), D(x, sigma_end), nfe)."""
        dtype = x.dtype
        lam_end = -jnp.log(sigma_end).astype(dtype)
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0

        def attempt(carry: tuple) -> tuple:
            x, lam, h, x0_s, nfe, attempts = carry
            last = h >= lam_end - lam
            h_used = jnp.where(last, lam_end - lam, h)
            lam_next = jnp.where(last, lam_end, lam + h_used)
            sigma, sigma_next = jnp.exp(-lam), jnp.exp(-lam_next)
            sigma_1, sigma_2 = jnp.exp(-(lam + r1 * h_used)), jnp.exp(-(lam + r2 * h_used))
            phi_1 = jnp.expm1(-h_used)
            x_1 = (sigma_1 / sigma) * x - jnp.expm1(-r1 * h_used) * x0_s
            x0_1 = denoise(x_1, sigma_1)
            x_low = (sigma_next / sigma) * x - phi_1 * x0_s - (0.5 / r1) * phi_1 * (x0_1 - x0_s)
            phi_22 = jnp.expm1(-r2 * h_used) / (r2 * h_used) + 1.0
            x_2 = (sigma_2 / sigma) * x - jnp.expm1(-r2 * h_used) * x0_s + (r2 / r1) * phi_22 * (x0_1 - x0_s)
            x0_2 = denoise(x_2, sigma_2)
            x_high = (sigma_next / sigma) * x - phi_1 * x0_s + (1.0 / r2) * (phi_1 / h_used + 1.0) * (x0_2 - x0_s)
            delta = jnp.maximum(self.atol, self.rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x)))
            error = jnp.sqrt(jnp.mean(((x_low - x_high) / delta) ** 2))
            accept = error <= 1.0
            x = jnp.where(accept, x_high, x)
            x0_s = jax.lax.cond(accept, lambda: denoise(x_high, sigma_next), lambda: x0_s)
            factor = jnp.clip(self.safety * jnp.maximum(error, 1e-10) ** (-1.0 / 3.0), 0.2, 5.0)
            lam = jnp.where(accept, lam_next, lam)
            return x, lam, h_used * factor, x0_s, nfe + 2 + accept.astype(jnp.int32), attempts + 1

        def unfinished(carry: tuple) -> Array:
            return (carry[1] < lam_end) & (carry[5] < self.max_attempts)

        lam_start = -jnp.log(sigma_start).astype(dtype)
        init = (x, lam_start, jnp.asarray(self.h_init, dtype), denoise(x, sigma_start.astype(dtype)),
                jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32))
        x, _, _, x0_end, nfe, _ = jax.lax.while_loop(unfinished, attempt, init)
        return x, x0_end, nfe
