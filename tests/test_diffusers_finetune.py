"""Fine-tuning pretrained diffusers denoisers with training.py: tiny random StableDiffusionPipeline and DiTPipeline
directories (torch), datasets encoded with their own VAE / text encoder (``flaxdiff data encode``), a few steps
through ``training.main``; the step-0 loss is diffusers' training loss computed in torch for the same batch, noise,
timesteps and condition dropout; --resume continues bitwise; the export loads in diffusers with our params."""
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # noqa: E402
from test_diffusers_pipeline import SD_SCHEDULER, _randomise, _text_parts, _unet, _vae  # noqa: E402

from flaxdiff import checkpoints, cli  # noqa: E402
from flaxdiff.interop import diffusers_finetune  # noqa: E402

CAPTIONS = ["a red square", "a blue circle", "a green line", "a yellow dot"]
COMMON = ["--image-size", "16", "--batch-size", "4", "--lr", "3e-3", "--lr-decay", "constant", "--warmup-steps", "0",
          "--log-every", "1", "--per-class", "0", "--ema-decay", "0.5"]


def _images(folder, count, seed, classes=None):
    rng = np.random.RandomState(seed)
    for i in range(count):
        where = folder / (f"c{i % classes}" if classes else "")
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (16, 16, 3), np.uint8)).save(where / f"img{i}.png")
        if not classes:
            (where / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])


