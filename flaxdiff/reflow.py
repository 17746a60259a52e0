"""Reflow (Liu, Gong & Liu 2022): straighten a trained rectified flow by retraining it on its own coupling.

1. Pairs. Row i draws ``eps_i ~ N(0, I)`` from ``fold_in(key, i)`` alone and integrates the base model's
   probability-flow ODE with a chosen sampler: ``x0_i = ODE(eps_i)``. The same key gives the same pairs whatever
   the batch split (stochastic samplers also get their per-row key from ``fold_in(fold_in(key, 1), i)``).
2. Training. The usual loss, but with the coupled noise instead of fresh noise (``objectives.ReflowLoss`` given to
   the one :class:`flaxdiff.training.Trainer`):

       t ~ time sampler,   x_t = alpha(t) x0 + sigma(t) eps  (= (1 - t) x0 + t eps),
       L = w(t) || F(x_t, t, c) - target(x0, eps, t) ||^2   (velocity target eps - x0 for rectified flow),

   starting from the base model's (EMA) params, without condition dropout (the student learns the guided map
   of its teacher, so it is sampled without guidance).
3. Evaluation. Class accuracy and Fréchet distance (flaxdiff.metrics, digit-classifier features) at 1, 2, 5 and
   10 Euler steps on the grid uniform in flow time, t_i = 1 - i / N (s_0 capped at ``SIGMA_RATIO_CAP``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import losses, samplers, timesteps
from flaxdiff.objectives import ReflowLoss
from flaxdiff.training.trainer import Trainer

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = ["PairSource", "evaluate_steps", "flow_time_grid", "generate_pairs", "reflow_loss",
           "run_reflow"]


def flow_time_grid(steps: int) -> np.ndarray:
    """Sigma ratios s_i = t_i / (1 - t_i) for t_i = 1 - i / steps (s_0 = SIGMA_RATIO_CAP, s_steps = 0): the
    registered ``flow_time`` grid."""
    return timesteps.get("flow_time", steps, sigma_max=timesteps.SIGMA_RATIO_CAP)


def generate_pairs(pipe: Any, num_pairs: int, key: Array, sampler: str = "euler", steps: int = 20,
                   guidance_scale: float | None = None, labels: Sequence[int] | np.ndarray | None = None,
                   batch_size: int = 256, grid: Any = None) -> dict[str, np.ndarray]:
    """``{"noise", "image", "label"}`` of ``num_pairs`` coupled (eps, x0) rows from a :class:`Pipeline` (x0 in the
    model's own space: latents for latent models). Labels default to ``i mod num_classes`` (class models)."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs} must be >= 1")
    if pipe.num_classes > 0:
        labels = (np.arange(num_pairs) % pipe.num_classes if labels is None else np.asarray(labels)).astype(np.int32)
        if labels.shape != (num_pairs,):
            raise ValueError(f"labels have shape {labels.shape}; expected ({num_pairs},)")
    elif labels is not None:
        raise ValueError("labels given but the base model is unconditional")
    if guidance_scale is not None and pipe.null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a conditional base model")
    rows = jnp.arange(num_pairs)
    noise_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(rows)
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(rows)
    draw = jax.jit(jax.vmap(lambda k: jax.random.normal(k, pipe.sample_shape)))
    stochastic = samplers.get(sampler).stochastic
    options: dict[str, Any] = {"grid": grid} if grid is not None else {}
    if guidance_scale is not None:
        options.update(guidance_scale=float(guidance_scale), null_cond=pipe.null_cond)
    noises, images = [], []
    chunk = max(1, min(batch_size, num_pairs))
    for start in range(0, num_pairs, chunk):
        stop = min(start + chunk, num_pairs)
        index = np.arange(start, start + chunk) % num_pairs    # pad the last chunk to keep one compiled shape
        noise = draw(noise_keys[index])
        cond = {"label": jnp.asarray(labels[index])} if pipe.num_classes > 0 else None
        x0, _ = samplers.sample_model(pipe._apply, pipe.params, pipe.schedule, pipe.predictor, noise, cond,
                                      sampler=sampler, steps=steps,
                                      sample_keys=sample_keys[index] if stochastic else None, **options)
        noises.append(np.asarray(noise)[: stop - start])
        images.append(np.asarray(x0)[: stop - start])
    out = {"noise": np.concatenate(noises), "image": np.concatenate(images)}
    out["label"] = labels if labels is not None else np.zeros(num_pairs, np.int32)
    return out


class PairSource:
    """Random-access (noise, image, label) rows of a pairs ``.npz`` for grain (``make_loader(operations=[])``)."""

    in_memory = True   # the whole file is loaded: read without grain's reader threads

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with np.load(path, allow_pickle=False) as pairs:
            missing = {"noise", "image", "label"} - set(pairs.keys())
            if missing:
                raise ValueError(f"{path} is not a reflow pairs file: missing {sorted(missing)}")
            self.noise = pairs["noise"].astype(np.float32)
            self.image = pairs["image"].astype(np.float32)
            self.label = pairs["label"].astype(np.int32)
        if self.noise.shape != self.image.shape:
            raise ValueError(f"{path}: noise {self.noise.shape} and image {self.image.shape} differ in shape")

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.image[index], "noise": self.noise[index], "label": self.label[index]}

    def __repr__(self) -> str:
        return f"PairSource(path={self.path!r}, n={len(self)})"


