"""Training objectives: a loss is an object the trainer is given (EDM's separation of architecture,
preconditioning and loss).

The protocol, for every registered member:

    loss(apply_fn, params, batch, key, *, train=True) -> (scalar loss, metrics)

- ``apply_fn(params, *inputs, **kwargs)`` is the trainer's model call, ``model.apply({"params": params}, *inputs,
  rngs=..., **kwargs)``: params and the first input run in the trainer's compute dtype, floating outputs come back
  as float32, and in training the trainer's 'dropout' rng stream is attached (a loss may add streams with
  ``rngs={...}``, which are merged). The loss never sees the module: it knows the call contract of the model
  family it trains (a denoiser ``(x, c_noise, cond, train=...)``, an autoencoder ``(x, sample_posterior=...)``,
  a classifier ``(x,)``), so the trainer stays model-agnostic.
- ``batch`` is a dict of global arrays (one micro-batch); ``key`` is the loss's own PRNG key (the trainer's
  dropout key is split off before); ``train=False`` is evaluation (no condition dropout).
- ``metrics`` holds at least ``"loss"``; its scalar entries are averaged over micro-batches and logged.

Besides ``__call__`` a loss says how to initialise its model (``init_inputs(batch) -> (args, kwargs)`` on a batch
of zeros), may refuse a model it cannot train (``check_model``) and round-trips through JSON (``to_config``,
``objectives.from_config``). Members:

- ``diffusion``: E_{t, eps}[ w(t) ||F(c_in x_t, c_noise, cond') - target(x0, eps, t)||^2 ] with
  x_t = alpha x0 + sigma eps and cond' the conditioning after dropout (``losses.diffusion_loss``).
- ``reflow``: the same with eps = batch["noise"], the coupled noise of (eps, x0 = ODE(eps)) pairs.
- ``masked_diffusion``: MicroDiT, the diffusion loss over the visible patches only (``masking.visible_patch_loss``).
- ``autoencoder``: ||x - Dec(z)||^2 / D + kl_weight KL(q(z | x) || N(0, I)) / D, z ~ q(z | x).
- ``classifier``: softmax cross-entropy of the labels on randomly translated images.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import optax

from flaxdiff import losses, predictors, schedules
from flaxdiff.predictors import Predictor
from flaxdiff.registry import Registry
from flaxdiff.schedules import NoiseSchedule

Array = jax.Array
Batch = Mapping[str, Any]
# apply_fn(params, *inputs, **kwargs) -> model outputs (see the module docstring).
ModelApply = Callable[..., Any]

__all__ = ["Objective", "DiffusionLoss", "ReflowLoss", "MaskedDiffusionLoss", "AutoencoderLoss", "ClassifierLoss",
           "objectives", "from_config", "split_config", "join_config"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """Base of the training losses: ``__call__``, ``init_inputs``, ``check_model`` and ``to_config``."""

    name: ClassVar[str] = ""

    def __call__(self, apply_fn: ModelApply, params: Any, batch: Batch, key: Array, *,
                 train: bool = True) -> tuple[Array, dict[str, Array]]:
        raise NotImplementedError

    def init_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) of ``model.init(rngs, *args, **kwargs)`` for a batch of zeros."""
        raise NotImplementedError

    def check_model(self, model: Any) -> None:
        """Raise ValueError if this loss cannot train ``model`` (default: any model)."""

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_config"):
        return value.to_config()
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------------------------
# Diffusion


