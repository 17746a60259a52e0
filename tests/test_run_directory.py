"""Run directories are never damaged by a refused or failed start, a damaged latest step falls back to the newest
intact one, and a moved run directory resumes to a bitwise-identical continuation."""
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402
from flaxdiff import checkpoints  # noqa: E402

# constant LR: the run length is a run-only setting, so a 2-step run resumed to 4 steps is the 4-step run
TINY = ["--dataset", "digits", "--image-size", "16", "--model", "unet-tiny", "--model-config", '{"channel_mult": [1]}',
        "--batch-size", "8", "--lr-decay", "constant", "--warmup-steps", "0", "--log-every", "1",
        "--preview-per-class", "0", "--checkpoint-every", "2"]


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _params(workdir, step):
    return checkpoints.load_params(Path(workdir) / "checkpoints", step, ema=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-step run (checkpoint at step 2) and the uninterrupted 4-step run of the same settings."""
    root = tmp_path_factory.mktemp("rundirs")
    assert training.main([*TINY, "--steps", "2", "--workdir", str(root / "two")]) == 0
    assert training.main([*TINY, "--steps", "4", "--workdir", str(root / "four")]) == 0
    return root


def test_moved_run_resumes_bitwise(base, tmp_path):
    moved = tmp_path / "somewhere" / "else"
    shutil.copytree(base / "two", moved)
    assert training.main([*TINY, "--steps", "4", "--workdir", str(moved), "--resume"]) == 0
    resumed, straight = _params(moved, 4), _params(base / "four", 4)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)
    assert checkpoints.list_steps(moved / "checkpoints") == [2, 4]


@pytest.mark.parametrize("argv, message", [
    ([], "already holds checkpoints (steps [2]); pass --resume"),
    (["--resume", "--model-config", '{"base_channels": 8}'], "setting(s) differ: model.options"),
    (["--resume", "--lr", "0.5"], "was trained with train.learning_rate=0.0015, this run has 0.5"),
    (["--resume", "--dataset", "mnist"], "data.dataset"),
])
def test_refused_start_leaves_the_run_directory_byte_identical(base, tmp_path, capsys, argv, message):
    workdir = tmp_path / "run"
    shutil.copytree(base / "two", workdir)
    before = _snapshot(workdir)
    assert training.main([*TINY, "--steps", "4", "--workdir", str(workdir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("training.py: error:") and message in err[-1]
    assert _snapshot(workdir) == before


def test_damaged_latest_step_falls_back_to_the_newest_intact_step(base, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(base / "four", workdir)
    # truncate one array file of the latest step's state (a crash mid-write, a full disk)
    data_files = sorted((workdir / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda p: -p.stat().st_size)
    data_files[0].write_bytes(data_files[0].read_bytes()[:10])
    problem = checkpoints.step_problem(workdir / "checkpoints", 4, deep=True)
    assert problem is not None and "cannot be read" in problem
    assert checkpoints.step_problem(workdir / "checkpoints", 2, deep=True) is None
    intact_before = _snapshot(workdir / "checkpoints" / "2")
    with caplog.at_level("WARNING"):
        assert training.main([*TINY, "--steps", "4", "--workdir", str(workdir), "--resume"]) == 0
    assert "checkpoint step 4 is damaged" in caplog.text and "resuming from step 2" in caplog.text
    # nothing lost: the damaged step is kept aside, the intact step untouched, and the run reaches step 4 again
    assert (workdir / training.DAMAGED_DIR / "4" / "state").is_dir()
    assert _snapshot(workdir / "checkpoints" / "2") == intact_before
    for a, b in zip(jax.tree.leaves(_params(workdir, 4)), jax.tree.leaves(_params(base / "four", 4))):
        np.testing.assert_array_equal(a, b)


def test_missing_metadata_is_named_and_no_intact_step_is_one_line(base, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(base / "two", workdir)
    (workdir / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    assert checkpoints.step_problem(workdir / "checkpoints", 2) == "state/_METADATA is missing"
    before = _snapshot(workdir)
    assert training.main([*TINY, "--steps", "4", "--workdir", str(workdir), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has no intact checkpoint (step 2: state/_METADATA is missing)" in err
    assert _snapshot(workdir) == before


def test_unwritable_workdir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert training.main([*TINY, "--steps", "1", "--workdir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be written" in err or "not a directory" in err
    assert blocker.read_text() == "x"


def test_nan_pixels_are_refused_before_training(tmp_path, capsys):
    images = np.random.default_rng(0).uniform(size=(20, 8, 8)).astype(np.float32)
    images[7, 3, 3] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=np.arange(20) % 2)
    assert training.main([*TINY, "--dataset", str(path), "--steps", "1", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bad.npz" in err and "1 example(s) hold NaN or inf values (the first is example 7)" in err
    assert not (tmp_path / "w").exists()


def test_image_size_the_model_cannot_take_is_refused_before_anything_is_written(tmp_path, capsys):
    # three levels ("channel_mult": [1, 2, 2]) downsample twice: the image side must be a multiple of 4
    argv = [a if a != '{"channel_mult": [1]}' else '{"channel_mult": [1, 2, 2]}' for a in TINY]
    argv = [a if a != "16" else "18" for a in argv]
    assert training.main([*argv, "--steps", "1", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("training.py: error: model 'unet-tiny' cannot take the data's (18, 18, 1) inputs: image size "
                   "18x18 is not divisible by 4 (patch_size 1 and 2 downsamplings); set data.image_size "
                   "(--image-size) to a size it accepts")
    assert not (tmp_path / "w").exists()


def test_model_option_error_is_refused_before_anything_is_written(tmp_path, capsys):
    argv = ["--dataset", "digits", "--image-size", "16", "--model", "dit-tiny", "--model-config", '{"num_heads": 3}',
            "--steps", "1", "--workdir", str(tmp_path / "w")]
    assert training.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "training.py: error: hidden_size=64 is not divisible by num_heads=3"   # no image-size hint
    assert not (tmp_path / "w").exists()


def test_saved_config_has_no_absolute_paths(base):
    text = (base / "two" / "config.json").read_text()
    assert str(base) not in text and json.loads(text)["data"]["dataset"] == "digits"


def test_image_folder_with_mixed_modes_batches_at_one_channel_count(tmp_path):
    from PIL import Image

    from flaxdiff import data

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    images = {"l.png": Image.fromarray(rgb[..., 0], "L"), "rgb.png": Image.fromarray(rgb, "RGB")}
    images["la.png"] = images["l.png"].convert("LA")
    images["rgba.png"] = images["rgb.png"].convert("RGBA")
    images["p.png"] = images["rgb.png"].convert("P")
    for name, image in images.items():
        image.save(tmp_path / name)
    source = data.load_source(str(tmp_path))
    assert source.channels == 3 and {source[i]["image"].shape for i in range(len(source))} == {(12, 12, 3)}
    batch = next(data.make_loader(source, 5, 8, seed=0))
    assert batch["image"].shape == (5, 8, 8, 3)
    # a grey folder (L, LA and a grey palette) stays one channel
    grey = tmp_path / "grey"
    grey.mkdir()
    for name in ("l.png", "la.png"):
        images[name].save(grey / name)
    images["l.png"].convert("P").save(grey / "p.png")
    assert data.load_source(str(grey)).channels == 1
    assert next(data.make_loader(data.load_source(str(grey)), 3, 8, seed=0))["image"].shape == (3, 8, 8, 1)


def test_reading_a_run_imports_no_trainer_code(base):
    import subprocess

    code = ("import sys; from flaxdiff.pipeline import Pipeline; "
            f"pipe = Pipeline.from_pretrained({str(base / 'two')!r}); "
            "loaded = sorted(m for m in sys.modules if m.startswith(('flaxdiff.training', 'flaxdiff.objectives'))); "
            "print(pipe.step, pipe.sample.sampler, loaded)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "dpmpp_2m", "[]"]
