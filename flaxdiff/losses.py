"""The training objective: noise-level sampling densities, loss weightings, condition dropout, the diffusion loss.

    L = E_{t, x0, eps} [ w(t) || F(c_in x_t, c_noise(t), cond) - target(x0, eps, t) ||^2 ],   x_t = alpha x0 + sigma eps

Time samplers draw t in [0, 1] (``time_samplers.get(name, ...)``). Weightings (``weightings.get(name, ...)``) are
defined as a weight on the x0-space error and carried into the predictor's target space through
``predictor.x0_error_scale`` (k, with ||x0_hat - x0||^2 = k ||F - target||^2), so that, for example, min-SNR-gamma
is min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v, automatically
correct for every target. ``uniform`` is the exception: weight 1 in the predictor's own target space (the "simple"
loss of each parameterisation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp

from flaxdiff.predictors import NoiseLevel, Predictor, noise_level
from flaxdiff.registry import Registry, to_config
from flaxdiff.schedules import DiscreteVPSchedule, NoiseSchedule

Array = jax.Array
# apply_fn(params, network_input, c_noise, cond) -> raw network output F (same shape as the input).
ApplyFn = Callable[[Any, Array, Array, Any], Array]

__all__ = [
    "TimeSampler",
    "UniformTime",
    "LogitNormalTime",
    "EDMLogNormalTime",
    "DiscreteTime",
    "Weighting",
    "time_samplers",
    "weightings",
    "drop_conditions",
    "diffusion_loss",
]


# --------------------------------------------------------------------------------------------------------------------
# Time (noise-level) sampling densities


@dataclasses.dataclass(frozen=True)
class TimeSampler:
    """Draws per-example times t of shape (batch,) for a schedule."""

    name: ClassVar[str] = ""

    def sample(self, key: Array, batch: int, schedule: NoiseSchedule) -> Array:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        return to_config(self)


@dataclasses.dataclass(frozen=True)
class UniformTime(TimeSampler):
    """t ~ U(t_min, t_max). The default t_min = 1e-5 keeps t = 0 (infinite SNR) out of the weights."""

    t_min: float = 1e-5
    t_max: float = 1.0

    name: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min!r}, t_max={self.t_max!r}")

    def sample(self, key: Array, batch: int, schedule: NoiseSchedule) -> Array:
        return jax.random.uniform(key, (batch,), minval=self.t_min, maxval=self.t_max)


@dataclasses.dataclass(frozen=True)
class LogitNormalTime(TimeSampler):
    """t = sigmoid(loc + scale n), n ~ N(0, 1) (Esser et al. 2024, SD3)."""

    loc: float = 0.0
    scale: float = 1.0

    name: ClassVar[str] = "logit_normal"

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale={self.scale!r} must be > 0")

    def sample(self, key: Array, batch: int, schedule: NoiseSchedule) -> Array:
        t = jax.nn.sigmoid(self.loc + self.scale * jax.random.normal(key, (batch,)))
        return jnp.clip(t, 1e-6, 1.0 - 1e-6)


@dataclasses.dataclass(frozen=True)
class EDMLogNormalTime(TimeSampler):
    """EDM: ln(sigma / alpha) ~ N(p_mean, p_std^2), mapped to t by the schedule's inverse and clipped to [0, 1]
    (so on a ``ve`` schedule the draw is clipped to [sigma_min, sigma_max])."""

    p_mean: float = -1.2
    p_std: float = 1.2

    name: ClassVar[str] = "edm_lognormal"

    def __post_init__(self) -> None:
        if not self.p_std > 0:
            raise ValueError(f"p_std={self.p_std!r} must be > 0")

    def sample(self, key: Array, batch: int, schedule: NoiseSchedule) -> Array:
        log_sigma = self.p_mean + self.p_std * jax.random.normal(key, (batch,))
        return jnp.clip(schedule.t_from_log_snr(-2.0 * log_sigma), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class DiscreteTime(TimeSampler):
    """t = i / T with i ~ U{1, ..., T}; T defaults to the schedule's ``num_timesteps`` (DDPM training)."""

    num_timesteps: int | None = None

    name: ClassVar[str] = "discrete"

    def __post_init__(self) -> None:
        if self.num_timesteps is not None and not (isinstance(self.num_timesteps, int) and self.num_timesteps >= 1):
            raise ValueError(f"num_timesteps={self.num_timesteps!r} must be a positive integer")

    def sample(self, key: Array, batch: int, schedule: NoiseSchedule) -> Array:
        steps = self.num_timesteps
        if steps is None:
            if not isinstance(schedule, DiscreteVPSchedule):
                raise ValueError(
                    f"time sampler 'discrete' needs num_timesteps for schedule {schedule.name!r} (it has no table)"
                )
            steps = schedule.num_timesteps
        return jax.random.randint(key, (batch,), 1, steps + 1).astype(jnp.float32) / steps


