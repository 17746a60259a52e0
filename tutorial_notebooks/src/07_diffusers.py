# %% [markdown]
# # 7. Diffusers checkpoints in JAX: load, swap samplers, check against diffusers, fine-tune
#
# A diffusers pipeline directory (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
# `scheduler/`) is weights plus configuration. flaxdiff reads the weights into Flax Linen modules through explicit
# key maps and reads `scheduler_config.json` as configuration of its own pieces: a noise schedule
# $\bar\alpha_k$, a predictor (epsilon / v / x0) and a sampler on a timestep grid. So a Stable Diffusion checkpoint
# runs with every flaxdiff sampler and grid, and fine-tunes with flaxdiff's trainer.
#
# Nothing is downloaded here: the notebook builds a *tiny random* Stable Diffusion pipeline in torch and saves it,
# exactly as `huggingface-cli download` would leave a real one (docs/diffusers.md has the fetch commands). Its
# images are meaningless patterns; what the notebook shows is the machinery, and that it matches diffusers.
#
# **Fast mode:** `FLAXDIFF_TUTORIAL_FAST=1` (fewer sampling and training steps).

# %%
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from flaxdiff.pipeline import Pipeline
from tutorial_utils import pick, setup_plots, show_grids

setup_plots()
torch.manual_seed(0)
torch.set_num_threads(1)   # toy models: threads only add overhead
work = Path(tempfile.mkdtemp(prefix="flaxdiff_07_"))

# %% [markdown]
# ## A tiny Stable Diffusion pipeline, made in torch
#
# The same classes as SD 1.5 at toy width: a CLIP text encoder (2 layers, width 32) with a byte-level tokenizer,
# a `UNet2DConditionModel` with cross-attention (one level of 16 channels), the KL `AutoencoderKL` (downsampling by 2) and
# SD's `DDIMScheduler` configuration (`scaled_linear` betas 0.00085 .. 0.012, epsilon prediction, leading
# spacing with `steps_offset=1`). Weights are perturbed away from their init so that every layer matters. The VAE's
# `scaling_factor` is set to 1 / std of the latents of the images we fine-tune on below (flat colours), the way
# SD's 0.18215 was measured (notebook 05), so that the diffusion sees unit-scale data.

# %%
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel


def perturbed(module, scale=0.05):
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn_like(param))
    return module.eval()


# CLIP's byte-level vocabulary without merges: every byte is a token (with and without the end-of-word mark)
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
vocab = {symbol: i for i, symbol in enumerate(alphabet + [s + "</w>" for s in alphabet]
                                              + ["<|startoftext|>", "<|endoftext|>"])}
(work / "words").mkdir()
(work / "words" / "vocab.json").write_text(json.dumps(vocab))
(work / "words" / "merges.txt").write_text("#version: 0.2\n")
tokenizer = CLIPTokenizer(str(work / "words" / "vocab.json"), str(work / "words" / "merges.txt"),
                          model_max_length=16, pad_token="<|endoftext|>")
text_encoder = perturbed(CLIPTextModel(CLIPTextConfig(
    vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="gelu", bos_token_id=vocab["<|startoftext|>"],
    eos_token_id=vocab["<|endoftext|>"], pad_token_id=1)))
unet = perturbed(UNet2DConditionModel(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
vae = perturbed(AutoencoderKL(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
    layers_per_block=1, sample_size=16))
scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 30)}
flat = np.stack([np.broadcast_to((np.asarray(rgb, np.float32) / 127.5 - 1)[:, None, None], (3, 16, 16))
                 for rgb in colours.values()])
with torch.no_grad():
    latent_std = float(vae.encode(torch.from_numpy(flat)).latent_dist.mean.std())
vae.register_to_config(scaling_factor=1.0 / latent_std)
reference = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                    scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
reference.set_progress_bar_config(disable=True)
sd_dir = work / "tiny-sd"
reference.save_pretrained(sd_dir)
print(sorted(p.name for p in sd_dir.iterdir()))

# %% [markdown]
# ## Load it: `Pipeline.from_diffusers`
#
# `Pipeline.from_diffusers(path)` returns a `DiffusersPipeline`: the Flax U-Net, VAE and text encoder plus the
# scheduler mapping. `DDIMScheduler` becomes flaxdiff's `ddim` sampler on diffusers' leading timesteps, the betas a
# `DiscreteVPSchedule("scaled_linear")` (with $\bar\alpha_k$ at $t = (k+1)/T$), `prediction_type` the predictor.

# %%
pipe = Pipeline.from_diffusers(sd_dir)
print(f"kind {pipe.kind}; schedule {pipe.scheduler.schedule}; predictor {pipe.scheduler.predictor.name}; "
      f"sampler {pipe.scheduler.sampler}; latents {pipe.latent_shape()}")
prompts = ["a red square", "a blue circle", "a green line", "a yellow dot"]
images = pipe.generate(prompts, steps=20, guidance_scale=5.0, seed=0)
print(images.shape, images.dtype, f"[{images.min():.2f}, {images.max():.2f}]")

