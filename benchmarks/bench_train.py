"""Train-step throughput and model-FLOPs utilisation of the DiffusionTrainer on this machine.

    MFU = (XLA cost-analysis FLOPs of one jitted train step / measured step time) / peak,
    peak = FLOP/s of a jitted float32 (n x n) @ (n x n) matmul measured in the same run (2 n^3 FLOPs per call).

Models: a small U-Net (9.59M params at 32x32x3, within 3% of the 9.31M of FlaxDiff's
Unet(feature_depths=(64, 128, 256), num_res_blocks=2, emb_features=256)), a tiny U-Net (0.43M params, within 2% of
FlaxDiff's tiny config in benchmarks/flaxdiff_peer.py) and a DiT-S/2-sized transformer. With ``--peer-venv`` (or
FLAXDIFF_PEER_VENV) the same measurement runs, in the same run, on FlaxDiff 0.2.11's own jitted train step
(``DiffusionTrainer._define_train_step``: cosine schedule, epsilon loss, Adam, EMA) for its Unet at both configs,
in a subprocess of the peer venv; its MFU uses the matmul peak measured here. Usage:

    python benchmarks/bench_train.py [--models unet,unet-tiny,dit] [--batch 32] [--steps 5] [--json out.json] \
        [--peer-venv $PEER_VENV] [--peer-configs medium,tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import losses, models, predictors, schedules
from flaxdiff.training import DiffusionTrainer, TrainConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flaxdiff_peer  # noqa: E402

MODELS = {
    "unet": ("unet", {"in_channels": 3, "base_channels": 64, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                      "attention_levels": (1,), "num_heads": 4, "norm_num_groups": 16}, (32, 32, 3)),
    "unet-tiny": ("unet", {"in_channels": 3, "base_channels": 24, "channel_mult": (1, 2), "num_res_blocks": 1,
                           "attention_levels": (1,), "num_heads": 4, "norm_num_groups": 8}, (32, 32, 3)),
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


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def print_row(name: str, row: dict) -> None:
    print(f"{name:24s} {row['params'] / 1e6:7.2f}M params  batch {row['batch']}  {row['step_time_s']:.3f} s/step  "
          f"{row['images_per_s']:7.1f} images/s  {row['train_gflop_per_image']:6.2f} train GFLOP/image  "
          f"{row['achieved_gflops']:6.1f} GFLOP/s  MFU {row['mfu']:.2f}  (load {row['load_avg'][0]:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,unet-tiny,dit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--peer-venv", default=None, help="venv with flaxdiff==0.2.11 (or FLAXDIFF_PEER_VENV)")
    parser.add_argument("--peer-configs", default="medium,tiny")
    args = parser.parse_args()
    import flax

    print(f"environment: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load()}", flush=True)
    peer_python = flaxdiff_peer.find_peer_python(args.peer_venv)
    peak = matmul_peak()
    print(f"jitted float32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)", flush=True)
    results = []
    for name in args.models.split(","):
        row = bench_model(name, args.batch, args.steps, args.compute_dtype)
        row["mfu"] = row["achieved_gflops"] * 1e9 / peak
        row["load_avg"] = list(os.getloadavg())
        results.append(row)
        print_row(name, row)
    peers = []
    if peer_python is not None:
        for config in args.peer_configs.split(","):
            row = flaxdiff_peer.run_peer(peer_python, "train", {"config": config, "batch": args.batch,
                                                                "size": 32, "repeats": args.steps})
            row["mfu"] = row["achieved_gflops"] * 1e9 / peak
            row["load_avg"] = list(os.getloadavg())
            peers.append(row)
            print_row(row["model"], row)
    peak_end = matmul_peak()
    print(f"jitted float32 matmul peak re-measured at the end: {peak_end / 1e9:.1f} GFLOP/s (load {load()})",
          flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"matmul_peak_gflops": peak / 1e9, "matmul_peak_end_gflops": peak_end / 1e9,
                       "cpu_count": os.cpu_count(), "jax": jax.__version__, "flax": flax.__version__,
                       "results": results, "flaxdiff_0_2_11": peers}, handle, indent=2)


if __name__ == "__main__":
    main()
