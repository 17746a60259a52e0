"""Shared sampler math, written once: the sampler protocol, ODE derivative, ancestral step sizes, log-SNR steps,
noise draws and fixed-shape multistep history.

All samplers work in VE-equivalent coordinates (Karras et al. 2022): x~ = x_t / alpha at the level
s = sigma / alpha, where the probability-flow ODE is

    dx~/ds = (x~ - D(x~, s)) / s

and D is the denoiser (x0_hat). ``lambda = -log s`` is half the log-SNR; exponential integrators step in it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

Array = jax.Array
# D(x~, s) -> x0_hat with s a scalar array; the driver binds conditioning and guidance.
Denoise = Callable[[Array, Array], Array]

__all__ = [
    "Sampler",
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


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler is one step function plus its declared cost.

    ``step(denoise, x, state, sigma, sigma_next, key) -> (x, state)`` moves x~ from level ``sigma`` to
    ``sigma_next > 0`` using exactly ``nfe_per_step`` calls of ``denoise``. ``final_step`` takes the last step
    into s = 0 (default: the first-order step x = D(x, sigma), 1 NFE; see ``flaxdiff.timesteps``).
    ``init_state(x, sigmas)`` builds the fixed-shape carry (multistep history, constants from the grid).
    """

    name: ClassVar[str] = ""
    nfe_per_step: ClassVar[int] = 1
    adaptive: ClassVar[bool] = False

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

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


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
