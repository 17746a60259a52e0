"""Shared sampler math, written once: the sampler protocol, ODE derivative, ancestral step sizes, log-SNR steps,
noise draws and fixed-shape multistep history.

All samplers work in VE-equivalent coordinates (Karras et al. 2022): x~ = x_t / alpha at the level
s = sigma / alpha, where the probability-flow ODE is

    dx~/ds = (x~ - D(x~, s)) / s

and D is the denoiser (x0_hat). ``lambda = -log s`` is half the log-SNR; exponential integrators step in it.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from flaxdiff.registry import to_config

Array = jax.Array
# D(x~, s) -> x0_hat with s a scalar array; the driver binds conditioning and guidance.
Denoise = Callable[[Array, Array], Array]

__all__ = [
    "Sampler",
    "Multistep",
    "multistep_orders",
    "history_init",
    "history_push",
    "Denoise",
    "to_d",
    "ancestral_step",
    "exp_step",
    "gaussian_like",
    "sub_key",
    "push",
    "check_eta",
    "EtaSampler",
    "check_choice",
]


StepFn = Callable[[Denoise, Array, Any, Array, Array, "Array | None"], tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler is one step function, its declared cost and order, and the loop that runs it.

    ``step(denoise, x, state, sigma, sigma_next, key) -> (x, state)`` moves x~ from level ``sigma`` to
    ``sigma_next > 0`` using exactly ``nfe_per_step`` calls of ``denoise``. ``final_step`` takes the last step
    into s = 0 (default: the first-order step x = D(x, sigma), 1 NFE; see ``flaxdiff.timesteps``).
    ``init_state(x, sigmas)`` builds the fixed-shape carry (multistep history, constants from the grid).
    ``run`` is the compiled loop (``lax.scan`` over ``stages``); a sampler that picks its own steps overrides it.

    Declared, and measured by the shared test battery for every registered sampler:

    * ``order``: global order p of the deterministic form, endpoint error O(h^p) on a smooth grid;
    * ``deterministic_options``: option sets giving a deterministic (ODE) form, each measured for ``order``;
      empty when the sampler always draws noise (then its weak order is measured);
    * ``stochastic_options``: option sets that make it draw noise, each checked against the exact moments;
    * ``accuracy_sweep``: for samplers that choose their own steps, option sets of rising accuracy over which the
      battery measures ``order`` as the slope of error against NFE (empty: the battery refines the grid);
    * ``low_budget_options``: deterministic option sets for low NFE that give up the asymptotic ``order`` for fewer
      evaluations (the analytical first step of ``ipndm`` / ``lms``); the battery counts their NFE and checks their
      stability on every grid, and the benchmark measures them next to ``deterministic_options``.
    """

    name: ClassVar[str] = ""
    nfe_per_step: ClassVar[int] = 1
    order: ClassVar[int] = 0
    deterministic_options: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    stochastic_options: ClassVar[tuple[dict[str, Any], ...]] = ()
    accuracy_sweep: ClassVar[tuple[dict[str, Any], ...]] = ()
    low_budget_options: ClassVar[tuple[dict[str, Any], ...]] = ()

    @property
    def stochastic(self) -> bool:
        """True when steps draw noise (and so need a key)."""
        return False

    def init_state(self, x: Array, sigmas: Array) -> Any:
        return ()

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        raise NotImplementedError

    def final_step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, key: Array | None) -> Array:
        """Euler (= DDIM) step from ``sigma`` to 0: x + (0 - s) (x - D) / s = D(x, s)."""
        return denoise(x, sigma)

    def stages(self, scanned: int, intervals: int) -> list[tuple[StepFn, int]]:
        """The ``scanned`` steps of a grid with ``intervals`` intervals as runs (step function, number of steps):
        one run of ``step`` (multistep methods change order at the ends, see ``Multistep``)."""
        return [(self.step, scanned)] if scanned else []

    def nfe(self, num_levels: int, final_zero: bool) -> int:
        """Exact NFE on a grid of ``num_levels`` entries: nfe_per_step per scanned step, +1 for the final step."""
        return self.nfe_per_step * (num_levels - 1 - int(final_zero)) + int(final_zero)

    def run(self, denoise: Denoise, x: Array, sigmas: Array, key: Array | None,
            final_zero: bool) -> tuple[Array, Array]:
        """Run over the grid ``sigmas`` (traceable, call inside jit); returns (x at the last level, nfe).

        Step i moves sigmas[i] -> sigmas[i + 1] with key fold_in(fold_in(key, 1), i); each stage is one
        ``lax.scan`` (a single step is called directly). With ``final_zero`` the last interval is ``final_step``.
        """
        intervals = sigmas.shape[0] - 1
        scanned = intervals - int(final_zero)
        state = self.init_state(x, sigmas)
        base = sub_key(key, 1) if key is not None else None

        def step_key(index: Array | int) -> Array | None:
            return sub_key(base, index) if base is not None else None

        start = 0
        for step_fn, count in self.stages(scanned, intervals):
            if count == 1:
                x, state = step_fn(denoise, x, state, sigmas[start], sigmas[start + 1], step_key(start))
            else:
                def body(carry: tuple[Array, Any], index: Array, step_fn: StepFn = step_fn) -> tuple[tuple, None]:
                    return step_fn(denoise, *carry, sigmas[index], sigmas[index + 1], step_key(index)), None

                (x, state), _ = jax.lax.scan(body, (x, state), jnp.arange(start, start + count))
            start += count
        if final_zero:
            x = self.final_step(denoise, x, state, sigmas[scanned], step_key(scanned))
        return x, jnp.asarray(self.nfe(sigmas.shape[0], final_zero), jnp.int32)

    def to_config(self) -> dict[str, Any]:
        return to_config(self)


