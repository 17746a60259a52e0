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
from flaxdiff.config import ALIASES, RunConfig  # noqa: E402

# the one-level unet-tiny, like the run-directory tests (these runs test the script, not the architecture)
TINY_OPTIONS = {"channel_mult": [1]}
TINY = ["--dataset", "digits", "--image-size", "16", "--model", "unet-tiny", "--model-config", json.dumps(TINY_OPTIONS),
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
    # the checkpoint stores exactly the run config, resolved (classes, channels, model inputs) and written to
    # config.json
    assert saved == json.loads((workdir / "config.json").read_text())
    assert set(saved) == {"data", "model", "diffusion", "train", "sample", "task"}
    assert saved["data"]["num_classes"] == 10 and saved["data"]["dataset"] == "digits"
    assert saved["data"]["channels"] == 1
    assert saved["model"]["options"] == {**TINY_OPTIONS, "in_channels": 1, "num_classes": 10}
    assert saved["diffusion"]["cond_drop_prob"] == 0.1 and saved["diffusion"]["schedule"] == "rectified_flow"
    assert saved["sample"]["sampler"] == "euler" and saved["sample"]["steps"] == 2 and saved["train"]["steps"] == 3
    # one row per class (10), two images per row, 16 px each
    assert Image.open(workdir / "samples.png").size == (2 * 16, 10 * 16)
    assert _metric_steps(workdir) == [1, 2, 3]
    assert "_CHECKPOINT_METADATA" not in proc.stderr and "Metadata file does not exist" not in proc.stderr


def test_saved_config_feeds_back_to_the_same_resolved_config(run_dir, capsys, tmp_path):
    workdir, _ = run_dir
    assert training.main(["--config", str(workdir / "config.json"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((workdir / "config.json").read_text())
    # a copy elsewhere resolves its relative paths against its own directory
    copy = tmp_path / "elsewhere" / "config.json"
    copy.parent.mkdir()
    copy.write_text((workdir / "config.json").read_text())
    assert training.main(["--config", str(copy), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == printed


def test_existing_checkpoints_need_resume_or_overwrite(run_dir):
    workdir, _ = run_dir
    proc = _run(*TINY, "--steps", "4", "--workdir", str(workdir), check=False)
    assert proc.returncode == 2
    assert "already holds checkpoints (steps [2, 3]); pass --resume" in proc.stderr.strip().splitlines()[-1]


def test_resume_continues_from_the_checkpoint(run_dir):
    workdir, _ = run_dir
    proc = _run(*TINY, "--steps", "5", "--checkpoint-every", "2", "--workdir", str(workdir), "--resume",
                "--preview-per-class", "0")  # the first run's preview grid is enough
    assert "restored step 3" in proc.stderr
    assert _steps(workdir)[-1] == 5
    # steps 1-3 from the first run, then 4-5: nothing repeated, nothing restarted at 1
    assert _metric_steps(workdir) == [1, 2, 3, 4, 5]


def test_resume_with_changed_model_fails_clearly(run_dir):
    workdir, _ = run_dir
    wider = json.dumps({**TINY_OPTIONS, "base_channels": 8})
    changed = [a if a != json.dumps(TINY_OPTIONS) else wider for a in TINY]
    assert changed != TINY
    proc = _run(*changed, "--steps", "6", "--workdir", str(workdir), "--resume", check=False)
    assert proc.returncode == 2
    assert "model.options" in proc.stderr.strip().splitlines()[-1]


def test_print_config_round_trips_json_and_yaml(tmp_path, capsys):
    assert training.main([*TINY, "--steps", "7", "--shift", "3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["diffusion"]["shift"] == 3.0
    assert printed["model"]["options"] == TINY_OPTIONS and printed["train"]["epochs"] is None
    assert set(printed) == set(RunConfig().to_dict())
    path = tmp_path / "run.json"
    path.write_text(json.dumps(printed))
    assert training.main(["--config", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == printed
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(yaml.safe_dump(printed))
    assert training.main(["--config", str(yaml_path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == printed
    # flags override the file; --epochs replaces the file's steps; dotted names and aliases set the same setting
    assert training.main(["--config", str(path), "--epochs", "2", "--train.batch_size", "32", "--print-config"]) == 0
    overridden = json.loads(capsys.readouterr().out)
    assert overridden["train"]["epochs"] == 2.0 and overridden["train"]["steps"] is None
    assert overridden["train"]["batch_size"] == 32
    for section in ("data", "model", "diffusion", "sample", "task"):
        assert overridden[section] == printed[section]


def test_every_setting_has_a_dotted_flag_and_aliases_name_real_settings(capsys):
    defaults = RunConfig().to_dict()
    parser = training.build_parser()
    options = set(parser._option_string_actions)
    for section, fields in defaults.items():
        for name in fields:
            assert f"--{section}.{name}" in options
    for alias, dotted in ALIASES.items():
        section, name = dotted.split(".")
        assert name in defaults[section] and f"--{alias}" in options
    assert training.main(["--train.learning-rate", "0.01", "--lr-decay", "linear", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["learning_rate"] == 0.01 and printed["train"]["lr_decay"] == "linear"


def test_defaults_are_the_mnist_main_job(capsys):
    assert training.main(["--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["data"]["dataset"], config["data"]["image_size"], config["diffusion"]["schedule"],
            config["diffusion"]["predictor"], config["diffusion"]["time_sampler"]) == \
        ("mnist", 28, "rectified_flow", "velocity", "logit_normal")
    assert config["diffusion"]["cond_drop_prob"] == 0.1 and config["train"]["ema_decay"] > 0
    # the main job's sampling settings travel with its checkpoints (docs/main_job.md measured them)
    assert (config["sample"]["sampler"], config["sample"]["steps"], config["sample"]["guidance"],
            config["sample"]["guidance_interval"]) == ("dpmpp_2m", 20, 3.0, [0.3, 3.0])


def test_another_preset_without_options_gets_its_own_config(tmp_path, capsys):
    """The default options belong to the default preset: naming another preset (flag or file) without options
    gives that preset's own config, and options given with it are kept."""
    assert training.main(["--model", "unet-small", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == {"name": "unet-small", "options": {}, "pretrained": None}
    file = tmp_path / "run.yaml"
    file.write_text("model: {name: unet-tiny}\n")
    assert training.main(["--config", str(file), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["options"] == {}
    assert training.main(["--config", str(file), "--model-config", '{"base_channels": 8}', "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["options"] == {"base_channels": 8}
    assert training.main(["--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["options"]["patch_size"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--schedule", "nope"], "diffusion.schedule 'nope' is invalid; accepted: cosine"),
    (["--time-sampler", "nope"], "logit_normal"),
    (["--preview-sampler", "nope"], "sample.sampler 'nope' is invalid; accepted:"),
    (["--steps", "3", "--epochs", "1"], "--steps and --epochs conflict"),
    (["--resume", "--overwrite"], "--resume and --overwrite conflict"),
    (["--batch-size", "10", "--grad-accum-steps", "3"],
     "train.batch_size 10 is not divisible by train.grad_accum_steps 3"),
    (["--schedule", "cosine", "--shift", "2"], "diffusion.shift applies to the rectified_flow schedule"),
    (["--model-config", "[1]"], "accepted: a JSON object"),
    (["--model", "autoencoder"], "a diffusion model preset"),
    (["--lr", "nan"], "train.learning_rate nan is invalid; accepted: a finite number > 0"),
    (["--lr", "inf"], "train.learning_rate inf is invalid"),
    (["--lr", "0"], "train.learning_rate 0.0 is invalid; accepted: a finite number > 0"),
    (["--lr", "fast"], "train.learning_rate 'fast' is invalid; accepted: a finite number"),
    (["--steps", "0"], "train.steps 0 is invalid; accepted: an integer >= 1"),
    (["--steps", "-3"], "train.steps -3 is invalid"),
    (["--batch-size", "0"], "train.batch_size 0 is invalid; accepted: an integer >= 1"),
    (["--image-size", "0"], "data.image_size 0 is invalid"),
    (["--checkpoint-every", "0"], "train.checkpoint_every 0 is invalid"),
    (["--ema-decay", "1"], "train.ema_decay 1.0 is invalid"),
    (["--cond-drop-prob", "1.5"], "diffusion.cond_drop_prob 1.5 is invalid"),
    (["--guidance", "-2"], "sample.guidance -2.0 is invalid; accepted: a finite number >= 0"),
    (["--guidance-interval", "[3, 1]"], "sample.guidance_interval [3, 1] is invalid"),
    (["--sample-steps", "0"], "sample.steps 0 is invalid"),
    (["--precision", "float16"], "train.compute_dtype 'float16' is invalid; accepted: float32, bfloat16"),
    (["--channels", "2"], "data.channels 2 is invalid; accepted: 1, 3"),
    (["--random-flip", "maybe"], "data.random_flip 'maybe' is invalid; accepted: true or false"),
    (["--task", "reflow"], "task.name reflow needs task.reflow_from"),
    (["--model", "unet-small", "--model-config", '{"base_channels": "wide"}'],
     "model.options.base_channels 'wide' is invalid; accepted: an integer"),
    (["--model-config", '{"hidden_sise": 8}'], "unknown model.options.hidden_sise for 'dit'; accepted:"),
    (["--model", "unet-small", "--model-config", '{"base_chanels": 8}'],
     "unknown model.options.base_chanels for 'unet-small'; accepted:"),
    (["--seed", "-1"], "train.seed -1 is invalid; accepted: an integer >= 0"),
    (["--steps", "1.5"], "train.steps '1.5' is invalid; accepted: an integer"),
    (["--num-classes", "-1"], "data.num_classes -1 is invalid"),
    (["--config", "/"], "--config /: no such file"),
])
def test_bad_flags_fail_with_the_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        training.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("training.py: error:") and message in err


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", json.dumps({"train": {"steps": 3, "learning_rat": 1e-3}}), "unknown setting train.learning_rat"),
    ("flat.json", json.dumps({"steps": 3}), "unknown section 'steps'"),
    ("str.json", json.dumps({"train": {"learning_rate": "0.001"}}), "train.learning_rate '0.001' is invalid"),
    ("nan.json", '{"train": {"learning_rate": NaN}}', "NaN is not a finite number"),
    ("syntax.json", '{"train": {"steps": 3,,}}', "JSON syntax error at line 1"),
    ("syntax.yaml", "train:\n  steps: [3\n  lr: 2\n", "YAML syntax error at line"),
    ("list.yaml", "- 1\n- 2\n", "expected a mapping of sections"),
    ("count.yaml", "train:\n  steps: 0\n", "train.steps 0 is invalid"),
    ("bool.yaml", "data:\n  random_flip: 3\n", "data.random_flip 3 is invalid; accepted: true or false"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        training.main(["--config", str(path), "--print-config"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err and str(path) in err


def test_unknown_dataset_is_one_clear_line(tmp_path):
    proc = _run("--dataset", str(tmp_path / "missing.npz"), "--steps", "1", "--workdir", str(tmp_path / "w"),
                check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("training.py: error:") and "missing.npz" in last


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.*")), ids=lambda p: p.name)
def test_shipped_config_files_load(path, capsys):
    assert training.main(["--config", str(path), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(RunConfig().to_dict())
