"""Masked DiT training (MicroDiT style) step time against unmasked at equal batch, on the bundled MNIST.

Every variant is the same class-conditional DiT (32x32x1 MNIST padded from 28x28, patch 2: N = 256 tokens) trained
by the one :class:`flaxdiff.training.Trainer` with the rectified-flow velocity loss; the masked variants are given
the MicroDiT loss ``objectives.MaskedDiffusionLoss`` (the mask drawn from the loss key, the loss over the visible
patches only, so the printed loss is the MicroDiT loss). Variants:

- ``unmasked``: plain DiT, mask_ratio 0;
- ``mixer, ratio 0``: with the patch mixer, mask_ratio 0 (the finetune phase of a masked run: same params);
- ``mixer, ratio r``: patch mixer on all N tokens, backbone on the N - round(r N) kept tokens.
- ``moe`` (with ``--moe``): unmasked with expert-choice MoE MLPs in alternate blocks.

The step time is the median of ``--steps`` timed steps after one warm-up step; the 1/5/15-minute load averages are
printed with every row because the machine may be shared. Usage:

    python benchmarks/bench_masked.py [--batch 32] [--steps 5] [--depth 6] [--width 128] [--ratios 0.5,0.75] [--moe]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from flaxdiff import losses, models, objectives, predictors, schedules
from flaxdiff.data import sources
from flaxdiff.training import TrainConfig, Trainer

from _common import load_average


def mnist_batch(batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` bundled MNIST training digits, padded to 32x32, in [-1, 1], with labels."""
    source = sources.mnist_source("train")
    rows = [source[i] for i in range(batch)]
    images = np.stack([row["image"] for row in rows]).astype(np.float32) / 127.5 - 1.0
    images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    return {"image": images, "label": np.asarray([row["label"] for row in rows], np.int32)}


def time_variant(name: str, overrides: dict, batch: dict[str, np.ndarray], steps: int) -> dict:
    model = models.get("dit", **overrides)
    loss = objectives.DiffusionLoss(schedules.get("rectified_flow"), predictors.get("velocity"),
                                    losses.weightings.get("uniform"), losses.time_samplers.get("logit_normal"))
    if overrides.get("mask_ratio", 0.0) > 0:
        loss = objectives.MaskedDiffusionLoss.for_model(model, loss)
    trainer = Trainer(model, train_config=TrainConfig(learning_rate=1e-4), example_batch=batch, loss=loss)
    state = trainer.init()
    params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state.params))
    start = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batch))   # compile + first step
    compile_s = time.perf_counter() - start
    times, losses_seen = [], []
    for _ in range(steps):
        start = time.perf_counter()
        metrics = jax.block_until_ready(trainer.train_step(batch))
        times.append(time.perf_counter() - start)
        losses_seen.append(float(metrics["loss"]))
    trainer.close()
    return {"variant": name, "params": params, "batch": len(batch["image"]), "step_time_s": float(np.median(times)),
            "first_step_s": compile_s, "loss_last": losses_seen[-1], "load_avg": [round(v, 2) for v in load_average()], **overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--mixer-depth", type=int, default=1)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--moe", action="store_true", help="also time an expert-choice MoE DiT (4 experts, c=2)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()

    base = {"input_size": 32, "in_channels": 1, "patch_size": 2, "hidden_size": args.width, "depth": args.depth,
            "num_heads": 4, "num_classes": 10, "frequency_dim": 128}
    variants = [("unmasked", base), ("mixer, ratio 0", {**base, "patch_mixer_depth": args.mixer_depth})]
    for ratio in (float(r) for r in args.ratios.split(",") if r):
        variants.append((f"mixer, ratio {ratio:g}", {**base, "patch_mixer_depth": args.mixer_depth,
                                                     "mask_ratio": ratio}))
    if args.moe:
        variants.append(("moe (4 experts, c=2)", {**base, "num_experts": 4, "capacity_factor": 2.0}))
    batch = mnist_batch(args.batch)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs, "
          f"batch {args.batch}, 32x32x1 MNIST, patch 2 (256 tokens), depth {args.depth}, width {args.width}")
    rows = []
    for name, overrides in variants:
        row = time_variant(name, overrides, batch, args.steps)
        rows.append(row)
        speedup = rows[0]["step_time_s"] / row["step_time_s"]
        print(f"{name:22s} {row['params'] / 1e6:6.2f}M params  {row['step_time_s']:.3f} s/step  "
              f"x{speedup:.2f} vs unmasked  (first step {row['first_step_s']:.1f} s, load avg {row['load_avg']})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
