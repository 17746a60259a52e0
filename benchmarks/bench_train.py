"""Train-step throughput and model-FLOPs utilisation of the DiffusionTrainer on this machine.

    MFU = (XLA cost-analysis FLOPs of one jitted train step / measured step time) / peak,
    peak = FLOP/s of a jitted float32 (n x n) @ (n x n) matmul measured in the same run (2 n^3 FLOPs per call).

Models: a small U-Net (9.59M params at 32x32x3, within 3% of the 9.31M of FlaxDiff's
Unet(feature_depths=(64, 128, 256), num_res_blocks=2, emb_features=256)) and a DiT-S/2-sized transformer. Usage:

    python benchmarks/bench_train.py [--models unet,dit] [--batch 32] [--steps 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import losses, models, predictors, schedules
from flaxdiff.training import DiffusionTrainer, TrainConfig

MODELS = {
    "unet": ("unet", {"in_channels": 3, "base_channels": 64, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                      "attention_levels": (1,), "num_heads": 4, "norm_num_groups": 16}, (32, 32, 3)),
    "dit": ("DiT-S/2", {"input_size": 32, "in_channels": 4, "learn_sigma": False}, (32, 32, 4)),
}


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 matmul (best of ``repeats``)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def bench_model(name: str, batch: int, steps: int, compute_dtype: str) -> dict:
    preset, overrides, shape = MODELS[name]
    model = models.get(preset, **overrides)
    example = {"image": np.zeros((batch,) + shape, np.float32)}
    trainer = DiffusionTrainer(model, None, schedules.get("cosine"), predictors.get("v"),
                               losses.weightings.get("uniform"), losses.time_samplers.get("uniform"),
                               TrainConfig(compute_dtype=compute_dtype), example)
    state = trainer.init()
    params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state.params))
    rng = np.random.default_rng(0)
    local = {"image": rng.uniform(-1, 1, (batch,) + shape).astype(np.float32)}
    global_batch = trainer.global_batch(local)
    compiled = trainer._step_fn.lower(trainer.state, global_batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    trainer.state, metrics = trainer._step_fn(trainer.state, global_batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.state, metrics = trainer._step_fn(trainer.state, global_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    return {"model": name, "preset": preset, "params": params, "batch": batch, "shape": list(shape),
            "compute_dtype": compute_dtype, "step_time_s": step_time, "images_per_s": batch / step_time,
            "train_gflop_per_image": flops / batch / 1e9, "achieved_gflops": flops / step_time / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,dit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"jitted float32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)", flush=True)
    results = []
    for name in args.models.split(","):
        row = bench_model(name, args.batch, args.steps, args.compute_dtype)
        row["mfu"] = row["achieved_gflops"] * 1e9 / peak
        results.append(row)
        print(f"{name:5s} {row['params'] / 1e6:8.2f}M params  batch {row['batch']}  {row['step_time_s']:.3f} s/step  "
              f"{row['images_per_s']:.1f} images/s  {row['train_gflop_per_image']:.2f} train GFLOP/image  "
              f"MFU {row['mfu']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"matmul_peak_gflops": peak / 1e9, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