def multistep_orders(solver_order: int, scanned: int, intervals: int, lower_order_final: bool) -> list[int]:
    """Order used at each scanned step i of a multistep method of order p on a grid of N = ``intervals`` intervals:

        p_i = min(p, i + 1)             warm-up: step i has only i + 1 denoiser outputs
        p_i = min(p, i + 1, N - i)      with ``lower_order_final`` (diffusers): the last steps lower the order
                                        again, which keeps high-order steps off the few large final intervals.
    """
    return [min(solver_order, i + 1, intervals - i if lower_order_final else solver_order) for i in range(scanned)]


@dataclasses.dataclass(frozen=True)
class Multistep(Sampler):
    """A linear multistep sampler: 1 NFE per step, earlier denoiser outputs in a fixed-shape history.

    A step is ``evaluate`` (the one NFE: D, or d for methods in s) and ``update(x, value, state, sigma, sigma_next,
    key, order)`` at a static ``order`` <= ``solver_order``. ``stages`` runs the warm-up and final steps at the lower
    orders of ``multistep_orders`` as their own stages, so no step branches on a step counter.

    Extrapolation guard: the higher-order update extrapolates the history, and its divided differences carry
    1 / r = h / h_prev, so a step much longer than the last one, or long in itself, amplifies them (with D a
    sigmoid in lambda at the noise levels where a sample picks its mode, a polynomial extrapolated far overshoots).
    A step with h > ``max_step_growth`` h_prev or h > ``max_step`` (h in lambda = -log s; methods in s measure s)
    takes the first-order update instead (``extrapolation_safe``). Grids whose last interval to s_min is long
    (time_uniform, flow_shift, time_quadratic) and very coarse grids need it; at 24+ karras steps it never triggers
    (the shared battery measures the full order there). ``max_step_growth=inf, max_step=inf`` turns it off.
    """

    lower_order_final: bool = True
    max_step_growth: float = 1.2
    max_step: float = 1.5

    @property
    def solver_order(self) -> int:
        """Number of denoiser outputs the full-order step combines (the declared ``order`` by default)."""
        return self.order

    def evaluate(self, denoise: Denoise, x: Array, sigma: Array) -> Array:
        """The step's one denoiser evaluation, in the form the history keeps (default: D(x, s))."""
        return denoise(x, sigma)

    def update(self, x: Array, value: Array, state: Any, sigma: Array, sigma_next: Array, key: Array | None,
               order: int) -> tuple[Array, Any]:
        raise NotImplementedError

    def previous_lambda(self, state: Any) -> Array:
        """lambda = -log s of the previous step's level (the newest history entry)."""
        return state[1][0]

    def extrapolation_safe(self, state: Any, sigma: Array, sigma_next: Array) -> Array:
        """Whether the higher-order update may extrapolate the history over this step (lambda = -log s):
        h <= max_step_growth h_prev and h <= max_step."""
        h = jnp.log(sigma / sigma_next)
        return (h <= self.max_step_growth * (-jnp.log(sigma) - self.previous_lambda(state))) & (h <= self.max_step)

    def multistep(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
                  key: Array | None, order: int) -> tuple[Array, Any]:
        value = self.evaluate(denoise, x, sigma)
        result = self.update(x, value, state, sigma, sigma_next, key, order)
        if order == 1:
            return result
        first_order = self.update(x, value, state, sigma, sigma_next, key, 1)
        within = self.extrapolation_safe(state, sigma, sigma_next)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(within, a, b), result, first_order)

    def step(self, denoise: Denoise, x: Array, state: Any, sigma: Array, sigma_next: Array,
             key: Array | None) -> tuple[Array, Any]:
        return self.multistep(denoise, x, state, sigma, sigma_next, key, self.solver_order)

    def stages(self, scanned: int, intervals: int) -> list[tuple[StepFn, int]]:
        orders = multistep_orders(self.solver_order, scanned, intervals, self.lower_order_final)
        return [(functools.partial(self.multistep, order=order), len(list(run)))
                for order, run in itertools.groupby(orders)]