# %% [markdown]
# ## Any sampler, any grid
#
# The denoiser $D(x, s)$ is built once from the U-Net, the predictor and the schedule (levels $s = \sigma/\alpha$,
# the network sees $x_t = \tilde x / \sqrt{1 + s^2}$ and diffusers' timestep of $s$), so every registered sampler
# and grid runs on it. With the same seeds the samplers solve the same probability-flow ODE, so they differ only
# by discretisation error. Below: a 100-step DPM-Solver++(2M) solution of the unguided ODE as the reference, and
# the max abs latent error of a few samplers / grids at a few step counts, relative to the reference's max.

# %%
seeds = [0, 1, 2, 3]
options = dict(guidance_scale=1.0, seeds=seeds, output="latents")
exact = pipe.generate(prompts, sampler="dpmpp_2m", grid="karras", steps=pick(100, 20), **options)
choices = pick([("ddim", None), ("euler", "karras"), ("heun", "karras"), ("dpmpp_2m", "karras"),
                ("dpmpp_2m", "logsnr_uniform")], [("ddim", None)])
step_counts = pick([5, 10, 20], [5])
results = {}
for sampler, grid in choices:
    for steps in step_counts:
        results[(sampler, grid or "scheduler's", steps)] = pipe.generate(prompts, sampler=sampler, grid=grid,
                                                                         steps=steps, **options)
for (sampler, grid, steps), latents in results.items():
    error = np.abs(latents - exact).max() / np.abs(exact).max()
    print(f"{sampler:9s} grid {grid:15s} {steps:3d} steps: max |latents - reference| / max |reference| = {error:.4f}")

# %%
panels = {f"{sampler} / {grid}, {steps} steps": pipe.decode(latents) * 2 - 1
          for (sampler, grid, steps), latents in results.items() if steps == step_counts[0]}
show_grids(panels, columns=2, width=2.4)

# %% [markdown]
# ## The same numbers as diffusers
#
# diffusers' own `StableDiffusionPipeline` with its `DDIMScheduler`, from the same initial latents, must give the
# same images: the scheduler's update *is* flaxdiff's DDIM step on the mapped grid. Swapping the scheduler class
# to `EulerDiscreteScheduler` (saved as a second directory) maps onto flaxdiff's `euler` sampler.

# %%
from diffusers import EulerDiscreteScheduler

latents = np.random.RandomState(0).randn(len(prompts), 4, 8, 8).astype(np.float32)   # diffusers' NCHW
steps = pick(20, 6)
for name, scheduler_cls in (("DDIM", DDIMScheduler), ("Euler", EulerDiscreteScheduler)):
    reference.scheduler = scheduler_cls.from_config(reference.scheduler.config)
    reference.save_pretrained(work / f"tiny-sd-{name}")
    with torch.no_grad():
        theirs = reference(prompts, num_inference_steps=steps, guidance_scale=5.0,
                           latents=torch.from_numpy(latents), output_type="np").images
    ours = Pipeline.from_diffusers(work / f"tiny-sd-{name}").generate(
        prompts, steps=steps, guidance_scale=5.0, latents=latents.transpose(0, 2, 3, 1))
    print(f"{name:5s} ({Pipeline.from_diffusers(work / f'tiny-sd-{name}').scheduler.sampler}): "
          f"max |flaxdiff - diffusers| = {np.abs(ours - theirs).max():.2e} over images in [0, 1]")

# %% [markdown]
# ## Fine-tuning with `training.py`
#
# Fine-tuning starts `training.py` from the pipeline's U-Net (`--pretrained DIR`, the run config's
# `model.pretrained`) on a dataset encoded **with the pipeline's own VAE and text encoder** by `flaxdiff data
# encode`: the latents are $z \cdot$ `scaling_factor`, the captions' CLIP states are stored once, and the text
# encoder is never trained. The loss is diffusers' training loss, filled in from `scheduler_config.json`:
#
# $$\mathcal L = \mathbb E_{k \sim U\{0..T-1\},\,\epsilon}\,\big\|F_\theta(\sqrt{\bar\alpha_k}\,z +
# \sqrt{1-\bar\alpha_k}\,\epsilon,\ k,\ c) - \text{target}\big\|^2,$$
#
# with target $\epsilon$ (or $v$ for v-prediction checkpoints) and the caption $c$ replaced by the "" prompt with
# probability `cond_drop_prob` (for classifier-free guidance). Our data: 16 flat colour images with captions.

# %%
from PIL import Image

from flaxdiff import cli

(work / "images").mkdir()
for i in range(16):
    name = list(colours)[i % 4]
    Image.new("RGB", (16, 16), colours[name]).save(work / "images" / f"img{i}.png")
    (work / "images" / f"img{i}.txt").write_text(f"a {name} image")
# `flaxdiff data encode IMAGES OUT --autoencoder SD/vae --text-encoder SD/text_encoder` (its JSON report kept quiet)
with contextlib.redirect_stdout(io.StringIO()):
    assert cli.main(["data", "encode", str(work / "images"), str(work / "encoded"), "--autoencoder",
                     str(sd_dir / "vae"), "--text-encoder", str(sd_dir / "text_encoder"), "--text-dtype", "float32",
                     "--no-progress"]) == 0