time_samplers: Registry[TimeSampler] = Registry("time sampler")
for _cls in (UniformTime, LogitNormalTime, EDMLogNormalTime, DiscreteTime):
    time_samplers.register(_cls.name, _cls)
time_samplers.register("lognormal", EDMLogNormalTime)


# --------------------------------------------------------------------------------------------------------------------
# Loss weightings


def _snr(level: NoiseLevel) -> Array:
    return (level.alpha / level.sigma) ** 2


@dataclasses.dataclass(frozen=True)
class Weighting:
    """A loss weighting w_x0(t) on the x0-space error; ``__call__`` returns the weight in the predictor's target
    space, w_x0(t) * k(t)."""

    name: ClassVar[str] = ""

    def x0_weight(self, level: NoiseLevel) -> Array:
        raise NotImplementedError

    def __call__(self, level: NoiseLevel, predictor: Predictor) -> Array:
        return self.x0_weight(level) * predictor.x0_error_scale(level)

    def to_config(self) -> dict[str, Any]:
        return to_config(self)


@dataclasses.dataclass(frozen=True)
class UniformWeighting(Weighting):
    """w = 1 in the predictor's target space (the parameterisation's "simple" loss)."""

    name: ClassVar[str] = "uniform"

    def __call__(self, level: NoiseLevel, predictor: Predictor) -> Array:
        return jnp.ones_like(level.alpha)


@dataclasses.dataclass(frozen=True)
class SNRWeighting(Weighting):
    """w_x0 = SNR = alpha^2 / sigma^2 (equals the epsilon-MSE)."""

    name: ClassVar[str] = "snr"

    def x0_weight(self, level: NoiseLevel) -> Array:
        return _snr(level)


@dataclasses.dataclass(frozen=True)
class MinSNRWeighting(Weighting):
    """Min-SNR-gamma (Hang et al. 2023): w_x0 = min(SNR, gamma)."""

    gamma: float = 5.0

    name: ClassVar[str] = "min_snr"

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"gamma={self.gamma!r} must be > 0")

    def x0_weight(self, level: NoiseLevel) -> Array:
        return jnp.minimum(_snr(level), self.gamma)


@dataclasses.dataclass(frozen=True)
class EDMWeighting(Weighting):
    """EDM: lambda(s) = (s^2 + sd^2) / (s sd)^2 at s = sigma / alpha; weight 1 on the EDM predictor's target."""

    sigma_data: float = 0.5

    name: ClassVar[str] = "edm"

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data={self.sigma_data!r} must be > 0")

    def x0_weight(self, level: NoiseLevel) -> Array:
        s_sq = (level.sigma / level.alpha) ** 2
        return (s_sq + self.sigma_data**2) / (s_sq * self.sigma_data**2)


@dataclasses.dataclass(frozen=True)
class P2Weighting(Weighting):
    """P2 (Choi et al. 2022): weight 1 / (k + SNR)^gamma on the epsilon loss, i.e. w_x0 = SNR / (k + SNR)^gamma."""

    gamma: float = 1.0
    k: float = 1.0

    name: ClassVar[str] = "p2"

    def __post_init__(self) -> None:
        if self.gamma < 0 or self.k <= 0:
            raise ValueError(f"p2 needs gamma >= 0 and k > 0, got gamma={self.gamma!r}, k={self.k!r}")

    def x0_weight(self, level: NoiseLevel) -> Array:
        snr = _snr(level)
        return snr / (self.k + snr) ** self.gamma