def reflow_loss(apply_fn: losses.ApplyFn, params: Any, x0: Array, eps: Array, cond: Mapping[str, Array] | None,
                key: Array, schedule: Any, predictor: Any, weighting: Any, time_sampler: Any,
                loss_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The loss of the module docstring (step 2): the diffusion loss with ``eps`` given, not drawn (the trainer
    reaches it as :class:`flaxdiff.objectives.ReflowLoss`, which takes eps from ``batch["noise"]``)."""
    return losses.diffusion_loss(apply_fn, params, x0, cond, key, schedule, predictor, weighting, time_sampler,
                                 loss_mask=loss_mask, noise=eps)


def evaluate_steps(pipe: Any, steps: Sequence[int] = (1, 2, 5, 10), per_class: int = 50,
                   guidance_scale: float | None = None, seed: int = 0, sampler: str = "euler",
                   classifier: Any = None) -> list[dict[str, float]]:
    """Class accuracy and Fréchet distance of a 10-class MNIST pipeline at each number of ``steps`` on
    :func:`flow_time_grid`; one dict per entry with "steps", "class_accuracy", "frechet_distance", "seconds"."""
    from flaxdiff import metrics

    if pipe.num_classes != 10:
        raise ValueError(f"evaluate_steps scores MNIST digits (10 classes); the model has {pipe.num_classes}")
    classifier = classifier or metrics.get_mnist_classifier(image_size=32)
    labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
    results = []
    for count in steps:
        start = time.perf_counter()
        images = pipe.generate(labels=labels, sampler=sampler, steps=int(count), guidance_scale=guidance_scale,
                               seed=seed, output="float", grid=flow_time_grid(int(count)))
        scores = metrics.evaluate_class_conditional(images, labels, classifier)
        results.append({"steps": int(count), "class_accuracy": scores["class_accuracy"],
                        "frechet_distance": scores["frechet_distance"],
                        "seconds": time.perf_counter() - start})
        logger.info("%d steps: accuracy %.3f, Fréchet distance %.2f", count, scores["class_accuracy"],
                    scores["frechet_distance"])
    return results


def run_reflow(base_dir: str | Path, workdir: str | Path, *, num_pairs: int = 2048, pair_sampler: str = "euler",
               pair_steps: int = 20, guidance_scale: float | None = None, train_config: Any = None,
               batch_size: int = 64, seed: int = 0, ema: bool = True,
               run_config: Mapping[str, Any] | None = None) -> Trainer:
    """Generate pairs from the checkpoint at ``base_dir`` (saved to ``workdir/reflow_pairs.npz``), then train a
    reflow model initialised from its params with ``train_config`` (a TrainConfig) into ``workdir``; returns the
    finished trainer (its checkpoints load with :class:`flaxdiff.pipeline.Pipeline`). ``run_config``: what the
    checkpoints store (training.py passes the reflow run's RunConfig); None stores the trainer's description."""
    from flaxdiff import checkpoints, data, models
    from flaxdiff.pipeline import Pipeline
    from flaxdiff.training import TrainConfig

    pipe = Pipeline.from_pretrained(base_dir, ema=ema)
    if pipe.text is not None:
        raise ValueError(f"{base_dir} is text-conditioned; reflow supports class-conditional and unconditional "
                         f"models")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    pairs_path = workdir / "reflow_pairs.npz"
    start = time.perf_counter()
    pairs = generate_pairs(pipe, num_pairs, jax.random.PRNGKey(seed), sampler=pair_sampler, steps=pair_steps,
                           guidance_scale=guidance_scale)
    np.savez(pairs_path, **pairs)
    logger.info("generated %d reflow pairs with %s x %d steps in %.1f s -> %s", num_pairs, pair_sampler,
                pair_steps, time.perf_counter() - start, pairs_path)
    config = pipe.config
    train_config = train_config or TrainConfig()
    null_cond = dict(pipe.null_cond) if pipe.null_cond else None
    train_config = train_config.replace(cond_drop_prob=0.0, null_cond=null_cond)
    loader = data.make_loader(PairSource(pairs_path), batch_size, None, seed=seed, operations=[])
    first = next(loader)
    example = {"image": first["image"], "noise": first["noise"]}
    if pipe.num_classes > 0:
        example["label"] = first["label"]
    if checkpoints.is_run_config(pipe.config.to_dict() if hasattr(pipe.config, "to_dict") else pipe.config):
        diffusion = pipe.config.diffusion
        weighting = losses.weightings.get(diffusion.weighting, **diffusion.weighting_options)
        time_sampler = losses.time_samplers.get(diffusion.time_sampler, **diffusion.time_sampler_options)
        model_config = models.get_config(pipe.config.model.name, **pipe.config.model.options).to_config()
        data_config = None
    else:
        weighting = losses.weightings.from_config(config["weighting"])
        time_sampler = losses.time_samplers.from_config(config["time_sampler"])
        model_config = config["model"]
        data_config = {k: v for k, v in config.get("data", {}).items() if k not in ("image_key", "shapes")}
        data_config.update(reflow_pairs=num_pairs, reflow_sampler=pair_sampler, reflow_steps=pair_steps,
                           reflow_guidance=guidance_scale)
    loss = ReflowLoss(pipe.schedule, pipe.predictor, weighting, time_sampler, null_cond=null_cond)
    trainer = Trainer(pipe.model, model_config, train_config=train_config, example_batch=example, loss=loss,
                      workdir=workdir, data_config=data_config, run_config=run_config)
    state = trainer.init()
    params = jax.device_put(pipe.params, trainer.state_shardings.params)
    trainer.state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))

    def batches() -> Any:
        yield first
        yield from loader

    trainer.fit(batches(), resume=False)
    trainer.close()
    logger.info("reflow of %s done in %.1f s", base_dir, time.perf_counter() - start)
    return trainer


def pipe_dir(path: str | Path) -> Path:
    """The checkpoint directory (numbered steps) of a run directory."""
    from flaxdiff.pipeline import resolve_checkpoint_dir

    return resolve_checkpoint_dir(path)
