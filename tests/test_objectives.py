"""Loss objects given to the one Trainer: the masked MicroDiT loss is exactly what the trainer logs, optimises and
validates; reflow and the autoencoder train through the trainer and resume bitwise; the registry round-trips; the
trainer has no subclasses."""
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxdiff
from flaxdiff import losses, models, objectives, predictors, schedules
from flaxdiff.models import masking
from flaxdiff.training import DiffusionTrainer, TrainConfig, Trainer, load_config
from helpers.tiny_model import TinyDenoiser, toy_batches

BATCH = 8
LR = 0.5


def _pieces():
    return (schedules.get("rectified_flow"), predictors.get("velocity"), losses.weightings.get("uniform"),
            losses.time_samplers.get("uniform"))


def _masked_dit(mask_ratio=0.5):
    return models.get("dit-tiny", input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                      patch_mixer_depth=1, mask_ratio=mask_ratio, num_classes=4)


def test_masked_dit_through_the_trainer_logs_optimises_and_validates_the_visible_patch_loss():
    model = _masked_dit()
    loss = objectives.MaskedDiffusionLoss.for_model(model, objectives.DiffusionLoss(*_pieces()))
    config = TrainConfig(optimizer="sgd", b1=0.0, learning_rate=LR, grad_clip=0.0, ema_decay=0.0, log_every=1)
    images = next(toy_batches(0, BATCH))["image"]
    batch = {"image": images, "label": np.arange(BATCH, dtype=np.int32) % 4}
    trainer = Trainer(model, train_config=config, example_batch=batch, loss=loss)
    state = trainer.init()
    params0, rng = jax.device_get(state.params), np.asarray(state.rng)
    metrics = jax.device_get(trainer.train_step(batch))

    # the trainer's keys for step 0, micro-batch 0: (dropout_key, loss_key) = split(fold_in(fold_in(rng, 0), 0))
    loss_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, 0), 0))[1]
    x0, cond = jnp.asarray(images), {"label": jnp.asarray(batch["label"])}
    reference = jax.jit(jax.value_and_grad(
        lambda p: masking.masked_diffusion_loss(model, p, x0, cond, loss_key, *_pieces())[0]))
    ref_loss, ref_grads = reference(params0)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(ref_grads), rtol=1e-5)
    expected = jax.tree.map(lambda p, g: p - LR * g, params0, ref_grads)   # plain SGD: the update is its gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(trainer.state.params), expected)
    # the same key scored on every pixel (the plain diffusion loss of the masked output) is a different number
    full = objectives.DiffusionLoss(*_pieces())
    full_loss, _ = full(lambda p, *a, **k: model.apply({"params": p}, *a, mask_key=jax.random.split(loss_key)[0],
                                                       **{**k, "train": True}),
                        params0, {"image": x0, **cond}, jax.random.split(loss_key)[1])
    assert abs(float(full_loss) - float(ref_loss)) > 1e-3 * float(ref_loss)

    # validation: the same visible-patch objective with the evaluation key fold_in(PRNGKey(seed + 1), 0)
    val = trainer.evaluate(iter([batch]), 1)
    val_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), 0))[1]
    params1 = jax.device_get(trainer.state.params)
    np.testing.assert_allclose(val["val_loss"], masking.masked_diffusion_loss(model, params1, x0, cond, val_key,
                                                                              *_pieces())[0], rtol=1e-6)
    trainer.close()


def test_masked_loss_refuses_a_model_with_other_mask_geometry():
    loss = objectives.MaskedDiffusionLoss(objectives.DiffusionLoss(*_pieces()), patch_size=2, mask_ratio=0.75)
    with pytest.raises(ValueError, match=r"masked loss has patch_size=2, mask_ratio=0.75 but the model has "
                                         r"patch_size=2, mask_ratio=0.5"):
        Trainer(_masked_dit(0.5), train_config=TrainConfig(), example_batch=next(toy_batches(0, 2)), loss=loss)
    with pytest.raises(ValueError, match="mask_ratio=1.0 is outside"):
        objectives.MaskedDiffusionLoss(objectives.DiffusionLoss(*_pieces()), patch_size=2, mask_ratio=1.0)


class CoupledToy:
    """Resumable toy reflow pairs: {"image", "noise"} from toy_batches plus noise seeded by the position."""

    def __init__(self) -> None:
        self.inner = toy_batches(7, BATCH)

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([11, self.inner.position])
        batch = next(self.inner)
        return {**batch, "noise": rng.normal(size=batch["image"].shape).astype(np.float32)}

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _reflow_trainer(workdir, run_config):
    config = TrainConfig(learning_rate=1e-2, total_steps=4, log_every=1, checkpoint_every=2, ema_decay=0.5,
                         async_checkpoints=False)
    loss = objectives.ReflowLoss(*_pieces())
    return Trainer(TinyDenoiser(), train_config=config, example_batch=next(CoupledToy()), loss=loss,
                   workdir=workdir, run_config=run_config), CoupledToy()


