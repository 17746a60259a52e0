"""UniPC (Zhao et al. 2023): unified predictor (UniP-p) and corrector (UniC-p), data prediction, lambda = -log s.

With history D_0 = D(x_i, s_i), D_k at earlier levels lambda_k, h = lambda' - lambda_0, r_k = (lambda_k - lambda_0) / h:

    x_base = (s' / s) x - expm1(-h) D_0,          D1_k = (D_k - D_0) / r_k
    UniP:  x'  = x_base - B(h) sum_k rho^p_k D1_k
    UniC:  x'c = x_base - B(h) (sum_k rho^c_k D1_k + rho^c_p (D(x', s') - D_0))

B(h) = -h (bh1) or expm1(-h) (bh2); the rho solve R rho = b with R_{jk} = r_k^j (r_p = 1) and
b_j = (j + 1)! phi_{j+1}(-h) / B(h). The corrector reuses D(x', s'), the next step's first evaluation, so it
costs no extra NFE: each step is 1 NFE. The order warms up over the first steps (p = min(order, step + 1)).
On the last step into s = 0 the driver's first-order step D(x', s_last) is taken, so the final corrector is skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flaxdiff.samplers.common import Denoise, Sampler, check_choice, push

Array = jax.Array

__all__ = ["UniPC"]


def _coefficients(rks: list[Array], hh: Array, variant: str) -> tuple[Array, Array | None, Array]:
    """(B_h, rho_p or None, rho_c) for order p = len(rks) + 1, following the UniPC paper's B(h) variants."""
    order = len(rks) + 1
    h_phi_1 = jnp.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    r_all = jnp.stack(list(rks) + [jnp.ones_like(hh)])
    rows, b = [], []
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    for k in range(1, order + 1):
        rows.append(r_all ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r_mat, b_vec = jnp.stack(rows), jnp.stack(b)
    if order == 1:
        rho_p = None
        rho_c = jnp.full((1,), 0.5, hh.dtype)
    else:
        rho_p = jnp.full((1,), 0.5, hh.dtype) if order == 2 else jnp.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
        rho_c = jnp.linalg.solve(r_mat, b_vec)
    return b_h, rho_p, rho_c


@dataclasses.dataclass(frozen=True)
class UniPC(Sampler):
    """UniPC multistep: ``order`` in {1, 2, 3}, ``variant`` "bh1" or "bh2", ``corrector`` on/off; 1 NFE per step."""

    order: int = 3
    variant: str = "bh2"
    corrector: bool = True

    name = "unipc"

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        check_choice("variant", self.variant, ("bh1", "bh2"))

    def init_state(self, x: Array, sigmas: Array) -> Any:
        history = jnp.zeros((self.order,) + x.shape, x.dtype)
        lambdas = jnp.arange(self.order, dtype=x.dtype)
        corrector = (jnp.zeros_like(x), jnp.zeros((), x.dtype))
        return history, lambdas, jnp.zeros((), jnp.int32), corrector

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        history, lambdas, count, (corr_base, corr_coef) = state
        x0_hat = denoise(x, sigma)
        if self.corrector:
            x = jnp.where(count > 0, corr_base - corr_coef * (x0_hat - history[0]), x)
        history, lambdas, count = push(history, x0_hat), push(lambdas, -jnp.log(sigma)), count + 1

        h = jnp.log(sigma / sigma_next)
        hh = -h
        x_base = (sigma_next / sigma) * x - jnp.expm1(hh) * history[0]
        results = []
        for order in range(1, self.order + 1):
            rks = [(lambdas[k] - lambdas[0]) / h for k in range(1, order)]
            d1s = [(history[k] - history[0]) / rk for k, rk in zip(range(1, order), rks)]
            b_h, rho_p, rho_c = _coefficients(rks, hh, self.variant)
            x_pred = x_base if rho_p is None else x_base - b_h * sum(rho_p[k] * d1s[k] for k in range(order - 1))
            base_c = x_base - b_h * sum((rho_c[k] * d1s[k] for k in range(order - 1)), jnp.zeros_like(x))
            results.append((x_pred, base_c, b_h * rho_c[-1]))
        x_pred, base_c, coef_c = results[0]
        for order in range(2, self.order + 1):
            use = count >= order
            x_pred = jnp.where(use, results[order - 1][0], x_pred)
            base_c = jnp.where(use, results[order - 1][1], base_c)
            coef_c = jnp.where(use, results[order - 1][2], coef_c)
        return x_pred, (history, lambdas, count, (base_c, coef_c))