def _train(*args):
    return training.main([*COMMON, *args])


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def _first_batch_and_keys(argv, workdir):
    """The batch the run's first step sees (the run's own loader) and the step-0 keys the trainer derives:
    key = fold_in(fold_in(split(PRNGKey(seed))[1], step 0), micro-batch 0) -> (dropout, loss) keys; the loss key
    -> (t, eps, drop) keys."""
    config, _ = training.resolve_config([*COMMON, *argv])
    data = training.build_data(config, workdir, config.train.batch_size)
    batch = {k: np.asarray(v) for k, v in next(data.stream).items()}
    rng = jax.random.split(jax.random.PRNGKey(config.train.seed))[1]
    _, loss_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, 0), 0))
    key_t, key_eps, key_drop = jax.random.split(loss_key, 3)
    k = np.asarray(jax.random.randint(key_t, (4,), 1, 1001)) - 1
    eps = np.asarray(jax.random.normal(key_eps, batch["image"].shape, jnp.float32))
    drop = np.asarray(jax.random.bernoulli(key_drop, config.diffusion.cond_drop_prob, (4,)))
    return batch, k, eps, drop


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny v-prediction StableDiffusionPipeline: one-level U-Net (8 channels), the tiny VAE (factor 2) and CLIP."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd")
    text_encoder, tokenizer = _text_parts(root, projection=False)
    unet = _unet(block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",))
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def sd_run(sd_dir, tmp_path_factory):
    """4 steps of SD fine-tuning (checkpoints at 2 and 4) on 4 captioned images encoded with the pipeline's VAE and
    text encoder."""
    tmp = tmp_path_factory.mktemp("sdft")
    _images(tmp / "images", 4, 0)
    assert cli.main(["data", "encode", str(tmp / "images"), str(tmp / "enc"), "--autoencoder", str(sd_dir / "vae"),
                     "--text-encoder", str(sd_dir / "text_encoder"), "--text-dtype", "float32",
                     "--no-progress"]) == 0
    argv = ["--pretrained", str(sd_dir), "--dataset", str(tmp / "enc"), "--cond-drop-prob", "0.5"]
    assert _train(*argv, "--steps", "4", "--checkpoint-every", "2", "--workdir", str(tmp / "run")) == 0
    return tmp, argv


def test_sd_step0_loss_is_diffusers_training_loss_and_overfits(sd_dir, sd_run):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tmp, argv = sd_run
    saved = json.loads((tmp / "run" / "config.json").read_text())
    assert saved["model"]["name"] == "diffusers" and saved["model"]["options"] == {}
    assert (tmp / "run" / saved["model"]["pretrained"]).resolve() == sd_dir.resolve()  # stored relative to the run
    assert saved["diffusion"]["schedule"] == "scaled_linear" and saved["diffusion"]["time_sampler"] == "discrete"
    assert saved["diffusion"]["predictor"] == "v" and saved["diffusion"]["schedule_options"]["beta_end"] == 0.012
    batch, k, eps, drop = _first_batch_and_keys(argv, tmp / "probe")
    assert drop.any() and not drop.all()  # both branches of the condition dropout are exercised
    reference = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        ids = reference.tokenizer([""], padding="max_length", max_length=reference.tokenizer.model_max_length,
                                  return_tensors="pt").input_ids
        empty = reference.text_encoder(ids)[0]
        text = torch.from_numpy(batch["text"])
        text[torch.from_numpy(drop)] = empty
        timesteps = torch.from_numpy(k)
        noise_scheduler = DDPMScheduler.from_config(reference.scheduler.config)  # as diffusers' training scripts
        noisy = noise_scheduler.add_noise(_nchw(batch["image"]), _nchw(eps), timesteps)
        pred = reference.unet(noisy, timesteps, text).sample
        target = noise_scheduler.get_velocity(_nchw(batch["image"]), _nchw(eps), timesteps)
        expected = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean").item()
    losses = _losses(tmp / "run")
    assert losses[1] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # the fine-tuned params fit the 4 examples better: the same fixed (t, eps) loss before and after
    from flaxdiff import losses as losses_lib
    from flaxdiff.interop.diffusers_scheduler import DiffusersScheduler
    from flaxdiff.interop.diffusers_unet import load_diffusers_unet

    module, pretrained, _ = load_diffusers_unet(sd_dir / "unet")
    scheduler = DiffusersScheduler.from_pretrained(sd_dir / "scheduler")
    model = diffusers_finetune.FineTuneDenoiser(module)
    x0 = jnp.tile(jnp.asarray(batch["image"]), (4, 1, 1, 1))  # each example at 4 (t, eps) draws
    cond = {"text": jnp.tile(jnp.asarray(batch["text"]), (4, 1, 1))}

    @jax.jit
    def fixed_loss(params):
        return losses_lib.diffusion_loss(lambda p, x, c, y: model.apply({"params": p}, x, c, y), params, x0, cond,
                                         jax.random.key(9), scheduler.schedule, scheduler.predictor,
                                         losses_lib.UniformWeighting(), losses_lib.DiscreteTime())[0]

    tuned = checkpoints.load_params(tmp / "run" / "checkpoints", 4, ema=False)
    assert float(fixed_loss(tuned)) < 0.9 * float(fixed_loss(pretrained))


def test_sd_resume_is_bitwise(sd_run):
    tmp, argv = sd_run
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    (resumed / "metrics.jsonl").unlink()
    assert _train(*argv, "--steps", "4", "--checkpoint-every", "2", "--workdir", str(resumed), "--resume") == 0
    for ema in (False, True):
        ours = checkpoints.load_params(resumed / "checkpoints", 4, ema=ema)
        reference = checkpoints.load_params(tmp / "run" / "checkpoints", 4, ema=ema)
        assert jax.tree.all(jax.tree.map(np.array_equal, ours, reference))
    assert _losses(resumed)[4] == _losses(tmp / "run")[4]


def test_sd_export_loads_in_diffusers_and_samples(sd_dir, sd_run, capsys):
    from diffusers import StableDiffusionPipeline

    from flaxdiff.interop import diffusers_unet

    tmp, _ = sd_run
    out = tmp / "exported"
    assert cli.main(["export", str(tmp / "run"), str(out)]) == 0
    capsys.readouterr()
    ema = json.loads((tmp / "run" / "config.json").read_text())["sample"]["ema"]
    tuned = checkpoints.load_params(tmp / "run" / "checkpoints", ema=ema)
    reference = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    _, _, config = diffusers_unet.load_diffusers_unet(sd_dir / "unet")
    expected = diffusers_unet.to_torch_state_dict(tuned, config)
    state = reference.unet.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key].numpy(), value)
    original = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    assert not torch.equal(original.unet.conv_in.weight, reference.unet.conv_in.weight)
    # `flaxdiff sample RUN` (the run's pipeline with its EMA params) == `flaxdiff sample --diffusers EXPORTED`
    flags = ["--prompts", "a red square", "--steps", "3", "--sampler", "ddim", "--grid", "karras", "--guidance", "4",
             "--seed", "2"]
    assert cli.main(["sample", str(tmp / "run"), "--out", str(tmp / "a.png"), *flags]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert cli.main(["sample", "--diffusers", str(out), "--out", str(tmp / "b.png"), *flags]) == 0
    capsys.readouterr()
    first, second = (np.asarray(Image.open(tmp / name)) for name in ("a.png", "b.png"))
    assert np.array_equal(first, second) and first.std() > 1


def test_dit_fine_tuning_loss_and_export(tmp_path):
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = _randomise(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                   out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                                   num_embeds_ada_norm=1000), 3)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(),
                       scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"))
    pipe.save_pretrained(tmp_path / "dit")
    _images(tmp_path / "images", 4, 1, classes=2)
    assert cli.main(["data", "encode", str(tmp_path / "images"), str(tmp_path / "enc"), "--autoencoder",
                     str(tmp_path / "dit" / "vae"), "--no-progress"]) == 0
    argv = ["--pretrained", str(tmp_path / "dit"), "--dataset", str(tmp_path / "enc"), "--cond-drop-prob", "0.5"]
    assert _train(*argv, "--steps", "2", "--workdir", str(tmp_path / "run")) == 0
    batch, k, eps, drop = _first_batch_and_keys(argv, tmp_path / "probe")
    labels = torch.from_numpy(np.where(drop, 1000, batch["label"]).astype(np.int64))
    with torch.no_grad():
        timesteps = torch.from_numpy(k)
        # diffusers trains with DDPMScheduler's add_noise on the pipeline scheduler's betas
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        noisy = noise_scheduler.add_noise(_nchw(batch["image"]), _nchw(eps), timesteps)
        pred = transformer(noisy, timestep=timesteps, class_labels=labels).sample[:, :4]
        expected = torch.nn.functional.mse_loss(pred, _nchw(eps)).item()
    assert _losses(tmp_path / "run")[1] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = DiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer")
    from flaxdiff.interop import diffusers_dit

    _, _, config = diffusers_dit.load_diffusers_dit(tmp_path / "dit" / "transformer")
    ema = json.loads((tmp_path / "run" / "config.json").read_text())["sample"]["ema"]
    tuned = diffusers_dit.to_torch_state_dict(checkpoints.load_params(tmp_path / "run" / "checkpoints", ema=ema),
                                              config)
    for key, value in exported.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), tuned[key])


def test_bad_input_is_one_line(sd_dir, tmp_path, capsys):
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    cases = [
        (["--pretrained", str(tmp_path)], "is not a diffusers pipeline directory (no model_index.json)"),
        (["--pretrained", str(sdxl)], "is a StableDiffusionXLPipeline; fine-tuning accepts StableDiffusionPipeline"),
        (["--pretrained", str(sd_dir), "--image-size", "17"], "data.image_size 17 is not divisible by 2 (VAE factor 2"),
        (["--pretrained", str(sd_dir), "--model", "dit-s"], "model.pretrained and model.name 'dit-s' conflict"),
        (["--pretrained", str(sd_dir), "--model-config", "{}"], "--model.pretrained and --model.options conflict"),
        (["--pretrained", str(sd_dir), "--schedule", "cosine"], "diffusion.schedule 'cosine' conflicts"),
        (["--pretrained", str(sd_dir), "--task", "autoencoder"], "task.name 'autoencoder' does not take it"),
        (["--pretrained", str(sd_dir), "--dataset", "digits"], "needs a dataset of latents encoded with the "
                                                               "pipeline's VAE"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            code = training.main([*COMMON, *args, "--workdir", str(tmp_path / "w")])
            raise SystemExit(code)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