def _autoencoder_trainer(workdir, run_config):
    config = TrainConfig(learning_rate=1e-2, total_steps=4, log_every=1, checkpoint_every=2, ema_decay=0.0,
                         async_checkpoints=False)
    ae = models.get_config("autoencoder-tiny", block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2)
    data = toy_batches(3, BATCH)
    return Trainer(ae.make(), train_config=config, example_batch=next(toy_batches(3, BATCH)),
                   loss=objectives.AutoencoderLoss(kl_weight=1e-3), workdir=workdir, run_config=run_config), data


@pytest.mark.parametrize("make", [_reflow_trainer, _autoencoder_trainer], ids=["reflow", "autoencoder"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one_bitwise(make, tmp_path):
    run_config = {"task": make.__name__, "train": {"learning_rate": 1e-2}} if make is _reflow_trainer else None
    reference, data = make(tmp_path / "reference", run_config)
    reference.fit(data)
    reference.close()

    first, data = make(tmp_path / "interrupted", run_config)
    first.fit(data, total_steps=2)                       # stops after the step-2 checkpoint (a preemption)
    first.close()
    resumed, fresh_data = make(tmp_path / "interrupted", run_config)
    resumed.fit(fresh_data)                              # restores step 2 and the data position, runs steps 3-4
    resumed.close()
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [h["loss"] for h in first.history + resumed.history] == [h["loss"] for h in reference.history]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), jax.device_get(reference.state))
    saved = load_config(tmp_path / "interrupted" / "checkpoints")
    if run_config is not None:                           # the run config is exactly what the checkpoint stores
        assert saved == run_config
        other, _ = make(tmp_path / "interrupted", {**run_config, "train": {"learning_rate": 2e-2}})
        with pytest.raises(ValueError, match=r"does not match this run in 1 key\(s\): train.learning_rate: "
                                             r"checkpoint=0.01 vs now=0.02"):
            other.restore()
        other.close()
    else:
        assert saved["loss"] == {"name": "autoencoder", "kl_weight": 1e-3, "image_key": "image"}
        assert "mse" in reference.history[-1] and "kl" in reference.history[-1]


def test_legacy_positional_form_builds_the_diffusion_loss():
    config = TrainConfig(cond_drop_prob=0.25, null_cond={"label": 10})
    example = next(toy_batches(0, 2))
    trainer = DiffusionTrainer(TinyDenoiser(), None, *_pieces(), config, example)
    assert trainer.loss == objectives.DiffusionLoss(*_pieces(), cond_drop_prob=0.25, null_cond={"label": 10})
    assert trainer.schedule == _pieces()[0] and trainer.predictor == _pieces()[1]
    assert trainer.full_config["schedule"] == _pieces()[0].to_config()
    assert trainer.full_config["loss"] == {"name": "diffusion", "cond_drop_prob": 0.25, "null_cond": {"label": 10},
                                           "image_key": "image"}
    with pytest.raises(ValueError, match="give either loss=... or schedule/predictor/weighting/time_sampler"):
        Trainer(TinyDenoiser(), None, *_pieces(), config, example, loss=objectives.DiffusionLoss(*_pieces()))
    with pytest.raises(ValueError, match="Trainer needs loss=... .* or all four of schedule"):
        Trainer(TinyDenoiser(), None, _pieces()[0], train_config=config, example_batch=example)


def test_every_registered_loss_round_trips_through_its_config():
    diffusion = objectives.DiffusionLoss(*_pieces(), cond_drop_prob=0.1, null_cond={"label": 3})
    members = [diffusion, objectives.ReflowLoss(*_pieces()), objectives.MaskedDiffusionLoss(diffusion, 2, 0.5),
               objectives.AutoencoderLoss(kl_weight=0.01), objectives.ClassifierLoss(max_shift=1)]
    assert sorted(type(m).name for m in members) == objectives.objectives.available()
    for member in members:
        config = member.to_config()
        assert objectives.from_config(config) == member
        pieces, rest = objectives.split_config(config)
        assert objectives.join_config(pieces, rest) == config
    with pytest.raises(ValueError, match="unknown loss 'l1'; available: autoencoder, classifier, diffusion"):
        objectives.from_config({"name": "l1"})


def test_classifier_loss_is_cross_entropy_and_translation_keeps_pixels():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    batch = {"image": jnp.zeros((2, 4, 4, 1)), "label": jnp.array([0, 2])}
    loss, metrics = objectives.ClassifierLoss()(lambda p, x: (logits, None), None, batch, jax.random.PRNGKey(0),
                                                train=False)
    log_softmax = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(loss, -(log_softmax[0, 0] + log_softmax[1, 2]) / 2, rtol=1e-6)
    assert float(metrics["accuracy"]) == 0.5
    image = jnp.arange(16.0).reshape(1, 4, 4, 1)
    shifted = objectives.translate(jnp.repeat(image, 50, 0), jax.random.PRNGKey(1), 1)
    for row in np.asarray(shifted):   # every shift is a crop of the -1-padded image
        padded = np.pad(np.asarray(image[0, ..., 0]), 1, constant_values=-1.0)
        assert any(np.array_equal(row[..., 0], padded[i:i + 4, j:j + 4]) for i in range(3) for j in range(3))


def test_no_class_inherits_from_the_trainer():
    for info in pkgutil.walk_packages(flaxdiff.__path__, "flaxdiff."):
        importlib.import_module(info.name)
    assert DiffusionTrainer is Trainer
    assert Trainer.__subclasses__() == []
