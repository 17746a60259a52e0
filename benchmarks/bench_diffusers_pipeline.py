"""Sampling time per image of a loaded diffusers pipeline: flaxdiff (JAX) against diffusers' torch pipeline.

Both sides run the same StableDiffusionPipeline directory (a small random one built here in torch unless
``--pipeline PATH`` names an existing one), the same scheduler (DDIM, SD's scheduler_config), the same step count,
classifier-free guidance 7.5 with negative prompts, the same initial latents and batch, in one process:

    ours       DiffusersPipeline.generate: text encoder -> sampler (whole grid in one lax.scan under one jit) -> VAE
    diffusers  StableDiffusionPipeline.__call__ (torch CPU, output_type="np")

Reported: compile time of our first call, then the median wall time over ``--repeats`` calls per image for each
side, and the max abs difference of their images. Usage:

    python benchmarks/bench_diffusers_pipeline.py [--steps 20] [--batch 2] [--size 32] [--repeats 3] \
        [--torch-threads 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import load_text  # noqa: E402


def environment_line() -> str:
    import flax
    import jax
    import torch

    load = load_text()
    return (f"environment: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPU cores, "
            f"load average {load}")


def build_pipeline(root: Path, size: int) -> Path:
    """A random StableDiffusionPipeline: U-Net (32, 64) channels, CLIP text encoder (hidden 32), VAE (16, 32)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from helpers import text_models

    torch.manual_seed(0)
    vocab = text_models.write_clip_tokenizer(root / "words")
    text_encoder = text_models.write_clip_model(root / "clip", vocab, projection=False, hidden_act="gelu")
    tokenizer = CLIPTokenizer(str(root / "words" / "vocab.json"), str(root / "words" / "merges.txt"),
                              model_max_length=text_models.CLIP_TINY["max_position_embeddings"],
                              pad_token="<|endoftext|>")
    unet = UNet2DConditionModel(sample_size=size // 2, block_out_channels=(32, 64), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=size)
    with torch.no_grad():
        for model in (unet, vae):
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None, help="an existing StableDiffusionPipeline dir (default: build)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="image size of the built pipeline (latents size / 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 avoids spin-waiting on a loaded machine)")
    args = parser.parse_args()

    import numpy as np
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    from diffusers import StableDiffusionPipeline

    from flaxdiff.interop.diffusers_pipeline import DiffusersPipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.pipeline) if args.pipeline else build_pipeline(Path(tmp), args.size)
        ours = DiffusersPipeline.from_pretrained(path)
        reference = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        reference.set_progress_bar_config(disable=True)
        h, w, c = ours.latent_shape()
        latents = np.random.RandomState(0).randn(args.batch, c, h, w).astype(np.float32)
        prompts = [f"a photo of a digit {i}" for i in range(args.batch)]
        negative = ["blurry"] * args.batch

        def run_ours() -> np.ndarray:
            return ours.generate(prompts, negative_prompts=negative, steps=args.steps, guidance_scale=7.5,
                                 latents=latents.transpose(0, 2, 3, 1))

        def run_diffusers() -> np.ndarray:
            with torch.no_grad():
                return reference(prompts, negative_prompt=negative, num_inference_steps=args.steps,
                                 guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np").images

        start = time.perf_counter()
        first = run_ours()
        compile_s = time.perf_counter() - start
        times = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", run_ours), ("diffusers", run_diffusers)):
                start = time.perf_counter()
                images = fn()
                times[name].append(time.perf_counter() - start)
        difference = float(np.abs(first - images).max())

    print(environment_line())
    print(f"pipeline: {'built ' + str(args.size) + 'x' + str(args.size) if not args.pipeline else args.pipeline}, "
          f"DDIM {args.steps} steps, guidance 7.5 (2 U-Net rows per image per step), batch {args.batch}, "
          f"latents {h}x{w}x{c}, {args.repeats} repeats")
    print(f"ours: first call (compile + run) {compile_s:.2f} s")
    for name, values in times.items():
        per_image = statistics.median(values) / args.batch * 1000
        print(f"{name:>9}: {per_image:8.1f} ms/image  (median of {[round(v, 3) for v in values]} s per call)")
    ratio = statistics.median(times["diffusers"]) / statistics.median(times["ours"])
    print(f"speed-up (diffusers / ours): {ratio:.2f}x; max |image difference| = {difference:.2e}")
    print(environment_line())


if __name__ == "__main__":
    main()
