"""Trainer: a Linen model + a loss object + optax, one sharded jitted step, resume, multi-host and logging.

The trainer is given the loss (``flaxdiff.objectives``: diffusion, reflow, masked MicroDiT, autoencoder,
classifier), ``loss(apply_fn, params, batch, key, *, train) -> (loss, metrics)``; it knows nothing of what the
model computes. It has no subclasses; ``DiffusionTrainer`` is another name for it, and its legacy positional form
``DiffusionTrainer(model, model_config, schedule, predictor, weighting, time_sampler, train_config, example)``
builds the diffusion loss from the four pieces and ``train_config.cond_drop_prob`` / ``null_cond``.

One update n (``grad_accum_steps = A`` micro-batches of the global batch B):

    key_n = fold_in(rng, n);  micro-batch i = global rows {j A + i : j < B / A},  key_{n,i} = fold_in(key_n, i)
    (dropout_key, loss_key) = split(key_{n,i});  L_i = loss(apply_fn[dropout_key], params, micro-batch i, loss_key)
    g = (1 / A) sum_i grad L_i                                          (lax.scan over i, no optax.MultiSteps)
    ok = isfinite(L) and isfinite(||g||)
    params, opt_state <- optimizer(clip(g)) if ok else unchanged;  ema <- EMA(params) if ok else unchanged
    bad_steps += not ok;  consecutive_bad = 0 if ok else consecutive_bad + 1;  n <- n + 1

The step is jitted once with NamedShardings over the ("data", "fsdp") mesh and donates the old state. The host
reads the counters only at log intervals and stops after ``max_consecutive_bad_steps`` bad steps in a row.
SIGTERM / SIGINT finish the current step, save and return.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxdiff import losses, objectives
from flaxdiff.predictors import Predictor
from flaxdiff.schedules import NoiseSchedule
from flaxdiff.training import parallel
from flaxdiff.training.checkpoint import CheckpointManager, check_config
from flaxdiff.training.config import TrainConfig, make_lr_schedule, make_optimizer
from flaxdiff.training.logging import MetricsLogger
from flaxdiff.training.state import TrainState, all_finite, ema_decay_at, ema_update

logger = logging.getLogger(__name__)

Array = jax.Array
Batch = Mapping[str, Any]
# sample_fn(ema_params, key) -> images (N, H, W, C) in [-1, 1]
SampleFn = Callable[[Any, Array], Array]

__all__ = ["Trainer", "DiffusionTrainer", "TrainingDiverged", "make_sample_fn"]


class TrainingDiverged(RuntimeError):
    """Raised after ``max_consecutive_bad_steps`` consecutive non-finite steps."""


class Trainer:
    """Trains a Linen model with a given loss object on a ("data", "fsdp") mesh.

    model: the Linen module; the loss calls it through ``apply_fn`` (see :mod:`flaxdiff.objectives`).
    model_config: its JSON config (saved with checkpoints; ``flaxdiff.models.from_config`` must rebuild the module);
        None takes ``model.config.to_config()`` when the module has one.
    schedule, predictor, weighting, time_sampler: the legacy diffusion form, used only without ``loss``: the loss
        is then ``objectives.DiffusionLoss`` of these with ``train_config.cond_drop_prob`` / ``null_cond``.
    train_config: optimizer, LR schedule, EMA, accumulation, intervals, seed (required).
    example_batch: one batch (or arrays/ShapeDtypeStructs of the right trailing shapes) used to initialise params.
    loss: the objective, ``loss(apply_fn, params, batch, key, *, train) -> (loss, metrics)`` plus ``init_inputs``
        (how to initialise the model), ``check_model`` and ``to_config``.
    image_key: the batch entry holding the images (legacy diffusion form; sample grids take their shape from it).
    mesh: defaults to ``make_mesh(fsdp=train_config.fsdp)`` over all devices of all processes.
    workdir: metrics, TensorBoard, sample grids and ``<workdir>/checkpoints``; None keeps everything in memory.
    sample_fn: optional ``sample_fn(ema_params, key) -> images`` for PNG grids every ``sample_every`` steps.
    data_config: extra JSON saved under config["data"] (e.g. dataset name, image size); not used with run_config.
    run_config: when given, exactly the config checkpoints store (e.g. ``RunConfig.to_dict()``) and the one a
        resume is checked against; otherwise the trainer builds it from the model config, the loss (its diffusion
        pieces at the top level, the rest under ``"loss"``: ``objectives.split_config``), ``train_config`` and the
        data shapes.
    """

    def __init__(
        self,
        model: nn.Module,
        model_config: Mapping[str, Any] | None = None,
        schedule: NoiseSchedule | None = None,
        predictor: Predictor | None = None,
        weighting: losses.Weighting | None = None,
        time_sampler: losses.TimeSampler | None = None,
        train_config: TrainConfig | None = None,
        example_batch: Batch | None = None,
        *,
        loss: objectives.Objective | None = None,
        image_key: str = "image",
        mesh: jax.sharding.Mesh | None = None,
        workdir: str | Path | None = None,
        sample_fn: SampleFn | None = None,
        data_config: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        if train_config is None or example_batch is None:
            raise ValueError("Trainer needs train_config=TrainConfig(...) and example_batch={...}")
        pieces = (schedule, predictor, weighting, time_sampler)
        if loss is None:
            if any(piece is None for piece in pieces):
                raise ValueError("Trainer needs loss=... (a flaxdiff.objectives member) or all four of schedule, "
                                 "predictor, weighting, time_sampler")
            loss = objectives.DiffusionLoss(schedule, predictor, weighting, time_sampler,
                                            cond_drop_prob=train_config.cond_drop_prob,
                                            null_cond=train_config.null_cond, image_key=image_key)
        elif any(piece is not None for piece in pieces):
            raise ValueError("give either loss=... or schedule/predictor/weighting/time_sampler, not both")
        loss.check_model(model)
        if model_config is None and hasattr(getattr(model, "config", None), "to_config"):
            model_config = model.config.to_config()
        self.model = model
        self.loss = loss
        self.config = train_config
        self.image_key = getattr(loss, "image_key", image_key)
        self.mesh = mesh if mesh is not None else parallel.make_mesh(fsdp=train_config.fsdp)
        self.workdir = Path(workdir) if workdir is not None else None
        self.sample_fn = sample_fn
        self.is_main = jax.process_index() == 0
        if self.image_key not in example_batch:
            raise ValueError(f"example_batch has no {self.image_key!r} entry; keys: {sorted(example_batch)}")
        self._example = {k: jax.ShapeDtypeStruct((1,) + tuple(np.shape(v))[1:], jnp.result_type(v))
                         for k, v in example_batch.items()}
        if run_config is not None:
            self.full_config = json.loads(json.dumps(dict(run_config)))
        else:
            self.full_config = self._build_config(model_config, data_config)
        self.tx = make_optimizer(train_config)
        self.lr_schedule = make_lr_schedule(train_config)
        self.compute_dtype = jnp.bfloat16 if train_config.compute_dtype == "bfloat16" else jnp.float32
        self.state_shardings = self._state_shardings()
        self._batch_sharding = parallel.batch_sharding(self.mesh)
        replicated = parallel.replicated(self.mesh)
        self._init_fn = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._step_fn = jax.jit(self._train_step, in_shardings=(self.state_shardings, self._batch_sharding),
                                out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        self._eval_fn = jax.jit(self._eval_step, in_shardings=(self.state_shardings, self._batch_sharding, None),
                                out_shardings=replicated)
        self._finite_fn = jax.jit(lambda s: all_finite((s.params, s.ema_params)), out_shardings=replicated)
        self.checkpoints = (CheckpointManager(self.workdir / "checkpoints", max_to_keep=train_config.keep_checkpoints,
                                              keep_best=train_config.keep_best,
                                              async_save=train_config.async_checkpoints)
                            if self.workdir is not None else None)
        self.state: TrainState | None = None
        self.history: list[dict[str, float]] = []
        self._stop_requested = False

    def _build_config(self, model_config: Mapping[str, Any] | None,
                      data_config: Mapping[str, Any] | None) -> dict[str, Any]:
        train_config = self.config
        # the diffusion pieces go to the top level (where checkpoint readers find them), the rest under "loss"
        pieces, loss_config = objectives.split_config(self.loss.to_config())
        return json.loads(json.dumps({
            "model": dict(model_config) if model_config is not None else None,
            **pieces,
            "loss": loss_config,
            "train": train_config.to_config(),
            # total_steps may change on resume, but not when the LR decay is defined by it
            "lr_decay_steps": 0 if train_config.lr_decay == "constant" else
            (train_config.decay_steps or train_config.total_steps),
            "data": {
                "image_key": self.image_key,
                "shapes": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in self._example.items()},
                **dict(data_config or {}),
            },
        }))

    # the diffusion pieces of a diffusion loss (None for other losses), for samplers and previews
    schedule = property(lambda self: getattr(self.loss, "schedule", None))
    predictor = property(lambda self: getattr(self.loss, "predictor", None))
    weighting = property(lambda self: getattr(self.loss, "weighting", None))
    time_sampler = property(lambda self: getattr(self.loss, "time_sampler", None))

    # ----------------------------------------------------------------------------------------------------------------
    # Pure functions (jitted in __init__)

    def model_apply(self, dropout_key: Array | None = None) -> objectives.ModelApply:
        """apply(params, *inputs, rngs=None, **kwargs) = model.apply({"params": params}, *inputs, **kwargs) with
        params and the first input in ``compute_dtype``, floating outputs as float32, and the rng streams
        {"dropout": dropout_key} (when given) merged with ``rngs``."""
        dtype = self.compute_dtype

        def apply(params: Any, *inputs: Any, rngs: Mapping[str, Array] | None = None, **kwargs: Any) -> Any:
            if dtype != jnp.float32:
                params = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                      params)
                if inputs:
                    inputs = (inputs[0].astype(dtype),) + tuple(inputs[1:])
            streams = {"dropout": dropout_key} if dropout_key is not None else {}
            streams.update(rngs or {})
            out = self.model.apply({"params": params}, *inputs, rngs=streams, **kwargs)
            return jax.tree.map(lambda o: o.astype(jnp.float32) if jnp.issubdtype(o.dtype, jnp.floating) else o, out)

        return apply

    def apply_fn(self, train: bool, dropout_key: Array | None = None) -> losses.ApplyFn:
        """The denoiser call apply(params, x, c_noise, cond) -> F (float32) of a diffusion model, ``train`` fixed."""
        apply = self.model_apply(dropout_key)

        def denoiser(params: Any, x: Array, c_noise: Array, cond: Any) -> Array:
            return apply(params, x, c_noise, cond, train=train)

        return denoiser

    def _init_state(self) -> TrainState:
        base = jax.random.PRNGKey(self.config.seed)
        init_key, rng = jax.random.split(base)
        args, kwargs = self.loss.init_inputs({k: jnp.zeros(v.shape, v.dtype) for k, v in self._example.items()})
        params_key, dropout_key = jax.random.split(init_key)
        variables = self.model.init({"params": params_key, "dropout": dropout_key}, *args, **kwargs)
        params = variables["params"]
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=self.tx.init(params),
                          ema_params=jax.tree.map(jnp.copy, params), rng=rng, bad_steps=zero, consecutive_bad=zero)

    def _state_shardings(self) -> TrainState:
        abstract = jax.eval_shape(self._init_state)
        fsdp = self.mesh.shape["fsdp"] > 1
        shardings = parallel.tree_shardings(abstract, self.mesh, fsdp)
        replicated = parallel.replicated(self.mesh)
        return shardings.replace(step=replicated, rng=replicated, bad_steps=replicated, consecutive_bad=replicated)

    def _micro_loss(self, params: Any, batch: Batch, key: Array, train: bool) -> tuple[Array, dict[str, Array]]:
        dropout_key, loss_key = jax.random.split(key)
        return self.loss(self.model_apply(dropout_key if train else None), params, batch, loss_key, train=train)

    def loss_and_grads(self, params: Any, batch: Batch, key: Array) -> tuple[Array, Any]:
        """Mean loss and gradient over ``grad_accum_steps`` micro-batches (rows j A + i form micro-batch i)."""
        loss, _, grads = self._loss_metrics_grads(params, batch, key)
        return loss, grads

    def _loss_metrics_grads(self, params: Any, batch: Batch, key: Array) -> tuple[Array, dict[str, Array], Any]:
        """(mean loss, mean of the loss's other scalar metrics, mean gradient) over the micro-batches."""
        accum = self.config.grad_accum_steps

        def one(micro: Batch, index: Array) -> tuple[Array, dict[str, Array], Any]:
            def scalar_loss(p: Any) -> tuple[Array, dict[str, Array]]:
                loss, metrics = self._micro_loss(p, micro, jax.random.fold_in(key, index), True)
                return loss, {k: v.astype(jnp.float32) for k, v in metrics.items() if k != "loss" and v.ndim == 0}

            (loss, metrics), grads = jax.value_and_grad(scalar_loss, has_aux=True)(params)
            return loss, metrics, grads

        if accum == 1:
            return one(batch, jnp.int32(0))
        spec = NamedSharding(self.mesh, P(None, parallel.DATA_AXES))

        def to_micro(value: Array) -> Array:
            value = value.reshape((value.shape[0] // accum, accum) + value.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(value, spec)

        micro_batches = jax.tree.map(to_micro, dict(batch))

        def body(carry: tuple[Array, Any, Any], inputs: tuple[Batch, Array]) -> tuple[tuple[Array, Any, Any], None]:
            loss_sum, metric_sum, grad_sum = carry
            loss, metrics, grads = one(*inputs)
            return (loss_sum + loss, jax.tree.map(jnp.add, metric_sum, metrics),
                    jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first_micro = jax.tree.map(lambda v: v[0], micro_batches)
        metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                    jax.eval_shape(lambda: one(first_micro, jnp.int32(0))[1]))
        (loss_sum, metric_sum, grad_sum), _ = jax.lax.scan(
            body, (jnp.float32(0.0), metric_zeros, zeros), (micro_batches, jnp.arange(accum, dtype=jnp.int32)))
        return (loss_sum / accum, jax.tree.map(lambda m: m / accum, metric_sum),
                jax.tree.map(lambda g: g / accum, grad_sum))

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        key = jax.random.fold_in(state.rng, state.step)
        loss, loss_metrics, grads = self._loss_metrics_grads(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        decay = ema_decay_at(state.step, self.config.ema_decay, self.config.ema_warmup)

        def update(operands: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
            params, opt_state, ema = operands
            updates, opt_state = self.tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, ema_update(ema, params, decay)

        # A skipped (non-finite) step keeps the old trees. lax.cond instead of a per-leaf where(finite, new, old):
        # the update runs as one fused pass per leaf with no select over params, moments and EMA (bitwise the
        # same result; the update alone went from 204 to 138 ms on the 9.6M U-Net, docs/benchmarks.md section 3c).
        params, opt_state, ema = jax.lax.cond(finite, update, lambda operands: operands,
                                              (state.params, state.opt_state, state.ema_params))
        bad = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, rng=state.rng,
            bad_steps=state.bad_steps + bad, consecutive_bad=jnp.where(finite, 0, state.consecutive_bad + 1),
        )
        metrics = {
            **loss_metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
            "lr": self.lr_schedule(state.step - state.bad_steps), "ema_decay": decay,
            "bad_steps": new_state.bad_steps, "consecutive_bad": new_state.consecutive_bad,
        }
        return new_state, metrics

    def _eval_step(self, state: TrainState, batch: Batch, key: Array) -> dict[str, Array]:
        return {"val_loss": self._micro_loss(state.ema_params, batch, key, False)[0],
                "val_loss_raw": self._micro_loss(state.params, batch, key, False)[0]}

    # ----------------------------------------------------------------------------------------------------------------
    # Host side

    def init(self) -> TrainState:
        """A fresh state from ``train_config.seed``, placed on the mesh."""
        self.state = self._init_fn()
        return self.state

    def global_batch(self, local_batch: Batch) -> dict[str, Array]:
        """This process's rows -> global arrays on the mesh (checks divisibility by devices x grad_accum_steps)."""
        return parallel.make_global_batch(local_batch, self.mesh, self.config.grad_accum_steps)

    def train_step(self, local_batch: Batch) -> dict[str, Array]:
        """One update on this process's rows; returns the (device) metrics without waiting for them."""
        if self.state is None:
            self.init()
        self.state, metrics = self._step_fn(self.state, self.global_batch(local_batch))
        return metrics

    def evaluate(self, batches: Iterator[Batch], num_batches: int) -> dict[str, float]:
        """Mean validation loss (EMA params: val_loss; raw params: val_loss_raw) over ``num_batches`` with fixed
        keys fold_in(PRNGKey(seed + 1), i), so evaluations at different steps are comparable."""
        totals: dict[str, float] = {}
        count = 0
        base = jax.random.PRNGKey(self.config.seed + 1)
        for index in range(num_batches):
            try:
                local = next(batches)
            except StopIteration:
                break
            out = jax.device_get(self._eval_fn(self.state, self.global_batch(local), jax.random.fold_in(base, index)))
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
        return {key: value / max(count, 1) for key, value in totals.items()}

    def restore(self, data_iterator: Any = None, step: int | None = None) -> bool:
        """Restore the latest (or given) checkpoint of ``workdir`` if there is one; returns whether it did.

        The saved config must match this run's (run-only settings aside), else ValueError naming the keys.
        """
        if self.checkpoints is None:
            return False
        step = self.checkpoints.latest_step() if step is None else step
        if step is None:
            return False
        check_config(self.checkpoints.config(step), self.full_config, self.checkpoints.directory / str(step))
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                jax.eval_shape(self._init_state), self.state_shardings)
        state, data_state = self.checkpoints.restore(step, abstract, with_data=hasattr(data_iterator, "set_state"))
        self.state = state
        if data_state is not None and hasattr(data_iterator, "set_state"):
            data_iterator.set_state(data_state)
        logger.info("restored step %d from %s", step, self.checkpoints.directory)
        return True

    def save(self, data_iterator: Any = None, metrics: Mapping[str, float] | None = None) -> int:
        """Checkpoint the current state (asynchronously) with the data position and config; returns the step.

        Refuses (ValueError) to save non-finite params, which the skipped updates make impossible in practice.
        """
        if self.checkpoints is None:
            raise ValueError("save() needs a workdir; the trainer was built with workdir=None")
        step = int(jax.device_get(self.state.step))
        if not bool(jax.device_get(self._finite_fn(self.state))):
            raise ValueError(f"refusing to checkpoint step {step}: params or EMA params are not finite")
        data_state = data_iterator.get_state() if hasattr(data_iterator, "get_state") else None
        self.checkpoints.save(step, self.state, self.full_config, data_state, metrics)
        return step

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            logger.warning("received signal %d: finishing this step, saving and stopping", signum)
            self._stop_requested = True

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def _should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._stop_requested
        if step % self.config.log_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self._stop_requested))
        return bool(np.any(flags))

    def fit(self, data: Iterator[Batch], val_data: Callable[[], Iterator[Batch]] | None = None,
            resume: bool = True, total_steps: int | None = None) -> TrainState:
        """Train until ``total_steps`` (default ``train_config.total_steps``), the data ends, or a signal.

        data: iterator of this process's batches (dicts of arrays); with get_state()/set_state() its position is
        checkpointed and restored. val_data: a callable returning a fresh validation iterator.
        resume: continue from the latest checkpoint in ``workdir`` (one flag).
        """
        cfg = self.config
        total = cfg.total_steps if total_steps is None else total_steps
        if self.state is None and not (resume and self.restore(data)):
            self.init()
        step = int(jax.device_get(self.state.step))
        metrics_logger = MetricsLogger(self.workdir, total, step, enabled=self.is_main)
        previous_handlers = self._install_signal_handlers()
        last_saved = step if self.checkpoints is not None and self.checkpoints.latest_step() == step else None
        self._stop_requested = False
        stopped = False
        try:
            while step < total:
                if self._should_stop(step):
                    stopped = True
                    break
                try:
                    local = next(data)
                except StopIteration:
                    logger.info("data exhausted at step %d", step)
                    break
                if step == 0 or metrics_logger.global_batch == 1:
                    metrics_logger.global_batch = np.shape(jax.tree.leaves(local)[0])[0] * jax.process_count()
                metrics = self.train_step(local)
                step += 1
                if step % cfg.log_every == 0 or step == total:
                    self._log(step, metrics, metrics_logger)
                eval_metrics = None
                if val_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    eval_metrics = self.evaluate(val_data(), cfg.eval_batches)
                    metrics_logger.log(step, eval_metrics, prefix="eval")
                if self.sample_fn is not None and cfg.sample_every and step % cfg.sample_every == 0:
                    self._sample_grid(step, metrics_logger)
                if self.checkpoints is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save(data, eval_metrics)
                    last_saved = step
            if self._stop_requested or stopped:
                stopped = True
                logger.warning("stopping at step %d on signal", step)
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            metrics_logger.close()
        if self.checkpoints is not None:
            if last_saved != step:
                self.save(data)
            self.checkpoints.wait()
        return self.state

    def _log(self, step: int, metrics: Mapping[str, Array], metrics_logger: MetricsLogger) -> None:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.history.append({"step": step, **host})
        metrics_logger.log(step, host)
        logger.debug("step %d: %s", step, host)
        if host["consecutive_bad"] >= self.config.max_consecutive_bad_steps:
            raise TrainingDiverged(
                f"stopping at step {step}: {int(host['consecutive_bad'])} consecutive non-finite steps "
                f"(max_consecutive_bad_steps={self.config.max_consecutive_bad_steps}, {int(host['bad_steps'])} in "
                f"total); the last checkpoint holds finite params — lower the learning rate or check the data"
            )

    def _sample_grid(self, step: int, metrics_logger: MetricsLogger) -> None:
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 2), step)
        images = jax.device_get(self.sample_fn(self.state.ema_params, key))
        if self.is_main:
            metrics_logger.log_images(step, np.asarray(images))

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()


