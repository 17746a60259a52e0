"""Adams-Bashforth multistep samplers in s on the PF-ODE derivative d = (x - D(x, s)) / s (= eps_hat), 1 NFE per
step: explicit linear multistep methods that reuse the last p derivatives,

    x' = x + (s' - s) sum_{j<p} b_j d_{i-j}.

``ipndm`` (improved PNDM; Zhang & Chen 2023, DEIS, and k-diffusion ``sample_ipndm``) takes the fixed Adams-Bashforth
weights of equal steps,

    p = 1: [1]    p = 2: [3, -1] / 2    p = 3: [23, -16, 5] / 12    p = 4: [55, -59, 37, -9] / 24,

``lms`` (k-diffusion ``sample_lms``) the variable-step weights b_j = (1 / (s' - s)) int_s^s' L_j(u) du of the
Lagrange basis L_j on the levels s_i, ..., s_{i-p+1} (exact by 2-point Gauss-Legendre: L_j has degree <= 3).
Warm-up and the final steps use lower orders (``multistep_orders``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.samplers.common import Denoise, Multistep, check_choice, history_init, history_push, to_d

Array = jax.Array

__all__ = ["IPNDM", "LMS"]

_AB_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(2)


@dataclasses.dataclass(frozen=True)
class IPNDM(Multistep):
    """iPNDM: Adams-Bashforth in s with the fixed equal-step weights, ``solver_order`` p in 1..4 (default 3).
    On a grid that is not uniform in s the weights are those of equal steps, which keeps it second order."""

    solver_order: int = 3

    name = "ipndm"
    order = 2

    def __post_init__(self) -> None:
        check_choice("solver_order", self.solver_order, (1, 2, 3, 4))

    def init_state(self, x: Array, sigmas: Array) -> Any:
        return history_init(x, max(self.solver_order - 1, 1))

    def evaluate(self, denoise: Denoise, x: Array, sigma: Array) -> Array:
        return to_d(x, sigma, denoise(x, sigma))

    def extrapolation_safe(self, state: Any, sigma: Array, sigma_next: Array) -> Array:
        """These methods step in s: s - s' <= max_step_growth (s_prev - s); ``max_step`` (in lambda) does not apply."""
        return sigma - sigma_next <= self.max_step_growth * (jnp.exp(-self.previous_lambda(state)) - sigma)

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
class LMS(Multistep):
    """Linear multistep in s with variable-step Adams-Bashforth weights (k-diffusion ``sample_lms``),
    ``solver_order`` p in 1..4 (default 3): order p on any smooth grid."""

    solver_order: int = 3

    name = "lms"

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.solver_order

    def __post_init__(self) -> None:
        check_choice("solver_order", self.solver_order, (1, 2, 3, 4))

    def init_state(self, x: Array, sigmas: Array) -> Any:
        return history_init(x, max(self.solver_order - 1, 1))

    def evaluate(self, denoise: Denoise, x: Array, sigma: Array) -> Array:
        return to_d(x, sigma, denoise(x, sigma))

    def extrapolation_safe(self, state: Any, sigma: Array, sigma_next: Array) -> Array:
        """These methods step in s: s - s' <= max_step_growth (s_prev - s); ``max_step`` (in lambda) does not apply."""
        return sigma - sigma_next <= self.max_step_growth * (jnp.exp(-self.previous_lambda(state)) - sigma)

    def update(self, x: Array, d: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        derivatives = [d] + [state[0][j] for j in range(order - 1)]
        levels = [sigma] + [jnp.exp(-state[1][j]) for j in range(order - 1)]
        slope = sum(w * d_j for w, d_j in zip(lagrange_step_weights(levels, sigma_next), derivatives))
        return x + (sigma_next - sigma) * slope, history_push(state, d, sigma)
