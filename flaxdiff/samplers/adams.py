"""Adams-Bashforth multistep samplers in s on the PF-ODE derivative d = (x - D(x, s)) / s (= eps_hat), 1 NFE per
step: explicit linear multistep methods that reuse the last p derivatives,

    x' = x + (s' - s) sum_{j<p} b_j d_{i-j}.

``ipndm`` (improved PNDM; Zhang & Chen 2023, DEIS, and k-diffusion ``sample_ipndm``) takes the fixed Adams-Bashforth
weights of equal steps,

    p = 1: [1]    p = 2: [3, -1] / 2    p = 3: [23, -16, 5] / 12    p = 4: [55, -59, 37, -9] / 24,

``lms`` (k-diffusion ``sample_lms``) the variable-step weights b_j = (1 / (s' - s)) int_s^s' L_j(u) du of the
Lagrange basis L_j on the levels s_i, ..., s_{i-p+1} (exact by 2-point Gauss-Legendre: L_j has degree <= 3).
Warm-up and the final steps use lower orders (``multistep_orders``).

Analytical first step (``analytic_first_step=True``; AFS of Zhou et al. 2024, "Fast ODE-based sampling for diffusion
models in around 5 steps"): at s_0 = s_max the denoiser of centred data is at its large-noise limit D -> E[x0] ~ 0,
so the first derivative is taken as d_0 = x / s_0 (eps_hat = x / s) without calling the network. The first step is
then the exact flow of D = 0, x_1 = (s_1 / s_0) x_0, and d_0 enters the history as usual: a grid of N intervals
costs N - 1 evaluations instead of N. The price is one local error of size (1 - s_1 / s_0) |E[x0] + O(x / s_0^2)|,
damped by the flow from s_1 to 0, which makes the method first order as the grid is refined (the battery's
convergence test measures the plain form); at 5-10 NFE the saved evaluation is worth far more
(docs/samplers.md measures it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.samplers.common import Denoise, Multistep, StepFn, check_choice, history_init, history_push, to_d

Array = jax.Array

__all__ = ["IPNDM", "LMS", "AdamsInS"]

_AB_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(2)


def large_noise_denoiser(x: Array, sigma: Array) -> Array:
    """The large-noise limit of the denoiser of centred data, D(x, s) -> E[x0] = 0 (no network call)."""
    return jnp.zeros_like(x)


@dataclasses.dataclass(frozen=True)
class AdamsInS(Multistep):
    """Shared part of the Adams-Bashforth methods in s: the history keeps d = (x - D) / s, the extrapolation guard
    measures steps in s, and the optional analytical first step (module docstring) replaces the first evaluation."""

    solver_order: int = 3
    analytic_first_step: bool = False

    low_budget_options: ClassVar[tuple[dict[str, Any], ...]] = ({"analytic_first_step": True},)

    def __post_init__(self) -> None:
        check_choice("solver_order", self.solver_order, (1, 2, 3, 4))
        check_choice("analytic_first_step", self.analytic_first_step, (False, True))

    def init_state(self, x: Array, sigmas: Array) -> Any:
        return history_init(x, max(self.solver_order - 1, 1))

    def evaluate(self, denoise: Denoise, x: Array, sigma: Array) -> Array:
        return to_d(x, sigma, denoise(x, sigma))

    def extrapolation_safe(self, state: Any, sigma: Array, sigma_next: Array) -> Array:
        """These methods step in s: s - s' <= max_step_growth (s_prev - s); ``max_step`` (in lambda) does not apply."""
        return sigma - sigma_next <= self.max_step_growth * (jnp.exp(-self.previous_lambda(state)) - sigma)

    def analytic_step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
                      key: Array | None) -> tuple[Array, Any]:
        """First step without a network call: d_0 = x / s_0, x_1 = (s_1 / s_0) x_0, d_0 pushed on the history."""
        return self.multistep(large_noise_denoiser, x, state, sigma, sigma_next, key, order=1)

    def stages(self, scanned: int, intervals: int) -> list[tuple[StepFn, int]]:
        stages = super().stages(scanned, intervals)
        if not (self.analytic_first_step and stages):
            return stages
        (first_fn, first_count), rest = stages[0], stages[1:]
        return [(self.analytic_step, 1)] + ([(first_fn, first_count - 1)] if first_count > 1 else []) + rest

    def nfe(self, num_levels: int, final_zero: bool) -> int:
        """One evaluation fewer with the analytical first step (when the grid has a step before the final one)."""
        scanned = num_levels - 1 - int(final_zero)
        return super().nfe(num_levels, final_zero) - int(self.analytic_first_step and scanned > 0)


@dataclasses.dataclass(frozen=True)
class IPNDM(AdamsInS):
    """iPNDM: Adams-Bashforth in s with the fixed equal-step weights, ``solver_order`` p in 1..4 (default 3).
    On a grid that is not uniform in s the weights are those of equal steps, which keeps it second order."""

    name = "ipndm"
    order = 2

    def update(self, x: Array, d: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        derivatives = [d] + [state[0][j] for j in range(order - 1)]
        slope = sum(weight * d_j for weight, d_j in zip(_AB_WEIGHTS[order], derivatives))
        return x + (sigma_next - sigma) * slope, history_push(state, d, sigma)


def lagrange_step_weights(levels: list[Array], sigma_next: Array) -> list[Array]:
    """b_j = (1 / (s' - s_0)) int_{s_0}^{s'} prod_{m != j} (u - s_m) / (s_j - s_m) du over levels s_0 = s, s_1, ..."""
    middle, half = 0.5 * (levels[0] + sigma_next), 0.5 * (sigma_next - levels[0])
    points = [middle + half * node for node in _GAUSS_NODES]
    weights = []
    for j, s_j in enumerate(levels):
        value = 0.0
        for u, gauss_weight in zip(points, _GAUSS_WEIGHTS):
            basis = 1.0
            for m, s_m in enumerate(levels):
                if m != j:
                    basis = basis * (u - s_m) / (s_j - s_m)
            value = value + gauss_weight * basis
        weights.append(0.5 * value)
    return weights


@dataclasses.dataclass(frozen=True)
class LMS(AdamsInS):
    """Linear multistep in s with variable-step Adams-Bashforth weights (k-diffusion ``sample_lms``),
    ``solver_order`` p in 1..4 (default 3): order p on any smooth grid."""

    name = "lms"

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.solver_order

    def update(self, x: Array, d: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        derivatives = [d] + [state[0][j] for j in range(order - 1)]
        levels = [sigma] + [jnp.exp(-state[1][j]) for j in range(order - 1)]
        slope = sum(w * d_j for w, d_j in zip(lagrange_step_weights(levels, sigma_next), derivatives))
        return x + (sigma_next - sigma) * slope, history_push(state, d, sigma)
