"""Noise schedules: every Gaussian diffusion as a pair (alpha(t), sigma(t)) on t in [0, 1].

    x_t = alpha(t) * x0 + sigma(t) * eps,       eps ~ N(0, I)

Every schedule also gives, for free,

    log-SNR     lambda(t) = log(alpha^2 / sigma^2)            (strictly decreasing in t)
    VE level    sigma_ratio(t) = sigma / alpha = exp(-lambda / 2)

and the inverse maps ``t_from_log_snr`` / ``t_from_sigma_ratio``. Schedules are small frozen dataclasses:
hashable (usable as static arguments to ``jax.jit``), JSON round-trippable through ``to_config`` /
``from_config``, and their methods are pure ``jax.numpy`` functions of ``t``.

Registry: ``get(name, **kwargs)``, ``available()``, ``from_config(config)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.registry import Registry, to_config

Array = jax.Array

__all__ = [
    "NoiseSchedule",
    "DiscreteVPSchedule",
    "CosineContinuousSchedule",
    "VESchedule",
    "RectifiedFlowSchedule",
    "get",
    "available",
    "from_config",
    "register",
]


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Base class. Subclasses implement ``alpha_sigma(t)`` and ``t_from_log_snr(lam)``."""

    name: ClassVar[str] = ""
    variance_preserving: ClassVar[bool] = False

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        raise NotImplementedError

    def t_from_log_snr(self, log_snr: Array) -> Array:
        raise NotImplementedError

    def alpha(self, t: Array) -> Array:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Array) -> Array:
        return self.alpha_sigma(t)[1]

    def log_snr(self, t: Array) -> Array:
        """lambda(t) = log(alpha^2 / sigma^2) = 2 (log alpha - log sigma)."""
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def sigma_ratio(self, t: Array) -> Array:
        """The VE-equivalent noise level sigma(t) / alpha(t)."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_from_sigma_ratio(self, sigma_ratio: Array) -> Array:
        """Inverse of ``sigma_ratio``: lambda = -2 log(sigma / alpha)."""
        return self.t_from_log_snr(-2.0 * jnp.log(sigma_ratio))

    def alpha_sigma_derivatives(self, t: Array) -> tuple[Array, Array]:
        """(d alpha / dt, d sigma / dt), by forward-mode differentiation of ``alpha_sigma``."""
        t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
        _, tangents = jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))
        return tangents

    @property
    def sigma_ratio_range(self) -> tuple[float, float]:
        """(sigma_ratio(0), sigma_ratio(1)) as Python floats; the upper end may be ``inf``."""
        with jax.ensure_compile_time_eval():
            low = float(self.sigma_ratio(jnp.float32(0.0)))
            high = float(self.sigma_ratio(jnp.float32(1.0)))
        return low, high

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict from which ``from_config`` rebuilds this schedule exactly."""
        return to_config(self, exclude=self._implied)

    _implied: ClassVar[tuple[str, ...]] = ()


def _check_unit_interval(name: str, value: float, *, closed_low: bool = False) -> None:
    ok = (0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0)
    if not ok:
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name}={value!r} is outside {interval}")


def _betas_for_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], num_timesteps: int,
                         max_beta: float) -> np.ndarray:
    """beta_i = min(1 - alpha_bar(i / T) / alpha_bar((i - 1) / T), max_beta), i = 1..T (Nichol & Dhariwal 2021)."""
    grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    values = alpha_bar(grid)
    return np.minimum(1.0 - values[1:] / values[:-1], max_beta)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that its last entry is exactly 0."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


