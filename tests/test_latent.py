"""Latent diffusion end to end on tiny settings: train the autoencoder (loadable by interop.load_autoencoder, scale
estimated from data), cache latents through the data layer, train on them with training.py and decode samples."""
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import data, interop, latents
from flaxdiff.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402
from helpers.run_config import assert_config_feeds_back  # noqa: E402

AE_CONFIG = {"block_out_channels": (8, 8), "norm_num_groups": 4, "latent_channels": 2}


@pytest.fixture(scope="module")
def images():
    source = data.digits_source("train")
    return data.ArraySource(source.images[:24], source.labels[:24], value_range=(0.0, 1.0), name="digits24")


@pytest.fixture(scope="module")
def autoencoder(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "autoencoder"
    latents.train_autoencoder(images, out, model_config=AE_CONFIG, image_size=8, batch_size=8, steps=3,
                              scale_images=24, log_every=1)
    return out


def test_autoencoder_export_loads_with_a_data_estimated_scale(autoencoder, images, tmp_path):
    module, params, config = interop.load_autoencoder(autoencoder)
    assert config.downsample_factor == 2 and config.latent_channels == 2
    history = json.loads((autoencoder / "run_config.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in history)
    cache = latents.cache_latents(autoencoder, images, tmp_path / "cache.npz", image_size=8, batch_size=16)
    info = latents.read_cache_info(cache)
    assert info["count"] == 24 and info["shape"] == (4, 4, 2)
    assert info["scaling_factor"] == pytest.approx(config.scaling_factor, rel=1e-6)
    # the scale was estimated on these same 24 images, so the scaled latents have unit std
    assert abs(info["latent_std"] - 1.0) < 1e-3


def test_cached_latents_read_back_unchanged_and_decode_to_image_shape(autoencoder, images, tmp_path):
    cache = latents.cache_latents(autoencoder, images, tmp_path / "cache.npz", image_size=8, batch_size=16)
    with np.load(cache) as stored:
        np.testing.assert_array_equal(stored["labels"], images.labels)
        raw = stored["latents"]
    batch = next(data.make_loader(latents.latent_source(cache), 8, None, shuffle=False, num_epochs=1))
    np.testing.assert_allclose(batch["image"], raw[:8], atol=1e-6)
    codec = latents.load_codec(autoencoder)
    pixels = next(data.make_loader(images, 8, 8, shuffle=False, num_epochs=1))["image"]
    np.testing.assert_allclose(codec.encode(jnp.asarray(pixels)), raw[:8], atol=1e-5)
    decoded = np.asarray(codec.decode(jnp.asarray(batch["image"])))
    assert decoded.shape == (8, 8, 8, 1) and decoded.min() >= -1.0 and decoded.max() <= 1.0
    assert codec.latent_shape((8, 8, 1)) == (4, 4, 2)
    with pytest.raises(ValueError, match="is not a latent cache"):
        np.savez(tmp_path / "plain.npz", images=np.zeros((2, 4, 4)))
        latents.latent_source(tmp_path / "plain.npz")


def test_training_on_latents_and_pipeline_decodes(autoencoder, tmp_path, capsys):
    workdir = tmp_path / "latent_run"
    code = training.main(["--dataset", "digits", "--image-size", "8", "--latent-autoencoder", str(autoencoder),
                          "--model", "unet-tiny", "--model-config", '{"channel_mult": [1]}', "--batch-size", "8",
                          "--steps", "2", "--log-every", "1", "--preview-per-class", "0", "--workdir", str(workdir)])
    assert code == 0
    assert latents.read_cache_info(workdir / "latents_train_8.npz")["shape"] == (4, 4, 2)
    saved = assert_config_feeds_back(training, workdir, capsys)
    assert not Path(saved["data"]["latent_autoencoder"]).is_absolute()      # relative to the run directory
    pipe = Pipeline.from_pretrained(workdir)
    assert pipe.sample_shape == (4, 4, 2) and pipe.image_shape == (8, 8, 1)
    images = pipe.generate(labels=[3, 4, 5], sampler="euler", steps=2)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
