"""Text-to-image: the offline MNIST caption set, caption glue for sources, and an end-to-end caption-conditioned
run of training.py whose samples depend on the prompt (Pipeline and `flaxdiff sample --prompt`)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxdiff import cli, data
from flaxdiff.data import captions
from flaxdiff.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402
from helpers.run_config import assert_config_feeds_back  # noqa: E402


def test_mnist_captions_cover_every_template_and_name_the_digit():
    labels = np.repeat(np.arange(10), 30)
    texts = captions.mnist_captions(labels, seed=0)
    assert len(texts) == len(labels) and texts == captions.mnist_captions(labels, seed=0)
    for digit in range(10):
        mine = {t for t, d in zip(texts, labels) if d == digit}
        assert len(mine) == len(captions.MNIST_TEMPLATES)
        assert all(captions.DIGIT_WORDS[digit] in t or str(digit) in t for t in mine)
    assert captions.digit_caption(7, 0) == "a handwritten digit seven"
    assert captions.digit_caption(7, 1) == "the number 7"
    with pytest.raises(ValueError, match="digit=10 is outside 0..9"):
        captions.digit_caption(10)


def test_with_captions_for_arrays_and_image_folders(tmp_path):
    source = data.ArraySource(np.zeros((4, 8, 8), np.uint8), [0, 1, 2, 3])
    captioned = captions.with_captions(source, "mnist")
    assert [captioned[i]["caption"] for i in range(4)] == captions.mnist_captions([0, 1, 2, 3])
    with pytest.raises(ValueError, match="has no captions"):
        captions.with_captions(source, "source")
    with pytest.raises(ValueError, match="captions='words'; accepted: mnist, source"):
        captions.with_captions(source, "words")
    from PIL import Image

    for name, text in (("a", "a red square"), ("b", "a blue circle")):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(text)
    folder = captions.with_captions(data.load_source(str(tmp_path)), "source")
    assert sorted(folder[i]["caption"] for i in range(2)) == ["a blue circle", "a red square"]
    assert captions.preview_prompts(folder, 2) == ["a red square"] * 2 + ["a blue circle"] * 2


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("text_run")
    code = training.main(["--dataset", "digits", "--captions", "mnist", "--image-size", "8", "--model", "unet-tiny",
                          "--model-config", '{"channel_mult": [1]}', "--batch-size", "8", "--steps", "3", "--warmup-steps", "0",
                          "--lr-decay", "constant", "--log-every", "1", "--preview-per-class", "0",
                          "--workdir", str(workdir)])
    assert code == 0
    return workdir


def test_prompt_changes_the_output(text_run, capsys):
    assert_config_feeds_back(training, text_run, capsys)
    pipe = Pipeline.from_pretrained(text_run)
    config = json.loads((text_run / "config.json").read_text())
    assert config["data"]["captions"] == "mnist" and pipe.text is not None
    assert pipe.null_cond == captions.NULL_TEXT_COND
    kwargs = dict(sampler="euler", steps=2, seed=3, output="float", guidance_scale=1.0)
    seven = pipe.generate(prompts=["the number 7"] * 2, **kwargs)
    again = pipe.generate(prompts=["the number 7"] * 2, **kwargs)
    one = pipe.generate(prompts=["the number 1"] * 2, **kwargs)
    assert seven.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(seven, again)
    assert float(np.max(np.abs(seven - one))) > 1e-6
    # guidance at every noise level (the run's saved interval would leave both of the 2 steps unguided)
    guided = pipe.generate(prompts=["the number 7"] * 2, **{**kwargs, "guidance_scale": 3.0},
                           guidance_interval=(0.0, 1e6))
    assert np.isfinite(guided).all() and float(np.max(np.abs(guided - seven))) > 1e-6
    with pytest.raises(ValueError, match="labels given but this model is text-conditioned"):
        pipe.generate(labels=[1, 2])


def test_cli_sample_prompt(text_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = cli.main(["sample", str(text_run), "--prompt", "the number 3", "a handwritten digit five",
                     "--per-class", "2", "--steps", "2", "--sampler", "euler", "--out", str(out)])
    assert code == 0 and out.is_file()
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 4 and result["rows"] == 2 and result["columns"] == 2
