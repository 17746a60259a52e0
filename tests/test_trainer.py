"""DiffusionTrainer on one device: EMA, accumulation and clipping against hand computations, NaN skipping,
divergence stop, checkpoint round trip and rebuild from a directory, and the one-line errors."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxdiff import losses, predictors, schedules
from flaxdiff.training import (DiffusionTrainer, TrainConfig, TrainingDiverged, load_components, load_config,
                               load_params, make_lr_schedule, make_mesh, make_sample_fn)
from flaxdiff.training.checkpoint import config_differences
from flaxdiff.training.logging import image_grid
from helpers.tiny_model import MODEL_CONFIG, TinyDenoiser, toy_batches

BATCH = 8
LR = 0.05
CLIP = 0.1
EMA = 0.95


def _pieces():
    return (schedules.get("cosine"), predictors.get("epsilon"), losses.weightings.get("uniform"),
            losses.time_samplers.get("uniform"))


def _trainer(config, workdir=None, model=None, model_config=MODEL_CONFIG, schedule=None):
    pieces = list(_pieces())
    if schedule is not None:
        pieces[0] = schedule
    return DiffusionTrainer(model or TinyDenoiser(), model_config, *pieces, config, next(toy_batches(0, BATCH)),
                            workdir=workdir)


@pytest.fixture(scope="module")
def hand_run():
    """Three SGD steps with accumulation 2, active clipping and warm-up EMA; host copies of everything."""
    config = TrainConfig(optimizer="sgd", b1=0.0, learning_rate=LR, grad_clip=CLIP, grad_accum_steps=2,
                         ema_decay=EMA, ema_warmup=True, total_steps=3, log_every=1, max_consecutive_bad_steps=2)
    trainer = _trainer(config)
    state = trainer.init()
    record = {"params": [jax.device_get(state.params)], "ema": [jax.device_get(state.ema_params)], "metrics": [],
              "rng": np.asarray(state.rng)}
    data = toy_batches(1, BATCH)
    batches = [next(data) for _ in range(3)]
    for batch in batches:
        record["metrics"].append(jax.device_get(trainer.train_step(batch)))
        record["params"].append(jax.device_get(trainer.state.params))
        record["ema"].append(jax.device_get(trainer.state.ema_params))
    return trainer, batches, record


@functools.partial(jax.jit, static_argnums=(0, 4))
def _hand_grads(model, params, images, step_key, accum):
    """mean_i grad L(params; rows i::accum, key fold_in(step_key, i)) through losses.diffusion_loss directly."""
    schedule, predictor, weighting, sampler = _pieces()
    losses_sum, grads_sum = 0.0, None
    for i in range(accum):
        dropout_key, loss_key = jax.random.split(jax.random.fold_in(step_key, i))

        def apply(p, x, c, cond, dropout_key=dropout_key):
            return model.apply({"params": p}, x, c, cond, train=True, rngs={"dropout": dropout_key})

        def loss_fn(p, i=i, loss_key=loss_key, apply=apply):
            return losses.diffusion_loss(apply, p, images[i::accum], None, loss_key, schedule, predictor, weighting,
                                         sampler)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        losses_sum = losses_sum + loss
        grads_sum = grads if grads_sum is None else jax.tree.map(jnp.add, grads_sum, grads)
    return losses_sum / accum, jax.tree.map(lambda g: g / accum, grads_sum)


def _close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_accumulation_matches_mean_of_micro_batch_gradients(hand_run):
    trainer, batches, record = hand_run
    step_key = jax.random.fold_in(record["rng"], 0)
    loss, grads = _hand_grads(trainer.model, record["params"][0], batches[0]["image"], step_key, 2)
    np.testing.assert_allclose(record["metrics"][0]["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(record["metrics"][0]["grad_norm"], optax.tree.norm(grads), rtol=1e-5)


def test_clipping_scales_the_update_to_the_threshold(hand_run):
    trainer, batches, record = hand_run
    for n in range(2):
        _, grads = _hand_grads(trainer.model, record["params"][n], batches[n]["image"],
                               jax.random.fold_in(record["rng"], n), 2)
        norm = float(optax.tree.norm(grads))
        assert norm > CLIP  # so the clip is active
        expected = jax.tree.map(lambda p, g: p - LR * g * (CLIP / norm), record["params"][n], grads)
        _close(record["params"][n + 1], expected, rtol=1e-4, atol=1e-8)
        step = jax.tree.map(lambda a, b: a - b, record["params"][n + 1], record["params"][n])
        np.testing.assert_allclose(optax.tree.norm(step), LR * CLIP, rtol=1e-4)


def test_ema_follows_warmup_decay(hand_run):
    _, _, record = hand_run
    ema = record["params"][0]
    for n in range(3):
        decay = min(EMA, (1 + n) / (10 + n))
        np.testing.assert_allclose(record["metrics"][n]["ema_decay"], decay, rtol=1e-6)
        ema = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, ema, record["params"][n + 1])
        _close(record["ema"][n + 1], ema, rtol=1e-6, atol=1e-8)
    assert record["metrics"][2]["bad_steps"] == 0


def test_lr_schedule_warmup_then_cosine():
    schedule = make_lr_schedule(TrainConfig(learning_rate=1.0, warmup_steps=10, lr_decay="cosine", total_steps=110,
                                            end_lr_fraction=0.1))
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """Adam run where the batch of step 3 holds a NaN; checkpoint every 3 steps."""
    workdir = tmp_path_factory.mktemp("nan_run")
    config = TrainConfig(learning_rate=1e-2, total_steps=2, log_every=1, checkpoint_every=3, ema_decay=0.9,
                         eval_every=4, eval_batches=2, sample_every=4, keep_best=True)
    trainer = _trainer(config, workdir=workdir)
    trainer.sample_fn = make_sample_fn(trainer, num_images=4, steps=2)
    data = toy_batches(2, BATCH)
    data.nan_at = {2}
    trainer.fit(data)
    before = jax.device_get((trainer.state.params, trainer.state.opt_state, trainer.state.ema_params))
    trainer.fit(data, val_data=lambda: toy_batches(99, BATCH), total_steps=4)
    trainer.close()
    return trainer, workdir, before


def test_nan_batch_is_skipped_and_never_checkpointed(nan_run):
    trainer, workdir, (params, opt_state, ema) = nan_run
    flags = [h["finite"] for h in trainer.history]
    assert flags == [1.0, 1.0, 0.0, 1.0]
    assert [h["bad_steps"] for h in trainer.history] == [0, 0, 1, 1]
    assert [h["consecutive_bad"] for h in trainer.history] == [0, 0, 1, 0]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 3, 4]
    # the step-3 checkpoint holds exactly the params from before the NaN batch
    _close(load_params(workdir / "checkpoints", step=3, ema=False), params, rtol=0, atol=0)
    _close(load_params(workdir / "checkpoints", step=3, ema=True), ema, rtol=0, atol=0)
    for step in saved:
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(load_params(workdir / "checkpoints", step)))
    assert np.isfinite(trainer.history[-1]["loss"])


def test_checkpoint_restores_state_and_data_position(nan_run):
    trainer, workdir, _ = nan_run
    restored = _trainer(trainer.config, workdir=workdir)
    data = toy_batches(2, BATCH)
    assert restored.restore(data)
    assert data.position == 4
    _close(jax.device_get(restored.state), jax.device_get(trainer.state), rtol=0, atol=0)
    restored.close()
    config = load_config(workdir / "checkpoints")
    assert config["model"] == MODEL_CONFIG
    assert config["data"]["shapes"]["image"] == {"shape": [8, 8, 1], "dtype": "float32"}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    elapsed = [r["train/elapsed_s"] for r in train]   # wall time since each fit call began (two calls: 2 + 2)
    assert all(e > 0 for e in elapsed) and elapsed[1] > elapsed[0] and elapsed[3] > elapsed[2]
    for first, second in (train[0:2], train[2:4]):      # consecutive logs: elapsed grows by 1 / steps_per_s
        np.testing.assert_allclose(second["train/elapsed_s"] - first["train/elapsed_s"],
                                   1.0 / second["train/steps_per_s"], rtol=1e-6)
    (evaluation,) = [r for r in records if "eval/val_loss" in r]
    assert evaluation["step"] == 4 and np.isfinite(evaluation["eval/val_loss"])
    assert any((workdir / "tensorboard").iterdir())
    from PIL import Image

    grid = Image.open(workdir / "samples" / "step_00000004.png")
    assert grid.size == (16, 16)


def test_config_mismatch_on_resume_names_the_keys(nan_run):
    trainer, workdir, _ = nan_run
    other = _trainer(trainer.config.replace(learning_rate=3e-3, log_every=7), workdir=workdir,
                     model_config={**MODEL_CONFIG, "features": 16}, schedule=schedules.get("linear"))
    with pytest.raises(ValueError, match=r"does not match this run in 3 key\(s\): model.features: .*schedule.name"
                                         r".*train.learning_rate"):
        other.restore()
    other.close()
    assert config_differences({"train": {"log_every": 1}}, {"train": {"log_every": 2}}) == []


def test_consecutive_bad_steps_stop_with_a_clear_message(hand_run):
    trainer = hand_run[0]
    start = int(trainer.state.step)
    data = toy_batches(3, BATCH)
    data.nan_at = set(range(1, 10))
    with pytest.raises(TrainingDiverged, match=f"stopping at step {start + 3}: 2 consecutive non-finite steps"):
        trainer.fit(data, total_steps=start + 10)
    assert int(trainer.state.bad_steps) == 2
    params = jax.device_get(trainer.state.params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_checkpoint_dir_alone_rebuilds_a_registered_model(tmp_path):
    from flaxdiff import models
    from flaxdiff.training import TrainState

    model = models.get("dit-tiny", input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    trainer = DiffusionTrainer(model, None, *_pieces(), TrainConfig(), next(toy_batches(0, BATCH)),
                               workdir=tmp_path)
    abstract = jax.eval_shape(trainer._init_state)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), abstract.params)
    zero = jnp.zeros((), jnp.int32)
    trainer.state = TrainState(step=zero, params=params, opt_state=trainer.tx.init(params), ema_params=params,
                               rng=jax.random.PRNGKey(0), bad_steps=zero, consecutive_bad=zero)
    trainer.save()
    trainer.close()
    pieces = load_components(tmp_path / "checkpoints")
    assert pieces["config"]["model"] == model.config.to_config()
    assert pieces["schedule"] == schedules.get("cosine")
    assert pieces["predictor"] == predictors.get("epsilon")
    assert pieces["train"] == TrainConfig()
    restored = load_params(tmp_path / "checkpoints")
    _close(restored, params, rtol=0, atol=0)
    x = jnp.ones((2, 8, 8, 1))
    apply = jax.jit(lambda m, p: m.apply({"params": p}, x, jnp.zeros((2,)), None, train=False), static_argnums=0)
    np.testing.assert_array_equal(apply(pieces["model"], restored), apply(model, params))


def test_errors_are_one_clear_line():
    with pytest.raises(ValueError, match=r"mesh shape \(data=2, fsdp=1\) has 2 slots but there are 1 devices"):
        make_mesh(fsdp=1, data=2)
    with pytest.raises(ValueError, match="fsdp=3 does not divide the 1 devices"):
        make_mesh(fsdp=3)
    trainer = _trainer(TrainConfig(grad_accum_steps=2))
    with pytest.raises(ValueError, match="global batch 3 is not divisible by device count 1 x grad_accum_steps 2"):
        trainer.global_batch({"image": np.zeros((3, 8, 8, 1), np.float32)})
    with pytest.raises(ValueError, match="lr_decay='step'; accepted: cosine, linear, constant"):
        TrainConfig(lr_decay="step")
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['lr'\]"):
        TrainConfig.from_config({"lr": 1.0})


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(images, columns=2)
    assert grid.shape == (4, 6, 1)
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 128 and grid[2, 0, 0] == 255 and grid[2, 3, 0] == 0


def test_bfloat16_compute_keeps_float32_params_and_output(hand_run):
    params = hand_run[2]["params"][0]
    trainer = _trainer(TrainConfig(compute_dtype="bfloat16"))
    x = jnp.asarray(next(toy_batches(4, 2))["image"])
    c_noise = jnp.array([10.0, 500.0])
    out16 = trainer.apply_fn(False)(params, x, c_noise, None)
    out32 = hand_run[0].apply_fn(False)(params, x, c_noise, None)
    assert out16.dtype == jnp.float32 and out32.dtype == jnp.float32
    assert 0 < float(jnp.max(jnp.abs(out16 - out32))) < 0.05 * float(jnp.max(jnp.abs(out32)))
