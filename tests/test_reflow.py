"""Reflow: the flow-time grid, the coupled loss in closed form, pairs deterministic for a key (and independent of
the batch split), and `training.py --task reflow` training a loadable model from a base checkpoint."""
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import losses, predictors, reflow, schedules
from flaxdiff.pipeline import Pipeline
from flaxdiff.training import load_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402
from helpers.run_config import assert_config_feeds_back  # noqa: E402

TINY = ["--dataset", "digits", "--image-size", "8", "--model", "unet-tiny", "--model-config", '{"channel_mult": [1]}',
        "--batch-size", "8", "--warmup-steps", "0", "--lr-decay", "constant", "--log-every", "1",
        "--preview-per-class", "0"]


def test_flow_time_grid():
    np.testing.assert_allclose(reflow.flow_time_grid(2), [1000.0, 1.0, 0.0])
    grid = reflow.flow_time_grid(5)
    t = grid[1:] / (1 + grid[1:])
    np.testing.assert_allclose(t, [0.8, 0.6, 0.4, 0.2, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        reflow.flow_time_grid(0)


def test_reflow_loss_is_zero_for_the_straight_velocity_and_uses_the_given_noise():
    schedule, predictor = schedules.get("rectified_flow"), predictors.get("velocity")
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 1))
    eps = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 1))
    args = (None, jax.random.PRNGKey(2), schedule, predictor, losses.weightings.get("uniform"),
            losses.time_samplers.get("uniform"))
    exact = lambda params, x, c_noise, cond: eps - x0  # noqa: E731  (u = d x_t / dt = eps - x0)
    loss, _ = reflow.reflow_loss(exact, None, x0, eps, *args)
    assert float(loss) < 1e-10
    zero = lambda params, x, c_noise, cond: jnp.zeros_like(x)  # noqa: E731
    loss, _ = reflow.reflow_loss(zero, None, x0, eps, *args)
    np.testing.assert_allclose(float(loss), float(jnp.mean(jnp.square(eps - x0))), rtol=1e-5)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base")
    assert training.main([*TINY, "--steps", "3", "--workdir", str(workdir)]) == 0
    return workdir


def test_pairs_are_deterministic_for_a_key(base_run):
    pipe = Pipeline.from_pretrained(base_run)
    key = jax.random.PRNGKey(5)
    first = reflow.generate_pairs(pipe, 6, key, sampler="euler", steps=2, guidance_scale=2.0, batch_size=6)
    again = reflow.generate_pairs(pipe, 6, key, sampler="euler", steps=2, guidance_scale=2.0, batch_size=4)
    other = reflow.generate_pairs(pipe, 6, jax.random.PRNGKey(6), sampler="euler", steps=2, guidance_scale=2.0,
                                  batch_size=6)
    assert first["noise"].shape == first["image"].shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(first["label"], np.arange(6) % 10)
    np.testing.assert_array_equal(first["noise"], again["noise"])
    np.testing.assert_allclose(first["image"], again["image"], atol=1e-5)
    np.testing.assert_array_equal(first["noise"][2], np.asarray(jax.random.normal(jax.random.fold_in(key, 2),
                                                                                  (8, 8, 1))))
    assert not np.allclose(first["noise"], other["noise"])


def test_training_script_reflow_trains_from_the_base(base_run, tmp_path, capsys):
    workdir = tmp_path / "reflow"
    code = training.main([*TINY, "--task", "reflow", "--reflow-from", str(base_run), "--reflow-pairs", "16",
                          "--reflow-steps", "2", "--reflow-guidance", "2", "--steps", "2", "--workdir", str(workdir)])
    assert code == 0
    with np.load(workdir / "reflow_pairs.npz") as pairs:
        assert pairs["noise"].shape == pairs["image"].shape == (16, 8, 8, 1)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses_seen = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses_seen) == 2 and np.isfinite(losses_seen).all()
    base = load_params(base_run / "checkpoints", ema=False)
    trained = load_params(workdir / "checkpoints", ema=False)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(trained)))
    assert 0 < moved < 0.1   # started from the base params and took a few small steps
    pipe = Pipeline.from_pretrained(workdir)
    assert pipe.config.task.name == "reflow" and pipe.config.task.reflow_from == str(base_run.absolute())
    assert pipe.config.task.reflow_guidance == 2.0 and pipe.config.model == Pipeline.from_pretrained(base_run).config.model
    saved = assert_config_feeds_back(training, workdir, capsys)
    assert_config_feeds_back(training, base_run, capsys)
    assert saved["task"]["reflow_from"] == os.path.relpath(base_run, workdir)   # relative to the run directory
    images = pipe.generate(labels=[0, 1], sampler="euler", steps=1, grid=reflow.flow_time_grid(1))
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