@dataclasses.dataclass(frozen=True)
class DiscreteVPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule from a table of betas (DDPM family).

    alpha_bar_i = prod_{j <= i} (1 - beta_j), i = 1..T, placed at t_i = i / T, with alpha_bar_0 = 1 at t = 0.
    Between table entries alpha_bar (and 1 - alpha_bar) are interpolated linearly in t, so the schedule is exact at
    t = i / T, continuous, strictly monotone and exactly invertible; alpha = sqrt(alpha_bar),
    sigma = sqrt(1 - alpha_bar).

    kind: "linear" (DDPM: betas linear in [beta_start, beta_end]), "scaled_linear" (Stable Diffusion: sqrt(beta)
    linear in [sqrt(beta_start), sqrt(beta_end)]; SD uses 0.00085 .. 0.012), "cosine" (Nichol & Dhariwal 2021:
    alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)) normalised, betas capped at max_beta), "sqrt" (Li et al. 2022:
    alpha_bar(t) = 1 - sqrt(t + s), betas capped at max_beta), "exp" (betas geometric from beta_start to beta_end).
    zero_terminal_snr: rescale the betas so that alpha_bar_T = 0 (Lin et al. 2023).
    """

    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    offset: float = 0.008
    max_beta: float = 0.999
    zero_terminal_snr: bool = False

    variance_preserving: ClassVar[bool] = True
    _implied: ClassVar[tuple[str, ...]] = ("kind",)
    kinds: ClassVar[tuple[str, ...]] = ("linear", "scaled_linear", "cosine", "sqrt", "exp")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    def __post_init__(self) -> None:
        if self.kind not in self.kinds:
            raise ValueError(f"unknown discrete VP kind {self.kind!r}; available: {', '.join(self.kinds)}")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps={self.num_timesteps!r} must be an integer >= 2")
        _check_unit_interval("beta_start", self.beta_start)
        _check_unit_interval("beta_end", self.beta_end)
        _check_unit_interval("max_beta", self.max_beta)
        if self.kind in ("linear", "scaled_linear", "exp") and self.beta_start > self.beta_end:
            raise ValueError(f"beta_start={self.beta_start!r} must not exceed beta_end={self.beta_end!r}")
        if self.offset < 0:
            raise ValueError(f"offset={self.offset!r} must be >= 0")

    def betas(self) -> np.ndarray:
        """The float64 beta table, beta_1..beta_T."""
        return self._tables[0]

    def alphas_cumprod(self) -> np.ndarray:
        """The float64 alpha_bar table alpha_bar_1..alpha_bar_T."""
        return self._tables[1][1:]

    @functools.cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        T = self.num_timesteps
        if self.kind == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        elif self.kind == "scaled_linear":
            betas = np.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), T, dtype=np.float64) ** 2
        elif self.kind == "exp":
            betas = np.exp(np.linspace(math.log(self.beta_start), math.log(self.beta_end), T, dtype=np.float64))
        elif self.kind == "cosine":
            s = self.offset
            betas = _betas_for_alpha_bar(lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2, T, self.max_beta)
        else:
            betas = _betas_for_alpha_bar(lambda u: 1.0 - np.sqrt(u + 1e-4), T, self.max_beta)
        if self.zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        with np.errstate(divide="ignore"):
            log_ab = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
        alpha_bar = np.exp(log_ab)
        one_minus = -np.expm1(log_ab)
        if self.zero_terminal_snr:
            alpha_bar[-1], one_minus[-1] = 0.0, 1.0
        return betas, alpha_bar, one_minus

    def _interp(self, t: Array) -> tuple[Array, Array]:
        _, alpha_bar, one_minus = self._tables
        dtype = jnp.result_type(t, jnp.float32)
        T = self.num_timesteps
        pos = jnp.clip(jnp.asarray(t, dtype) * T, 0.0, float(T))
        idx = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, T - 1)
        frac = pos - idx
        ab, om = jnp.asarray(alpha_bar, dtype), jnp.asarray(one_minus, dtype)
        ab_t = ab[idx] + frac * (ab[idx + 1] - ab[idx])
        om_t = om[idx] + frac * (om[idx + 1] - om[idx])
        return ab_t, om_t

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        ab_t, om_t = self._interp(t)
        return jnp.sqrt(ab_t), jnp.sqrt(om_t)

    def log_snr(self, t: Array) -> Array:
        ab_t, om_t = self._interp(t)
        return jnp.log(ab_t) - jnp.log(om_t)

    def t_from_log_snr(self, log_snr: Array) -> Array:
        """Invert the piecewise-linear alpha_bar: alpha_bar = sigmoid(lambda), located by binary search.

        Within a segment t = (i + f) / T with f taken from whichever of alpha_bar, 1 - alpha_bar is the smaller
        (and so the more precise) number.
        """
        _, alpha_bar, one_minus = self._tables
        log_snr = jnp.asarray(log_snr)
        dtype = jnp.result_type(log_snr, jnp.float32)
        T = self.num_timesteps
        ab = jax.nn.sigmoid(log_snr.astype(dtype))
        om = jax.nn.sigmoid(-log_snr.astype(dtype))
        om_table = jnp.asarray(one_minus, dtype)
        ab_table = jnp.asarray(alpha_bar, dtype)
        idx = jnp.clip(jnp.searchsorted(om_table, om, side="right") - 1, 0, T - 1)
        f_om = (om - om_table[idx]) / (om_table[idx + 1] - om_table[idx])
        f_ab = (ab_table[idx] - ab) / (ab_table[idx] - ab_table[idx + 1])
        frac = jnp.clip(jnp.where(om < 0.5, f_om, f_ab), 0.0, 1.0)
        return (idx + frac) / T


@dataclasses.dataclass(frozen=True)
class CosineContinuousSchedule(NoiseSchedule):
    """Continuous VP cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2); lambda = -2 log tan(pi t / 2)."""

    name: ClassVar[str] = "cosine_continuous"
    variance_preserving: ClassVar[bool] = True

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        angle = jnp.asarray(t, jnp.result_type(t, jnp.float32)) * (jnp.pi / 2)
        return jnp.maximum(jnp.cos(angle), 0.0), jnp.sin(angle)

    def log_snr(self, t: Array) -> Array:
        return -2.0 * jnp.log(jnp.tan(jnp.asarray(t, jnp.result_type(t, jnp.float32)) * (jnp.pi / 2)))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        log_snr = jnp.asarray(log_snr, jnp.result_type(log_snr, jnp.float32))
        return jnp.arctan(jnp.exp(-0.5 * log_snr)) * (2 / jnp.pi)


@dataclasses.dataclass(frozen=True)
class VESchedule(NoiseSchedule):
    """Variance exploding (Karras/EDM family): alpha = 1, sigma in [sigma_min, sigma_max].

    rho = None: geometric, sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021).
    rho > 0:    Karras et al. 2022, sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float | None = None

    name: ClassVar[str] = "ve"

    def __post_init__(self) -> None:
        if not self.sigma_min > 0:
            raise ValueError(f"sigma_min={self.sigma_min!r} must be > 0")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min!r} must be < sigma_max={self.sigma_max!r}")
        if self.rho is not None and not self.rho > 0:
            raise ValueError(f"rho={self.rho!r} must be > 0 (or None for the geometric schedule)")

    def _sigma(self, t: Array) -> Array:
        t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
        if self.rho is None:
            return self.sigma_min * jnp.exp(t * math.log(self.sigma_max / self.sigma_min))
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + t * (hi - lo)) ** self.rho

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        sigma = self._sigma(t)
        return jnp.ones_like(sigma), sigma

    def log_snr(self, t: Array) -> Array:
        return -2.0 * jnp.log(self._sigma(t))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        log_snr = jnp.asarray(log_snr, jnp.result_type(log_snr, jnp.float32))
        log_sigma = -0.5 * log_snr
        if self.rho is None:
            return (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (jnp.exp(log_sigma / self.rho) - lo) / (hi - lo)


@dataclasses.dataclass(frozen=True)
class RectifiedFlowSchedule(NoiseSchedule):
    """Rectified flow: alpha = 1 - t', sigma = t', with the SD3 resolution shift t' = s t / (1 + (s - 1) t)."""

    shift: float = 1.0

    name: ClassVar[str] = "rectified_flow"

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift!r} must be > 0")

    def shifted(self, t: Array) -> Array:
        t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        ts = self.shifted(t)
        return 1 - ts, ts

    def log_snr(self, t: Array) -> Array:
        ts = self.shifted(t)
        return 2.0 * (jnp.log1p(-ts) - jnp.log(ts))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        log_snr = jnp.asarray(log_snr, jnp.result_type(log_snr, jnp.float32))
        ts = jax.nn.sigmoid(-0.5 * log_snr)
        return ts / (self.shift - (self.shift - 1) * ts)


_REGISTRY: Registry[NoiseSchedule] = Registry("schedule")
register = _REGISTRY.register
available = _REGISTRY.available
get = _REGISTRY.get
from_config = _REGISTRY.from_config


def _karras(**kwargs: Any) -> VESchedule:
    """The EDM defaults: sigma in [0.002, 80] with rho = 7."""
    return VESchedule(**{"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, **kwargs})


for _kind in DiscreteVPSchedule.kinds:
    register(_kind, functools.partial(DiscreteVPSchedule, _kind))
register("cosine_continuous", CosineContinuousSchedule)
register("ve", VESchedule)
register("karras", _karras)
register("edm", _karras)
register("rectified_flow", RectifiedFlowSchedule)
