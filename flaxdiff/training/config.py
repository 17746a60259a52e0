"""Training settings: one frozen dataclass that round-trips through JSON, plus the optimizer and LR schedule it
describes.

    lr(n) = lr_peak * n / warmup_steps                                   for n < warmup_steps
    lr(n) = lr_end + (lr_peak - lr_end) * d((n - warmup) / (total - warmup))   afterwards,
    d(u) = (1 + cos(pi u)) / 2 ("cosine"),  1 - u ("linear"),  1 ("constant"),  lr_end = end_lr_fraction * lr_peak.

The optimizer is ``clip_by_global_norm(grad_clip)`` followed by Adam/AdamW/SGD with that schedule. Gradient
accumulation is not an optax wrapper: the train step itself scans over ``grad_accum_steps`` micro-batches and
averages their gradients before one optimizer update (see :mod:`flaxdiff.training.trainer`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import optax

__all__ = ["TrainConfig", "make_lr_schedule", "make_optimizer", "RUN_ONLY_KEYS"]

_DECAYS = ("cosine", "linear", "constant")
_OPTIMIZERS = ("adamw", "adam", "sgd")
_DTYPES = ("float32", "bfloat16")

# Settings that may change between a run and its resume (they do not change the trained function).
RUN_ONLY_KEYS = frozenset({
    "total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "keep_best", "eval_every", "eval_batches",
    "sample_every", "max_consecutive_bad_steps", "async_checkpoints", "fsdp",
})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer needs besides the model and the diffusion pieces.

    learning_rate: peak LR reached after ``warmup_steps``.
    warmup_steps: linear warm-up length from 0.
    lr_decay: "cosine" | "linear" | "constant" after warm-up, down to ``end_lr_fraction * learning_rate``.
    decay_steps: length of the decay (0 means ``total_steps``).
    optimizer: "adamw" | "adam" | "sgd" (momentum = b1).
    grad_clip: clip_by_global_norm threshold (0 disables).
    grad_accum_steps: micro-batches per update; the global batch must split evenly.
    ema_decay: EMA decay; 0 disables (EMA equals params). ema_warmup uses min(decay, (1 + n) / (10 + n)).
    compute_dtype: "float32" | "bfloat16"; params stay float32, forward/backward run in this dtype.
    cond_drop_prob / null_cond: classifier-free guidance condition dropout (see ``losses.drop_conditions``).
    fsdp: size of the mesh "fsdp" axis (1 = pure data parallelism, params replicated).
    max_consecutive_bad_steps: stop after this many consecutive non-finite steps (checked at log intervals).
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    lr_decay: str = "constant"
    decay_steps: int = 0
    end_lr_fraction: float = 0.0
    optimizer: str = "adamw"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    compute_dtype: str = "float32"
    cond_drop_prob: float = 0.0
    null_cond: Mapping[str, Any] | None = None
    fsdp: int = 1
    seed: int = 0
    total_steps: int = 1000
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    keep_best: bool = False
    async_checkpoints: bool = True
    eval_every: int = 0
    eval_batches: int = 4
    sample_every: int = 0
    max_consecutive_bad_steps: int = 20

    name: ClassVar[str] = "train"

    def __post_init__(self) -> None:
        checks = [
            (self.lr_decay in _DECAYS, f"lr_decay={self.lr_decay!r}; accepted: {', '.join(_DECAYS)}"),
            (self.optimizer in _OPTIMIZERS, f"optimizer={self.optimizer!r}; accepted: {', '.join(_OPTIMIZERS)}"),
            (self.compute_dtype in _DTYPES, f"compute_dtype={self.compute_dtype!r}; accepted: {', '.join(_DTYPES)}"),
            (self.learning_rate >= 0, f"learning_rate={self.learning_rate!r} must be >= 0"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps!r} must be >= 0"),
            (self.grad_accum_steps >= 1, f"grad_accum_steps={self.grad_accum_steps!r} must be >= 1"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay!r} is outside [0, 1)"),
            (self.grad_clip >= 0, f"grad_clip={self.grad_clip!r} must be >= 0 (0 disables)"),
            (0.0 <= self.cond_drop_prob <= 1.0, f"cond_drop_prob={self.cond_drop_prob!r} is outside [0, 1]"),
            (self.fsdp >= 1, f"fsdp={self.fsdp!r} must be >= 1"),
            (self.total_steps >= 1, f"total_steps={self.total_steps!r} must be >= 1"),
            (self.log_every >= 1, f"log_every={self.log_every!r} must be >= 1"),
            (self.max_consecutive_bad_steps >= 1,
             f"max_consecutive_bad_steps={self.max_consecutive_bad_steps!r} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.null_cond is not None:
            object.__setattr__(self, "null_cond", dict(self.null_cond))

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``TrainConfig.from_config`` inverts it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names - {"name"})
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; accepted: {sorted(names)}")
        return cls(**{k: v for k, v in config.items() if k != "name"})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def make_lr_schedule(config: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule of the module docstring."""
    peak = config.learning_rate
    end = config.end_lr_fraction * peak
    decay_steps = max(1, (config.decay_steps or config.total_steps) - config.warmup_steps)
    if config.lr_decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
    elif config.lr_decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (if grad_clip > 0) then the chosen optimizer at ``make_lr_schedule(config)``."""
    lr = make_lr_schedule(config)
    if config.optimizer == "adamw":
        opt = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        opt = optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps)
    else:
        opt = optax.sgd(lr, momentum=config.b1 or None)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return opt