print(json.loads((work / "encoded" / "manifest.json").read_text())["latent_shape"], "latents per image")

# %%
sys.path.insert(0, str(Path.cwd().parent))        # training.py lives at the repository root
import training  # noqa: E402

train_steps = pick(200, 4)
# the command line: python training.py --pretrained SD --dataset OUT --image-size 16 --steps N ...
argv = ["--pretrained", str(sd_dir), "--dataset", str(work / "encoded"), "--image-size", "16",
        "--batch-size", "8", "--steps", str(train_steps), "--lr", "2e-3", "--warmup-steps", "0",
        "--lr-decay", "constant", "--ema-decay", "0", "--log-every", "1", "--checkpoint-every", str(train_steps),
        "--per-class", "0", "--workdir", str(work / "run")]
assert training.main(argv) == 0
rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
loss = [row["train/loss"] for row in rows if "train/loss" in row]
print("run config diffusion section:", json.loads((work / "run" / "config.json").read_text())["diffusion"])
plt.figure(figsize=(4, 2.2))
plt.plot(loss, lw=0.5)
plt.plot(np.convolve(loss, np.ones(10) / 10, mode="valid"))
plt.xlabel("step")
plt.ylabel("loss (diffusers' training loss)")
plt.show()

# %% [markdown]
# ## Sample the fine-tuned model, export it back to diffusers
#
# `flaxdiff sample RUN --prompts ...` draws from the pipeline with the run's params;
# `flaxdiff export RUN OUT` writes a diffusers directory (the original VAE, text encoder, tokenizer and scheduler,
# the fine-tuned U-Net as safetensors) that diffusers' `from_pretrained` loads, and that gives the same images.
#
# The VAE is random too, so a flat colour does not come back flat: what fine-tuning should reproduce is the
# training latents decoded by this VAE (left), not the original images. A few hundred CPU steps move the
# samples only part of the way; the per-noise-level error of the prediction $\hat x_0$ shows what was learnt.

# %%
from flaxdiff.data.arrayrecord import ArrayRecordSource
from flaxdiff.interop import diffusers_finetune

tuned = diffusers_finetune.load_finetuned(work / "run")
test_prompts = ["a red image", "a blue image", "a green image", "a yellow image"]
settings = dict(steps=20, guidance_scale=3.0, seeds=seeds)
encoded = ArrayRecordSource(work / "encoded")        # stores (z + 1) / 2 of the scaled latents z
data_latents = np.stack([2.0 * encoded[i]["image"] - 1.0 for i in range(4)])
show_grids({"training latents, decoded": pipe.decode(data_latents) * 2 - 1,
            "pretrained (random)": pipe.generate(test_prompts, **settings) * 2 - 1,
            f"after {train_steps} fine-tuning steps": tuned.generate(test_prompts, **settings) * 2 - 1},
           columns=4, width=3.0)

with contextlib.redirect_stdout(io.StringIO()):
    assert cli.main(["export", str(work / "run"), str(work / "tiny-sd-finetuned")]) == 0
exported = StableDiffusionPipeline.from_pretrained(work / "tiny-sd-finetuned", safety_checker=None,
                                                   requires_safety_checker=False)
exported.set_progress_bar_config(disable=True)
with torch.no_grad():
    theirs = exported(test_prompts, num_inference_steps=steps, guidance_scale=3.0,
                      latents=torch.from_numpy(latents), output_type="np").images
ours = tuned.generate(test_prompts, steps=steps, guidance_scale=3.0, latents=latents.transpose(0, 2, 3, 1))
print(f"exported fine-tuned pipeline in diffusers vs flaxdiff: max abs difference {np.abs(ours - theirs).max():.2e}")

# %%
# the error of x0_hat = (x_t - sqrt(1 - alpha_bar_k) eps_hat) / sqrt(alpha_bar_k) on the training latents, per timestep
captions = [encoded[i]["caption"] for i in range(4)]
alpha_bar = pipe.scheduler.alphas_cumprod()
noise = np.random.RandomState(0).randn(*data_latents.shape).astype(np.float32)
levels = pick([20, 100, 250, 500, 750, 900, 980], [20, 500, 980])
plt.figure(figsize=(4, 2.2))
for label, model in (("pretrained", pipe), ("fine-tuned", tuned)):
    cond = model.encode_prompts(captions, 16, 16)
    errors = []
    for k in levels:
        x_t = np.sqrt(alpha_bar[k]) * data_latents + np.sqrt(1 - alpha_bar[k]) * noise
        eps_hat = np.asarray(model.denoiser.apply({"params": model.params}, x_t, np.full((4,), k, np.float32), cond))
        errors.append(np.abs((x_t - np.sqrt(1 - alpha_bar[k]) * eps_hat) / np.sqrt(alpha_bar[k]) - data_latents).mean())
    plt.semilogy(levels, errors, "o-", label=label)
plt.xlabel("timestep k")
plt.ylabel("mean |x0_hat - z|")
plt.legend()
plt.show()
