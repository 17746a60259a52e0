"""Pipeline.from_pretrained on a tiny training.py checkpoint: shapes, dtypes, labels, per-image seeds."""
import numpy as np
import pytest

from flaxdiff.pipeline import Pipeline, resolve_checkpoint_dir, to_uint8


@pytest.fixture(scope="module")
def pipe(run_dir):
    return Pipeline.from_pretrained(run_dir)


def test_loads_the_checkpoint_config(pipe):
    assert pipe.num_classes == 10 and pipe.null_cond == {"label": 10}
    assert pipe.sample_shape == (16, 16, 1) and pipe.image_shape == (16, 16, 1) and pipe.step == 2
    assert pipe.schedule.name == "rectified_flow" and pipe.predictor.name == "velocity"


def test_generate_shapes_dtypes_and_seeds(pipe):
    images = pipe.generate(labels=[0, 3, 9], steps=2, guidance_scale=2.0, seed=1)
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    floats = pipe.generate(labels=[0, 3, 9], steps=2, guidance_scale=2.0, seed=1, output="float")
    assert floats.dtype == np.float32 and floats.min() >= -1.0 and floats.max() <= 1.0
    np.testing.assert_array_equal(to_uint8(floats), images)
    # an image depends only on (seed, its index), not on the batch it was drawn in
    chunked = pipe.generate(labels=[0, 3, 9], steps=2, guidance_scale=2.0, seed=1, output="float", batch_size=2)
    np.testing.assert_allclose(chunked, floats, atol=1e-5)
    other = pipe.generate(labels=[0, 3, 9], steps=2, guidance_scale=2.0, seed=2, output="float")
    assert np.abs(other - floats).max() > 0.1


def test_num_images_cycles_the_classes(pipe):
    images = pipe.generate(num_images=12, steps=2, sampler="euler")
    assert images.shape == (12, 16, 16, 1)
    assert list(pipe._labels(12, None)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_ema_and_raw_params_differ(pipe, run_dir):
    import jax

    raw = Pipeline.from_pretrained(run_dir / "checkpoints", ema=False)
    assert raw.step == pipe.step
    differs = [np.any(np.asarray(a) != np.asarray(b))
               for a, b in zip(jax.tree.leaves(raw.params), jax.tree.leaves(pipe.params))]
    assert any(differs)


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": [10]}, "label 10 is outside 0..9"),
    ({}, "give labels or a positive num_images"),
    ({"labels": [1, 2], "num_images": 3}, "num_images=3 but 2 labels"),
    ({"num_images": 2, "output": "png"}, "output='png'"),
    ({"num_images": 2, "sampler": "nope"}, "unknown sampler 'nope'"),
])
def test_generate_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.generate(**{"steps": 2, **kwargs})


def test_resolve_checkpoint_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no checkpoint steps"):
        resolve_checkpoint_dir(tmp_path)


def test_repeated_generate_compiles_nothing_new(run_dir):
    """What `flaxdiff eval` and the training preview do: sampling again (other labels, seed, params of the same
    shapes, a with_params clone) reuses the compiled sampler; counted with jax.monitoring's compile events."""
    import jax
    import jax.numpy as jnp

    pipe = Pipeline.from_pretrained(run_dir)
    other = jax.tree.map(lambda p: p + jnp.asarray(0.01, p.dtype), pipe.params)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        options = dict(sampler="dpmpp_2m", steps=3, guidance_scale=3.0, output="float")
        first = pipe.generate(labels=[0, 1, 2, 3], seed=0, **options)
        after_first = len(compiles)
        second = pipe.generate(labels=[7, 8, 9, 1], seed=5, **options)
        third = pipe.with_params(other).generate(labels=[7, 8, 9, 1], seed=5, **options)
        assert len(compiles) == after_first, f"{len(compiles) - after_first} new compilations"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert after_first > 0 and first.shape == second.shape == (4, 16, 16, 1)
    assert float(np.max(np.abs(third - second))) > 0