weightings: Registry[Weighting] = Registry("loss weighting")
for _cls in (UniformWeighting, SNRWeighting, MinSNRWeighting, EDMWeighting, P2Weighting):
    weightings.register(_cls.name, _cls)


# --------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance: condition dropout


def drop_conditions(
    key: Array,
    cond: Mapping[str, Array] | None,
    prob: float,
    null_cond: Mapping[str, Array] | None = None,
) -> tuple[Mapping[str, Array] | None, Array | None]:
    """Replace each example's conditioning by its null with probability ``prob``.

    ``null_cond`` maps a cond key to its null value (a scalar or one row, broadcast over the batch), e.g.
    ``{"label": num_classes}`` for a learned null class, or ``{"text": empty_prompt_embedding}``. Keys without an
    entry are nulled with zeros, except ``"label"``, which must be given, and ``"text_mask"``, which is left as it is.
    Returns (new_cond, drop_mask of shape (B,)).
    """
    if cond is None or not cond:
        return cond, None
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"condition dropout prob={prob!r} is outside [0, 1]")
    null_cond = dict(null_cond or {})
    if "label" in cond and "label" not in null_cond:
        raise ValueError("condition dropout on 'label' needs null_cond['label'] (the null class index, num_classes)")
    batch = next(iter(cond.values())).shape[0]
    drop = jax.random.bernoulli(key, prob, (batch,))
    out = {}
    for name, value in cond.items():
        if name == "text_mask" and name not in null_cond:
            out[name] = value
            continue
        null = jnp.asarray(null_cond.get(name, 0), value.dtype)
        mask = drop.reshape((batch,) + (1,) * (value.ndim - 1))
        out[name] = jnp.where(mask, jnp.broadcast_to(null, value.shape), value)
    return out, drop


# --------------------------------------------------------------------------------------------------------------------
# The loss


def diffusion_loss(
    apply_fn: ApplyFn,
    params: Any,
    x0: Array,
    cond: Mapping[str, Array] | None,
    key: Array,
    schedule: NoiseSchedule,
    predictor: Predictor,
    weighting: Weighting,
    time_sampler: TimeSampler,
    *,
    cond_drop_prob: float = 0.0,
    null_cond: Mapping[str, Array] | None = None,
    loss_mask: Array | None = None,
    noise: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The weighted denoising loss of one batch; returns (scalar loss, metrics).

    apply_fn(params, network_input, c_noise, cond) -> F. Randomness (t, eps, condition dropout) comes from ``key``
    only; a model's own dropout key should be closed over by ``apply_fn``. ``loss_mask`` (broadcastable to x0) limits
    the squared error to selected elements (e.g. visible patches); the per-example error is the masked mean.
    ``noise``, when given, is the eps of x_t = alpha x0 + sigma eps instead of a fresh draw (reflow's coupled pairs).
    Metrics: "loss", "loss_per_example", "mse_per_example", "t", "weight".
    """
    key_t, key_eps, key_drop = jax.random.split(key, 3)
    batch = x0.shape[0]
    t = time_sampler.sample(key_t, batch, schedule)
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype) if noise is None else noise
    level = noise_level(schedule, t)
    shape = (batch,) + (1,) * (x0.ndim - 1)
    x_t = level.alpha.reshape(shape) * x0 + level.sigma.reshape(shape) * eps
    target = predictor.target(x0, eps, level)
    if cond_drop_prob > 0.0:
        cond, _ = drop_conditions(key_drop, cond, cond_drop_prob, null_cond)
    output = apply_fn(params, predictor.network_input(x_t, level), predictor.c_noise(level), cond)
    sq_err = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
    axes = tuple(range(1, x0.ndim))
    if loss_mask is None:
        mse = jnp.mean(sq_err, axis=axes)
    else:
        mask = jnp.broadcast_to(loss_mask, sq_err.shape).astype(jnp.float32)
        mse = jnp.sum(sq_err * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)
    weight = weighting(level, predictor)
    per_example = weight * mse
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "loss_per_example": per_example, "mse_per_example": mse, "t": t, "weight": weight}