@dataclasses.dataclass(frozen=True)
class DiffusionLoss(Objective):
    """The weighted denoising loss of :func:`flaxdiff.losses.diffusion_loss` on ``batch[image_key]``.

    schedule: alpha(t), sigma(t) of x_t = alpha x0 + sigma eps.
    predictor: the network's parameterisation (its target, input scaling c_in and c_noise).
    weighting: w(t) on the squared error in the predictor's target space.
    time_sampler: the density of t.
    cond_drop_prob: per-example probability of replacing the conditioning by ``null_cond`` (training only).
    null_cond: the null value per cond key (see ``losses.drop_conditions``).
    image_key: the batch entry holding x0; every other entry except "loss_mask" is conditioning.
    """

    schedule: NoiseSchedule
    predictor: Predictor
    weighting: losses.Weighting
    time_sampler: losses.TimeSampler
    cond_drop_prob: float = 0.0
    null_cond: Mapping[str, Any] | None = None
    image_key: str = "image"

    name: ClassVar[str] = "diffusion"
    # batch entries that are neither x0 nor conditioning
    reserved_keys: ClassVar[tuple[str, ...]] = ("loss_mask",)

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob={self.cond_drop_prob!r} is outside [0, 1]")
        if self.null_cond is not None:
            object.__setattr__(self, "null_cond", dict(self.null_cond))

    def split_batch(self, batch: Batch) -> tuple[Array, dict[str, Array] | None, Array | None]:
        """(x0, cond or None, loss_mask or None)."""
        if self.image_key not in batch:
            raise ValueError(f"the batch has no {self.image_key!r} entry; keys: {sorted(batch)}")
        skip = (self.image_key,) + self.reserved_keys
        cond = {k: v for k, v in batch.items() if k not in skip}
        return batch[self.image_key], (cond or None), batch.get("loss_mask")

    def coupled_noise(self, batch: Batch) -> Array | None:
        """The eps of x_t given by the batch (None: drawn from the key)."""
        return None

    def __call__(self, apply_fn: ModelApply, params: Any, batch: Batch, key: Array, *,
                 train: bool = True) -> tuple[Array, dict[str, Array]]:
        x0, cond, loss_mask = self.split_batch(batch)

        def denoiser(p: Any, x: Array, c_noise: Array, c: Any) -> Array:
            return apply_fn(p, x, c_noise, c, train=train)

        return losses.diffusion_loss(denoiser, params, x0, cond, key, self.schedule, self.predictor, self.weighting,
                                     self.time_sampler, cond_drop_prob=self.cond_drop_prob if train else 0.0,
                                     null_cond=self.null_cond, loss_mask=loss_mask, noise=self.coupled_noise(batch))

    def init_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x0, cond, _ = self.split_batch(batch)
        return (x0, jnp.zeros((x0.shape[0],), jnp.float32), cond), {"train": False}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiffusionLoss":
        kwargs = {k: v for k, v in config.items() if k != "name"}
        kwargs["schedule"] = schedules.from_config(kwargs["schedule"])
        kwargs["predictor"] = predictors.from_config(kwargs["predictor"])
        kwargs["weighting"] = losses.weightings.from_config(kwargs["weighting"])
        kwargs["time_sampler"] = losses.time_samplers.from_config(kwargs["time_sampler"])
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class ReflowLoss(DiffusionLoss):
    """Reflow (Liu et al. 2022): the diffusion loss with eps = ``batch[noise_key]`` (the coupled noise of the
    pair), which is not conditioning. Reflow trains without condition dropout, so ``cond_drop_prob`` defaults
    to 0."""

    noise_key: str = "noise"

    name: ClassVar[str] = "reflow"

    def split_batch(self, batch: Batch) -> tuple[Array, dict[str, Array] | None, Array | None]:
        if self.noise_key not in batch:
            raise ValueError(f"reflow needs the coupled noise batch[{self.noise_key!r}]; keys: {sorted(batch)}")
        return super().split_batch({k: v for k, v in batch.items() if k != self.noise_key})

    def coupled_noise(self, batch: Batch) -> Array | None:
        return batch[self.noise_key]


