"""UniPC (Zhao et al. 2023): unified predictor UniP-p and corrector UniC-p, data prediction, lambda = -log s.

Step i at order p (1 NFE) has the denoiser outputs D_0 = D(x_i, s_i) and D_k = D(x_{i-k}, s_{i-k}), k < p, at
lambda_k; with h = lambda' - lambda_0, r_k = (lambda_k - lambda_0) / h and the divided differences D1_k = (D_k - D_0)
/ r_k, the paper's algorithm (data prediction, Alg. 2 with B(h)) is

    x_base = (s' / s) x - expm1(-h) D_0
    UniP-p:  x'  = x_base - B(h) sum_{k<p} a_k D1_k                          a solves R_{p-1} a = b_{p-1}
    UniC-p:  x'c = x_base - B(h) (sum_{k<p} c_k D1_k + c_p (D(x', s') - D_0))  c solves R_p c = b_p

with R_{jk} = r_k^j (r_p = 1), b_j = (j + 1)! phi_{j+1}(-h) / B(h), and B(h) = -h (bh1) or expm1(-h) (bh2);
UniP-2 uses a = 1/2 and UniC-1 c = 1/2. The corrector needs D(x', s'), which is the next step's D_0: it is applied
at the start of the next step, so UniPC costs 1 NFE per step. UniC-p raises the order to p + 1 (Thm 3.3). The
order follows ``multistep_orders`` (warm-up and, as in diffusers, lower order on the final steps). The last step
into s = 0 is the driver's first-order step D(x', s_last), which makes the last corrector irrelevant.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flaxdiff.samplers.common import Multistep, check_choice, history_init, history_push

Array = jax.Array

__all__ = ["UniPC"]


def unipc_coefficients(rks: list[Array], h: Array, variant: str) -> tuple[Array, Array, Array]:
    """(B(h), a, c) for order p = len(rks) + 1: the predictor weights a (p - 1 of them) and corrector weights c
    (p of them, the last one for the new evaluation at r = 1)."""
    order = len(rks) + 1
    h_phi_1 = jnp.expm1(-h)
    b_h = -h if variant == "bh1" else h_phi_1
    r_all = jnp.stack(list(rks) + [jnp.ones_like(h)])
    rows, rhs = [], []
    h_phi_k, factorial = h_phi_1 / (-h) - 1.0, 1
    for k in range(1, order + 1):
        rows.append(r_all ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / (-h) - 1.0 / factorial
    r_mat, b_vec = jnp.stack(rows), jnp.stack(rhs)
    half = jnp.full((1,), 0.5, h.dtype)
    if order == 1:
        return b_h, jnp.zeros((0,), h.dtype), half
    predictor = half if order == 2 else jnp.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
    return b_h, predictor, jnp.linalg.solve(r_mat, b_vec)


@dataclasses.dataclass(frozen=True)
class UniPC(Multistep):
    """UniPC multistep: ``solver_order`` p in {1, 2, 3}, ``variant`` "bh1" or "bh2", ``corrector`` on/off; 1 NFE per
    step; order p + 1 with the corrector, p without."""

    solver_order: int = 3
    variant: str = "bh2"
    corrector: bool = True

    name = "unipc"
    deterministic_options = ({}, {"corrector": False}, {"variant": "bh1"})

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.solver_order + int(self.corrector)

    def __post_init__(self) -> None:
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("variant", self.variant, ("bh1", "bh2"))

    def init_state(self, x: Array, sigmas: Array) -> Any:
        """History of (D, lambda) and the pending corrector (x_base_c, B(h) c_p): (x, 0) leaves step 0 as it is."""
        return history_init(x, self.solver_order), (x, jnp.zeros((), x.dtype))

    def previous_lambda(self, state: Any) -> Array:
        return state[0][1][0]

    def update(self, x: Array, x0_hat: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        history, (corrector_base, corrector_weight) = state
        if self.corrector:
            x = corrector_base - corrector_weight * (x0_hat - history[0][0])   # UniC of the previous step
        (x0s, lambdas) = history = history_push(history, x0_hat, sigma)
        h = jnp.log(sigma / sigma_next)
        rks = [(lambdas[k] - lambdas[0]) / h for k in range(1, order)]
        d1s = [(x0s[k] - x0s[0]) / rk for k, rk in zip(range(1, order), rks)]
        b_h, predictor, corrector = unipc_coefficients(rks, h, self.variant)
        x_base = (sigma_next / sigma) * x - jnp.expm1(-h) * x0s[0]
        x_next = x_base - b_h * sum((predictor[k] * d1 for k, d1 in enumerate(d1s)), jnp.zeros_like(x))
        corrector_base = x_base - b_h * sum((corrector[k] * d1 for k, d1 in enumerate(d1s)), jnp.zeros_like(x))
        return x_next, (history, (corrector_base, b_h * corrector[-1]))
