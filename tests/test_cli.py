"""The ``flaxdiff`` CLI on a tiny checkpoint trained by training.py: sample grid sizes, eval metrics JSON, export
files, and one-line errors that never overwrite existing outputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flaxdiff import cli


def _cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_writes_the_requested_grid(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, _ = _cli(["sample", run_dir, "--out", out, "--classes", "1,4,7", "--per-class", "5",
                            "--steps", "3"], capsys)
    assert code == 0
    assert Image.open(out).size == (5 * 16, 3 * 16)          # 3 class rows x 5 columns of 16 px
    report = json.loads(stdout)
    assert (report["rows"], report["columns"], report["images"], report["step"]) == (3, 5, 15, 2)


def test_sample_default_grid_is_one_row_per_class(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "all.png"
    monkeypatch.chdir(run_dir.parent)                      # a relative checkpoint path works too
    code, _, _ = _cli(["sample", Path(run_dir.name) / "checkpoints", "--out", out, "--per-class", "2", "--steps", "2",
                       "--sampler", "euler", "--guidance", "1"], capsys)
    assert code == 0
    assert Image.open(out).size == (2 * 16, 10 * 16)


def test_sample_refuses_to_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "exists.png"
    out.write_bytes(b"keep me")
    code, _, err = _cli(["sample", run_dir, "--out", out], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("extra, message", [
    (["--classes", "3,12"], "--classes 12 is outside 0..9"),
    (["--sampler", "nope"], "--sampler 'nope' is unknown; accepted: ddim"),
    (["--prompts", "a seven"], "--prompts needs a text-conditioned checkpoint"),
    (["--steps", "0"], "--steps 0 is invalid; accepted: an integer >= 1"),
    (["--grid", "nope"], "--grid 'nope' is unknown; accepted:"),
    (["--guidance", "-1"], "--guidance -1.0 is invalid; accepted: a finite number >= 0"),
    (["--guidance", "nan"], "--guidance: 'nan' is invalid; accepted: a finite number"),
    (["--guidance", "abc"], "--guidance: 'abc' is invalid; accepted: a finite number"),
    (["--guidance-interval", "5,1"], "LO,HI with 0 <= LO <= HI"),
    (["--batch-size", "0"], "--batch-size 0 is invalid; accepted: an integer >= 1"),
    (["--per-class", "0"], "--per-class: '0' is invalid; accepted: an integer >= 1"),
    (["--num-images", "0"], "--num-images: '0' is invalid; accepted: an integer >= 1"),
    (["--step", "-1"], "--step: '-1' is invalid; accepted: a checkpoint step"),
    (["--step", "7"], "step 7 is not in"),
])
def test_sample_bad_input_is_one_line(run_dir, tmp_path, capsys, extra, message):
    before = _snapshot(run_dir)
    try:
        code, _, err = _cli(["sample", run_dir, "--out", tmp_path / "x.png", *extra], capsys)
    except SystemExit as exit_:
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2 and err.startswith("flaxdiff") and "error:" in err and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    assert _snapshot(run_dir) == before


def _snapshot(directory):
    """Every file of a directory with its bytes (a run directory must be byte-identical after a refused call)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_sample_defaults_are_the_runs_sample_settings(run_dir, tmp_path, capsys):
    """No sampling flag: the settings saved with the run (sample section), reported in the JSON."""
    saved = json.loads((run_dir / "config.json").read_text())["sample"]
    code, stdout, _ = _cli(["sample", run_dir, "--out", tmp_path / "d.png", "--classes", "0", "--per-class", "1"],
                           capsys)
    report = json.loads(stdout)
    assert code == 0
    assert (report["sampler"], report["steps"], report["grid"], report["guidance_scale"],
            report["guidance_interval"]) == (saved["sampler"], saved["steps"], saved["grid"], saved["guidance"],
                                             saved["guidance_interval"])
    code, stdout, _ = _cli(["sample", run_dir, "--out", tmp_path / "e.png", "--classes", "0", "--per-class", "1",
                            "--sampler", "euler", "--steps", "2", "--guidance", "1"], capsys)
    report = json.loads(stdout)
    assert (report["sampler"], report["steps"], report["guidance_scale"]) == ("euler", 2, 1.0)


def test_unwritable_output_is_refused_before_sampling(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for argv in (["sample", run_dir, "--out", blocker / "grid.png"], ["eval", run_dir, "--out", blocker / "m.json"],
                 ["export", run_dir, blocker / "exported"]):
        code, _, err = _cli(argv, capsys)
        assert code == 2 and "cannot be written" in err and str(blocker) in err and err.count("\n") == 1, err
    assert blocker.read_text() == "not a directory"


def test_missing_checkpoint_dir_is_one_line(tmp_path, capsys):
    code, _, err = _cli(["sample", tmp_path / "nothing", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(["eval", tmp_path / "empty"], capsys)
    assert code == 2 and "holds no checkpoint steps" in err


def test_eval_prints_and_writes_accuracy_and_frechet(run_dir, tmp_path, mnist_classifier_dir, capsys):
    out = tmp_path / "metrics.json"
    code, stdout, _ = _cli(["eval", run_dir, "--per-class", "3", "--steps", "2", "--out", out, "--sampler", "euler",
                            "--classifier-cache", mnist_classifier_dir], capsys)
    assert code == 0
    printed, written = json.loads(stdout), json.loads(out.read_text())
    assert printed["class_accuracy"] == written["class_accuracy"]
    assert 0.0 <= written["class_accuracy"] <= 1.0
    assert written["frechet_distance"] > 0 and written["num_samples"] == 30 and written["step"] == 2
    assert (written["sampler"], written["steps"], written["guidance_scale"]) == ("euler", 2, 3.0)
    # two training steps make noise, not digits: far from the real digits
    assert written["frechet_distance"] > 10
    code, _, err = _cli(["eval", run_dir, "--per-class", "3", "--out", out], capsys)
    assert code == 2 and "already exists" in err


def test_export_writes_safetensors_and_refuses_nonempty(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, _ = _cli(["export", run_dir, out], capsys)
    assert code == 0
    assert {"model.safetensors", "config.json"} <= set(json.loads(stdout)["files"])
    assert json.loads((out / "config.json").read_text())["name"] == "unet"
    code, _, err = _cli(["export", run_dir, out, "--no-ema"], capsys)
    assert code == 2 and "is not empty; pass --overwrite" in err
    code, _, _ = _cli(["export", run_dir, out, "--no-ema", "--overwrite", "--step", "2"], capsys)
    assert code == 0


def test_console_script_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "flaxdiff.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("sample", "eval", "export"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "flaxdiff.cli", "frobnicate"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'frobnicate'" in proc.stderr
