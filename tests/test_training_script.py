"""training.py end to end: a tiny run writes a checkpoint and a grid, --resume continues it, --print-config
round-trips through --config (JSON and YAML), and bad flags fail with one line naming them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402

TINY = ["--dataset", "digits", "--image-size", "16", "--model", "unet-tiny", "--model-config", "{}",
        "--batch-size", "16", "--lr-decay", "constant", "--warmup-steps", "0", "--log-every", "1",
        "--preview-per-class", "2", "--preview-steps", "2", "--preview-sampler", "euler"]


def _run(*args, check=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "training.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    proc = _run(*TINY, "--steps", "3", "--checkpoint-every", "2", "--workdir", str(workdir))
    return workdir, proc


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _metric_steps(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "train/loss" in json.loads(line)]


def test_run_writes_checkpoint_grid_and_config(run_dir):
    workdir, proc = run_dir
    assert _steps(workdir) == [2, 3]
    saved = json.loads((workdir / "checkpoints" / "3" / "config" / "metadata").read_text())
    assert saved["data"]["num_classes"] == 10 and saved["data"]["dataset"] == "digits"
    assert saved["data"]["shapes"]["image"]["shape"] == [16, 16, 1]
    assert saved["train"]["null_cond"] == {"label": 10} and saved["train"]["cond_drop_prob"] == 0.1
    assert saved["schedule"]["name"] == "rectified_flow" and saved["predictor"]["name"] == "velocity"
    assert saved["time_sampler"]["name"] == "logit_normal"
    # one row per class (10), two images per row, 16 px each
    assert Image.open(workdir / "samples.png").size == (2 * 16, 10 * 16)
    assert _metric_steps(workdir) == [1, 2, 3]
    run_config = json.loads((workdir / "run_config.json").read_text())
    assert run_config["model"] == "unet-tiny" and run_config["steps"] == 3


def test_existing_checkpoints_need_resume_or_overwrite(run_dir):
    workdir, _ = run_dir
    proc = _run(*TINY, "--steps", "4", "--workdir", str(workdir), check=False)
    assert proc.returncode == 2
    assert "already holds checkpoints; pass --resume" in proc.stderr.strip().splitlines()[-1]


def test_resume_continues_from_the_checkpoint(run_dir):
    workdir, _ = run_dir
    proc = _run(*TINY, "--steps", "5", "--checkpoint-every", "2", "--workdir", str(workdir), "--resume")
    assert "restored step 3" in proc.stderr
    assert _steps(workdir)[-1] == 5
    # steps 1-3 from the first run, then 4-5: nothing repeated, nothing restarted at 1
    assert _metric_steps(workdir) == [1, 2, 3, 4, 5]


def test_resume_with_changed_model_fails_clearly(run_dir):
    workdir, _ = run_dir
    changed = [a if a != "{}" else '{"base_channels": 8}' for a in TINY]
    proc = _run(*changed, "--steps", "6", "--workdir", str(workdir), "--resume", check=False)
    assert proc.returncode == 2
    assert "model.base_channels" in proc.stderr.strip().splitlines()[-1]


def test_print_config_round_trips_json_and_yaml(tmp_path, capsys):
    assert training.main([*TINY, "--steps", "7", "--shift", "3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["shift"] == 3.0 and printed["model_config"] == {}
    assert printed["epochs"] is None and set(printed) == set(training.DEFAULTS)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(printed))
    assert training.main(["--config", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == printed
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(yaml.safe_dump(printed))
    assert training.main(["--config", str(yaml_path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == printed
    # flags override the file; --epochs replaces the file's steps
    assert training.main(["--config", str(path), "--epochs", "2", "--batch-size", "32", "--print-config"]) == 0
    overridden = json.loads(capsys.readouterr().out)
    assert overridden["epochs"] == 2.0 and overridden["steps"] is None and overridden["batch_size"] == 32
    assert {k: v for k, v in overridden.items() if k not in ("epochs", "steps", "batch_size")} == \
        {k: v for k, v in printed.items() if k not in ("epochs", "steps", "batch_size")}


def test_defaults_are_the_mnist_main_job(capsys):
    assert training.main(["--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["dataset"], config["image_size"], config["schedule"], config["predictor"],
            config["time_sampler"]) == ("mnist", 32, "rectified_flow", "velocity", "logit_normal")
    assert config["cond_drop_prob"] == 0.1 and config["ema_decay"] > 0 and config["grad_accum_steps"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--schedule", "nope"], "--schedule 'nope' is unknown; accepted: cosine"),
    (["--time-sampler", "nope"], "logit_normal"),
    (["--preview-sampler", "nope"], "unipc"),
    (["--steps", "3", "--epochs", "1"], "--steps and --epochs conflict"),
    (["--resume", "--overwrite"], "--resume and --overwrite conflict"),
    (["--batch-size", "10", "--grad-accum-steps", "3"], "--batch-size 10 is not divisible by --grad-accum-steps 3"),
    (["--schedule", "cosine", "--shift", "2"], "--shift applies to the rectified_flow schedule"),
    (["--model-config", "[1]"], "expected a JSON object"),
    (["--model", "autoencoder"], "not a diffusion model"),
])
def test_bad_flags_fail_with_the_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        training.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("training.py: error:") and message in err


def test_bad_config_file_keys_are_named(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"steps": 3, "learning_rat": 1e-3}))
    with pytest.raises(SystemExit):
        training.main(["--config", str(path), "--print-config"])
    assert "unknown settings ['learning_rat']" in capsys.readouterr().err


def test_unknown_dataset_is_one_clear_line(tmp_path):
    proc = _run("--dataset", str(tmp_path / "missing.npz"), "--steps", "1", "--workdir", str(tmp_path / "w"),
                check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("training.py: error:") and "missing.npz" in last