@dataclasses.dataclass(frozen=True)
class MaskedDiffusionLoss(Objective):
    """MicroDiT: the wrapped diffusion loss over the visible patches only (see :mod:`flaxdiff.models.masking`).

    ``key`` splits into (mask_key, loss_key); the model is called with ``train=True, mask_key=mask_key`` (in
    evaluation too, so the validation loss is the same objective) and the per-example error is the mean over the
    pixels of the K = N - round(mask_ratio N) kept patches. patch_size and mask_ratio must be the model's
    (``check_model``); ``for_model`` reads them from a masked DiT.
    """

    diffusion: DiffusionLoss
    patch_size: int
    mask_ratio: float

    name: ClassVar[str] = "masked_diffusion"

    def __post_init__(self) -> None:
        if not (isinstance(self.patch_size, int) and self.patch_size >= 1):
            raise ValueError(f"patch_size={self.patch_size!r} must be a positive integer")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio!r} is outside [0, 1); use e.g. 0.5 or 0.75")

    @classmethod
    def for_model(cls, model: Any, diffusion: DiffusionLoss) -> "MaskedDiffusionLoss":
        """The masked loss of a DiT module (its ``config.patch_size`` and ``config.mask_ratio``)."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "mask_ratio"):
            raise ValueError(f"{type(model).__name__} has no config.mask_ratio; the masked loss trains a DiT")
        return cls(diffusion, int(config.patch_size), float(config.mask_ratio))

    # the diffusion pieces, for samplers and checkpoint readers
    schedule = property(lambda self: self.diffusion.schedule)
    predictor = property(lambda self: self.diffusion.predictor)
    weighting = property(lambda self: self.diffusion.weighting)
    time_sampler = property(lambda self: self.diffusion.time_sampler)
    null_cond = property(lambda self: self.diffusion.null_cond)
    image_key = property(lambda self: self.diffusion.image_key)

    def check_model(self, model: Any) -> None:
        config = getattr(model, "config", None)
        got = (getattr(config, "patch_size", None), getattr(config, "mask_ratio", None))
        if got != (self.patch_size, self.mask_ratio):
            raise ValueError(f"masked loss has patch_size={self.patch_size}, mask_ratio={self.mask_ratio} but the "
                             f"model has patch_size={got[0]}, mask_ratio={got[1]}; build it with "
                             f"MaskedDiffusionLoss.for_model(model, diffusion)")

    def __call__(self, apply_fn: ModelApply, params: Any, batch: Batch, key: Array, *,
                 train: bool = True) -> tuple[Array, dict[str, Array]]:
        from flaxdiff.models import masking

        diffusion = self.diffusion
        x0, cond, loss_mask = diffusion.split_batch(batch)

        def denoiser(p: Any, x: Array, c_noise: Array, c: Any, mask_key: Array) -> Array:
            return apply_fn(p, x, c_noise, c, train=True, mask_key=mask_key)

        return masking.visible_patch_loss(
            denoiser, params, x0, cond, key, diffusion.schedule, diffusion.predictor, diffusion.weighting,
            diffusion.time_sampler, patch_size=self.patch_size, mask_ratio=self.mask_ratio,
            cond_drop_prob=diffusion.cond_drop_prob if train else 0.0, null_cond=diffusion.null_cond,
            loss_mask=loss_mask, noise=diffusion.coupled_noise(batch))

    def init_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.diffusion.init_inputs(batch)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "MaskedDiffusionLoss":
        inner = dict(config["diffusion"])
        diffusion = _DIFFUSION_KINDS[inner.get("name", "diffusion")].from_config(inner)
        return cls(diffusion, int(config["patch_size"]), float(config["mask_ratio"]))


_DIFFUSION_KINDS: dict[str, type[DiffusionLoss]] = {"diffusion": DiffusionLoss, "reflow": ReflowLoss}


# --------------------------------------------------------------------------------------------------------------------
# Autoencoder and classifier


@dataclasses.dataclass(frozen=True)
class AutoencoderLoss(Objective):
    """KL autoencoder: batch mean of ||x - Dec(z)||^2 / D + kl_weight KL(N(mean, exp(logvar)) || N(0, I)) / D,
    z = mean + exp(logvar / 2) n drawn from ``key`` (rng stream 'sample'), D = H W C. Metrics "mse", "kl"."""

    kl_weight: float = 1e-3
    image_key: str = "image"

    name: ClassVar[str] = "autoencoder"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight={self.kl_weight!r} must be a finite number >= 0")

    def __call__(self, apply_fn: ModelApply, params: Any, batch: Batch, key: Array, *,
                 train: bool = True) -> tuple[Array, dict[str, Array]]:
        from flaxdiff.models import kl_divergence

        images = batch[self.image_key]
        recon, mean, logvar = apply_fn(params, images, sample_posterior=True, rngs={"sample": key})
        dims = math.prod(images.shape[1:])
        mse = jnp.mean(jnp.square(recon - images).reshape(images.shape[0], -1), axis=-1)
        kl = kl_divergence(mean, logvar) / dims
        loss = jnp.mean(mse + self.kl_weight * kl)
        return loss, {"loss": loss, "mse": jnp.mean(mse), "kl": jnp.mean(kl)}

    def init_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch[self.image_key],), {"sample_posterior": False}


def translate(images: Array, key: Array, max_shift: int) -> Array:
    """Shift each image by a random integer offset in [-max_shift, max_shift]^2, padding with -1."""
    n, h, w, c = images.shape
    pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
    padded = jnp.pad(images, pad, constant_values=-1.0)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


@dataclasses.dataclass(frozen=True)
class ClassifierLoss(Objective):
    """Softmax cross-entropy -mean_i log softmax(logits_i)[y_i] of a model returning (logits, features), on images
    translated by up to ``max_shift`` pixels (from ``key``; none in evaluation). Metric "accuracy"."""

    max_shift: int = 2
    image_key: str = "image"
    label_key: str = "label"

    name: ClassVar[str] = "classifier"

    def __post_init__(self) -> None:
        if not (isinstance(self.max_shift, int) and self.max_shift >= 0):
            raise ValueError(f"max_shift={self.max_shift!r} must be an integer >= 0")

    def __call__(self, apply_fn: ModelApply, params: Any, batch: Batch, key: Array, *,
                 train: bool = True) -> tuple[Array, dict[str, Array]]:
        images, labels = batch[self.image_key], batch[self.label_key]
        if train and self.max_shift:
            images = translate(images, key, self.max_shift)
        logits, _ = apply_fn(params, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "accuracy": accuracy}

    def init_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch[self.image_key],), {}


objectives: Registry[Objective] = Registry("loss")
for _cls in (DiffusionLoss, ReflowLoss, MaskedDiffusionLoss, AutoencoderLoss, ClassifierLoss):
    objectives.register(_cls.name, _cls)


PIECES = ("schedule", "predictor", "weighting", "time_sampler")


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A loss config -> (its diffusion pieces {"schedule", ...}, the rest): how checkpoints store a loss, the pieces
    at the top level (one place each) and the rest under "loss". :func:`join_config` inverts it."""
    rest = dict(config)
    holder = rest
    if isinstance(rest.get("diffusion"), Mapping):
        holder = rest["diffusion"] = dict(rest["diffusion"])
    pieces = {name: holder.pop(name) for name in PIECES if name in holder}
    return pieces, rest


def join_config(pieces: Mapping[str, Any], rest: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_config` (e.g. from a checkpoint config: ``join_config(config, config["loss"])``)."""
    config = dict(rest)
    holder = config
    if isinstance(config.get("diffusion"), Mapping):
        holder = config["diffusion"] = dict(config["diffusion"])
    if holder.get("name") in _DIFFUSION_KINDS:
        holder.update({name: pieces[name] for name in PIECES})
    return config


def from_config(config: Mapping[str, Any]) -> Objective:
    """Rebuild a loss from its ``to_config()`` (nested schedule/predictor/weighting/time-sampler configs)."""
    name = config.get("name")
    if name in _DIFFUSION_KINDS:
        return _DIFFUSION_KINDS[name].from_config(config)
    if name == MaskedDiffusionLoss.name:
        return MaskedDiffusionLoss.from_config(config)
    return objectives.from_config(dict(config))
