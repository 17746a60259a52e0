"""Config layering (``RunConfig.merge``): defaults < config file < flags field by field, its two rules (another model
preset without options gets its own config; train.steps / train.epochs exclusive), what the user set (``given``),
the one config comparison (``flaxdiff.checkpoints.config_differences``) and the pretrained-run guidance rule fed by
``given``."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402

from flaxdiff import checkpoints  # noqa: E402
from flaxdiff.config import ConfigError, RunConfig  # noqa: E402
from flaxdiff.interop import diffusers_finetune  # noqa: E402
from flaxdiff.training.checkpoint import check_config  # noqa: E402

DEFAULTS = RunConfig()


def test_layers_merge_field_by_field_and_remember_what_was_given():
    file = RunConfig.merge(DEFAULTS, {"train": {"learning_rate": 0.01, "batch_size": 8}, "sample": {"steps": 7}})
    flags = RunConfig.merge(file, {"train": {"batch_size": 4}, "data": {"image_size": 16}})
    expected = DEFAULTS.to_dict()
    expected["train"].update(learning_rate=0.01, batch_size=4)
    expected["sample"]["steps"] = 7
    expected["data"]["image_size"] = 16
    assert flags.to_dict() == expected
    assert file.given == {"train.learning_rate", "train.batch_size", "sample.steps"}
    assert flags.given == file.given | {"data.image_size"}
    # an options object is one setting: a layer replaces it whole
    merged = RunConfig.merge(DEFAULTS, {"diffusion": {"schedule_options": {}}, "model": {"options": {"depth": 2}}})
    assert merged.model.options == {"depth": 2} and merged.given == {"diffusion.schedule_options", "model.options"}


def test_given_is_neither_saved_nor_compared_and_survives_program_changes(tmp_path):
    explicit = RunConfig.merge(DEFAULTS, {"train": {"seed": DEFAULTS.train.seed}})
    assert explicit == DEFAULTS and explicit.given == {"train.seed"} and DEFAULTS.given == frozenset()
    assert explicit.to_dict() == DEFAULTS.to_dict()
    changed = explicit.replace(data={"image_size": 8}).resolved_paths(tmp_path).relative_paths(tmp_path)
    assert changed.data.image_size == 8 and changed.given == {"train.seed"}
    # a saved config read back gave every setting
    assert RunConfig.from_dict(DEFAULTS.to_dict()).given == {f"{section}.{name}" for section, fields in
                                                             DEFAULTS.to_dict().items() for name in fields}


def test_another_preset_without_options_gets_its_own_config():
    unet = RunConfig.merge(DEFAULTS, {"model": {"name": "unet-tiny"}})
    assert (unet.model.name, unet.model.options) == ("unet-tiny", {})
    assert unet.given == {"model.name"}
    tuned = RunConfig.merge(DEFAULTS, {"model": {"name": "unet-tiny", "options": {"base_channels": 8}}})
    assert tuned.model.options == {"base_channels": 8}
    # the base's options belong to the base's preset: kept when the layer names the same preset, dropped otherwise
    assert RunConfig.merge(tuned, {"model": {"name": "unet-tiny"}}).model.options == {"base_channels": 8}
    assert RunConfig.merge(tuned, {"train": {"seed": 3}}).model.options == {"base_channels": 8}
    assert RunConfig.merge(tuned, {"model": {"name": "dit"}}).model.options == {}
    assert RunConfig.merge(DEFAULTS, {"model": {"name": "dit"}}).model.options == DEFAULTS.model.options


def test_steps_and_epochs_are_exclusive():
    epochs = RunConfig.merge(DEFAULTS, {"train": {"epochs": 2}})
    assert (epochs.train.steps, epochs.train.epochs) == (None, 2.0)
    steps = RunConfig.merge(epochs, {"train": {"steps": 5}})
    assert (steps.train.steps, steps.train.epochs) == (5, None)
    assert RunConfig.merge(steps, {"train": {"batch_size": 4}}).train.steps == 5
    # giving both keeps both (one of them null), and the section's own check names a bad pair
    both = RunConfig.merge(steps, {"train": {"steps": None, "epochs": 1.5}})
    assert (both.train.steps, both.train.epochs) == (None, 1.5)
    with pytest.raises(ConfigError, match=r"^give exactly one of train.steps / train.epochs \(got steps=3, "
                                          r"epochs=1.0\)$"):
        RunConfig.merge(DEFAULTS, {"train": {"steps": 3, "epochs": 1}})
    # a null alone clears nothing
    with pytest.raises(ConfigError, match=r"got steps=None, epochs=None"):
        RunConfig.merge(DEFAULTS, {"train": {"steps": None}})


@pytest.mark.parametrize("layer, message", [
    ([1], r"^--config x.json: expected a mapping of sections \['data', "),
    ({"training": {}}, r"^--config x.json: unknown section 'training'; accepted: data, model, diffusion, train"),
    ({"train": 3}, r"^--config x.json: section train: expected a mapping, got 3$"),
    ({"train": {"lr": 1}}, r"^--config x.json: unknown setting train.lr; accepted in train: optimizer, "),
    ({"train": {"learning_rate": "1"}}, r"^--config x.json: train.learning_rate '1' is invalid; accepted: a finite"),
    ({"model": {"name": "unet-tiny", "options": {"bogus": 1}}},
     r"^--config x.json: unknown model.options.bogus for 'unet-tiny'; accepted: "),
])
def test_bad_layers_are_one_line_starting_with_where(layer, message):
    with pytest.raises(ConfigError, match=message) as err:
        RunConfig.merge(DEFAULTS, layer, "--config x.json: ")
    assert "\n" not in str(err.value)


def test_config_differences_compares_runs_by_setting_and_trainer_configs_by_leaf():
    saved = RunConfig.merge(DEFAULTS, {"model": {"options": {"depth": 2}}, "diffusion": {"cond_drop_prob": 0.2},
                                       "data": {"num_classes": 10, "channels": 1}, "train": {"lr_decay": "constant"}})
    current = RunConfig.merge(DEFAULTS, {"model": {"options": {"depth": 3}}, "train": {"steps": 9, "log_every": 3,
                                                                                      "lr_decay": "constant"}})
    # section order, then field; data resolved from the data (null) matches; run-only and (constant LR) steps ignored
    assert checkpoints.config_differences(saved, current) == ["model.options", "diffusion.cond_drop_prob"]
    cosine = RunConfig.merge(DEFAULTS, {"train": {"steps": 9}})
    assert checkpoints.config_differences(DEFAULTS, cosine) == ["train.steps"]
    assert checkpoints.config_differences(current, saved) == ["data.channels", "data.num_classes", "model.options",
                                                              "diffusion.cond_drop_prob"]
    # stored trainer configs: every leaf, sorted; ignore names what may change
    trainer_saved = {"train": {"log_every": 1, "learning_rate": 1.0}, "model": {"features": [8, 16]}, "data": {}}
    trainer_now = {"train": {"log_every": 2, "learning_rate": 2.0}, "model": {"features": (8, 32)}, "extra": 1}
    assert checkpoints.config_differences(trainer_saved, trainer_now) == ["data", "extra", "model.features",
                                                                          "train.learning_rate"]
    assert checkpoints.config_differences(trainer_saved, trainer_now, ignore={"data", "extra"}) == [
        "model.features", "train.learning_rate", "train.log_every"]
    with pytest.raises(ValueError, match=r"in 4 key\(s\): data: checkpoint=\{\} vs now='<missing>'; extra: "
                                         r"checkpoint='<missing>' vs now=1; model.features: checkpoint=\[8, 16\] vs "
                                         r"now=\[8, 32\]; train.learning_rate: checkpoint=1.0 vs now=2.0$"):
        check_config(trainer_saved, trainer_now, "ckpt/3")


def _dit_pipeline(root):
    """A DiTPipeline directory of JSON files only (resolve_config reads no weights): 4x4 latents, VAE factor 2."""
    files = {"model_index.json": {"_class_name": "DiTPipeline"},
             "transformer/config.json": {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2,
                                         "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
                                         "num_layers": 1, "sample_size": 4, "patch_size": 2,
                                         "num_embeds_ada_norm": 10},
             "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
                                                 "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                                 "prediction_type": "epsilon"},
             "vae/config.json": {"block_out_channels": [8, 8]}}
    for name, values in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(values))
    return root


def test_pretrained_runs_guide_everywhere_unless_the_interval_was_given(tmp_path, capsys):
    pipe = str(_dit_pipeline(tmp_path / "dit"))
    layer = {"model": {"pretrained": pipe}, "data": {"image_size": 8}}
    resolved = diffusers_finetune.resolve_config(RunConfig.merge(DEFAULTS, layer))
    assert resolved.sample.guidance_interval is None and resolved.diffusion.time_sampler == "discrete"
    given = RunConfig.merge(DEFAULTS, {**layer, "sample": {"guidance_interval": [0.3, 3.0]}})
    assert diffusers_finetune.resolve_config(given).sample.guidance_interval == [0.3, 3.0]
    # what the user gave survives the program's changes (replace); a config built by the program alone gave nothing
    assert diffusers_finetune.resolve_config(given.replace(train={"seed": 1})).sample.guidance_interval == [0.3, 3.0]
    assert diffusers_finetune.resolve_config(DEFAULTS.replace(**layer)).sample.guidance_interval is None
    # through training.py: a flag or a file gives it
    argv = ["--pretrained", pipe, "--image-size", "8", "--print-config"]
    file = tmp_path / "run.yaml"
    file.write_text("sample: {guidance_interval: [0.5, 2.0]}\n")
    for extra, interval in ([], None), (["--guidance-interval", "[1, 2]"], [1.0, 2.0]), (["--config", str(file)],
                                                                                         [0.5, 2.0]):
        assert training.main([*argv, *extra]) == 0
        assert json.loads(capsys.readouterr().out)["sample"]["guidance_interval"] == interval


def test_a_pretrained_run_refuses_an_architecture(tmp_path, capsys):
    """Another architecture is refused by the model section; a flag giving even the default one by the flags."""
    pipe = str(_dit_pipeline(tmp_path / "dit"))
    for flags, message in ((["--model-config", '{"depth": 1}'], "model.pretrained and model.options conflict: the "
                            "pretrained diffusers denoiser brings its own architecture; leave model.options unset"),
                           (["--model", "dit"], "--model.pretrained and --model.name conflict: the pretrained "
                            "diffusers denoiser brings its own architecture; drop --model.name")):
        with pytest.raises(SystemExit) as exit_info:
            training.main(["--pretrained", pipe, "--image-size", "8", *flags, "--print-config"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"training.py: error: {message}\n"
    with pytest.raises(ConfigError, match=r"^model.pretrained and model.name 'unet-tiny' conflict: "):
        RunConfig.merge(DEFAULTS, {"model": {"pretrained": pipe, "name": "unet-tiny"}})