# Another name of the one trainer (not a subclass): the trainer of diffusion models in the legacy positional form.
DiffusionTrainer = Trainer


def make_sample_fn(trainer: Trainer, num_images: int = 16, sampler: str | None = None, steps: int = 20,
                   guidance_scale: float | None = None, cond: Mapping[str, Any] | None = None) -> SampleFn:
    """A jitted sample_fn(ema_params, key) -> images in [-1, 1] through ``flaxdiff.samplers.sample_model``
    (imported on first use; sampler None means its default) for a trainer with a diffusion loss. Guidance uses
    the loss's ``null_cond`` (the legacy form takes it from ``train_config.null_cond``)."""
    if trainer.schedule is None or trainer.predictor is None:
        raise ValueError(f"make_sample_fn needs a diffusion loss; the trainer's loss is {trainer.loss.name!r}")
    shape = (num_images,) + tuple(trainer._example[trainer.image_key].shape[1:])
    options: dict[str, Any] = {} if sampler is None else {"sampler": sampler}
    if guidance_scale is not None:
        null_cond = getattr(trainer.loss, "null_cond", None)
        options.update(guidance_scale=guidance_scale,
                       null_cond=null_cond if null_cond is not None else trainer.config.null_cond)

    def sample_fn(params: Any, key: Array) -> Array:
        from flaxdiff import samplers

        noise_key, sample_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, shape)
        samples, _ = samplers.sample_model(trainer.apply_fn(False), params, trainer.schedule, trainer.predictor,
                                           noise, cond, steps=steps, key=sample_key, **options)
        return jnp.clip(samples, -1.0, 1.0)

    return jax.jit(sample_fn)