def history_init(x: Array, size: int) -> tuple[Array, Array]:
    """(values (size, *x.shape), log-levels lambda = -log s (size,)): newest first, filled by ``history_push``."""
    return jnp.zeros((size,) + x.shape, x.dtype), jnp.zeros((size,), x.dtype)


def history_push(history: tuple[Array, Array], value: Array, sigma: Array) -> tuple[Array, Array]:
    values, lambdas = history
    return push(values, value), push(lambdas, -jnp.log(sigma).astype(lambdas.dtype))


def to_d(x: Array, sigma: Array, x0_hat: Array) -> Array:
    """The PF-ODE derivative dx/ds = (x - D) / s."""
    return (x - x0_hat) / sigma


def ancestral_step(sigma: Array, sigma_next: Array, eta: float) -> tuple[Array, Array]:
    """(sigma_down, sigma_up) of an ancestral step s -> s' with strength eta:

        sigma_up = min(s', eta s' sqrt(s^2 - s'^2) / s),    sigma_down = sqrt(s'^2 - sigma_up^2).

    eta = 1 is the DDPM posterior q(x_s' | x_s, x0): sigma_down = s'^2 / s, variance s'^2 (s^2 - s'^2) / s^2.
    """
    if eta == 0:
        return sigma_next, jnp.zeros_like(sigma_next)
    sigma_up = jnp.minimum(sigma_next, eta * sigma_next * jnp.sqrt(jnp.maximum(sigma**2 - sigma_next**2, 0.0))
                           / sigma)
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def exp_step(x: Array, x0_hat: Array, sigma: Array, sigma_next: Array) -> Array:
    """First-order exponential-integrator (DPM-Solver++ 1 = DDIM) step in lambda = -log s:

        x' = (s' / s) x - expm1(-h) x0_hat,   h = log(s / s').
    """
    return (sigma_next / sigma) * x + (1.0 - sigma_next / sigma) * x0_hat


def _is_batched_key(key: Array, x: Array) -> bool:
    base = 0 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 1
    return key.ndim == base + 1 and key.shape[0] == x.shape[0] and x.ndim >= 1


def gaussian_like(key: Array, x: Array) -> Array:
    """Standard normal noise shaped like x. A batch of keys (B,) draws row i from key i only (per-sample seeds)."""
    if _is_batched_key(key, x):
        return jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(key)
    return jax.random.normal(key, x.shape, x.dtype)


def sub_key(key: Array, index: int | Array) -> Array:
    """fold_in(key, index), applied row-wise to a batch of per-sample keys."""
    base = 0 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 1
    if key.ndim == base + 1:
        return jax.vmap(lambda k: jax.random.fold_in(k, index))(key)
    return jax.random.fold_in(key, index)


def push(history: Array, value: Array) -> Array:
    """Fixed-shape multistep history, newest first: [value, h_0, ..., h_{K-2}]."""
    return jnp.concatenate([value[None], history[:-1]], axis=0)


def check_eta(eta: float) -> None:
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class EtaSampler(Sampler):
    """A sampler whose injected noise is scaled by ``eta`` >= 0; eta = 0 makes it deterministic."""

    eta: float = 1.0

    def __post_init__(self) -> None:
        check_eta(self.eta)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
