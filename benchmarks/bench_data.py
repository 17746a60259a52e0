"""Input throughput: images/s the grain loader delivers from ArrayRecord shards (raw uint8 and PNG records) versus
decoding a folder of PNG files, with 0 and N grain workers, next to the images/s of one training step, so a user
sees whether input feeds the step.

Every configuration reads the same synthetic RGB images (``--count`` of ``--size`` squared, random pixels +
smooth gradients, written once to a temporary folder and converted with ``flaxdiff data convert``), through the
standard ``make_loader`` pipeline (shuffle, resize-crop to ``--image-size``, scale to [-1, 1], batch), for
``--batches`` batches after ``--warmup`` batches. The train step is the DiffusionTrainer's jitted step of the
tiny U-Net (``unet-tiny``) at ``--image-size`` (or ``--step-size`` / ``--step-channels``, e.g. the 32x32x4 latents
of 256px images) with the same batch size. Usage:

    python benchmarks/bench_data.py [--count 2048] [--size 64] [--image-size 32] [--batch 64] [--workers 2]
    python benchmarks/bench_data.py --count 512 --size 256 --image-size 256 --batch 32 --step-size 32 --step-channels 4
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import load_text


def write_images(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(count):
        noise = rng.integers(0, 64, (size, size, 3)).astype(np.float32)
        image = np.clip(noise + ramp[:, None, None] * (i % 3 == 0) + ramp[None, :, None] * 0.5, 0, 255)
        Image.fromarray(image.astype(np.uint8)).save(root / f"{i:06d}.png")


def loader_rate(source, batch: int, image_size: int, workers: int, batches: int, warmup: int) -> float:
    from flaxdiff import data

    it = data.make_loader(source, batch, image_size, seed=0, worker_count=workers, shard_index=0, shard_count=1)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def train_step_rate(batch: int, image_size: int, steps: int, channels: int = 3) -> float:
    import jax
    import jax.numpy as jnp

    from flaxdiff import losses, models, predictors, schedules
    from flaxdiff.training import DiffusionTrainer, TrainConfig

    config = models.get_config("unet-tiny", in_channels=channels)
    example = {"image": np.zeros((batch, image_size, image_size, channels), np.float32)}
    trainer = DiffusionTrainer(config.make(), config.to_config(), schedules.get("rectified_flow"),
                               predictors.get("velocity"), losses.weightings.get("uniform"),
                               losses.time_samplers.get("logit_normal"),
                               TrainConfig(total_steps=steps + 2, log_every=10 ** 9, checkpoint_every=0), example)
    images = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, example["image"].shape), jnp.float32)}
    for _ in range(2):
        trainer.train_step(images)
    jax.block_until_ready(trainer.state)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images)
    jax.block_until_ready(trainer.state)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2048)
    parser.add_argument("--size", type=int, default=64, help="stored image size")
    parser.add_argument("--image-size", type=int, default=32, help="training resolution")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="N of the N-worker rows")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-size", type=int, default=None,
                        help="train-step resolution (default --image-size; e.g. 32 with --step-channels 4 for the "
                             "f8 latents of 256px images)")
    parser.add_argument("--step-channels", type=int, default=3, help="train-step channels (4: SD-style latents)")
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    from flaxdiff import data
    from flaxdiff.data import arrayrecord

    print(f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load_text()} at start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "png").mkdir()
        write_images(root / "png", args.count, args.size)
        start = time.perf_counter()
        arrayrecord.convert(str(root / "png"), root / "raw", workers=args.workers, progress=False)
        convert_s = time.perf_counter() - start
        arrayrecord.convert(str(root / "png"), root / "pngrec", image_format="png", workers=args.workers,
                            progress=False)
        sources = {"PNG folder (decode per read)": data.ImageFolderSource(root / "png", check_files=False),
                   "ArrayRecord, raw uint8": data.load_source(str(root / "raw")),
                   "ArrayRecord, PNG records": data.load_source(str(root / "pngrec"))}
        print(f"{args.count} images {args.size}x{args.size}x3 -> batches of {args.batch} at {args.image_size}px; "
              f"convert (raw, {args.workers} workers): {args.count / convert_s:.0f} images/s", flush=True)
        print(f"{'source':32s} {'workers':>7s} {'images/s':>10s}")
        for name, source in sources.items():
            for workers in (0, args.workers):
                rate = loader_rate(source, args.batch, args.image_size, workers, args.batches, args.warmup)
                print(f"{name:32s} {workers:7d} {rate:10.0f}", flush=True)
    size = args.step_size or args.image_size
    rate = train_step_rate(args.batch, size, args.steps, args.step_channels)
    label = f"train step (unet-tiny, {size}x{size}x{args.step_channels})"
    print(f"{label:32s} {'-':>7s} {rate:10.0f}")
    print(f"load average {load_text()} at end")


if __name__ == "__main__":
    main()
