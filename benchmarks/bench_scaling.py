"""Data-parallel scaling: train-step time with 1, 2, 4, 8 forced host devices at a fixed global batch, and a projection
of multi-host scaling on a TPU v4-32 from the gradient all-reduce volume per step.

Each device count runs in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=N; the
DiffusionTrainer builds its ("data", "fsdp") mesh over all N devices and splits the global batch across them.
On this machine all N "devices" share the same CPU cores, so this measures the cost of the sharded program
(partitioning, gradient all-reduce, per-device overheads) at constant total compute, not a speed-up.

Projection (printed, with its assumptions): per step each chip all-reduces the float32 gradients, P params x 4 bytes;
a bandwidth-optimal (ring / torus) all-reduce moves 2 (n - 1) / n of that through each chip, so

    t_comm = 2 (n - 1) / n * 4 P / B_allreduce,       t_compute = F_image * b_chip / (peak_chip * MFU)

with F_image the train FLOPs per image from XLA cost analysis (the same model as here), b_chip the per-chip batch.

    python benchmarks/bench_scaling.py [--model unet] [--global-batch 32] [--steps 3] [--json docs/scaling.json] \
        [--projection-models unet,dit]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import load_average, load_text  # noqa: E402

# Cloud TPU v4 (https://cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16 peak per chip, all-reduce bandwidth 1.1 PB/s
# per 4096-chip pod. A v4-32 slice is 16 chips (2 TensorCores each, one JAX device per chip) on 4 hosts.
V4_PEAK_FLOPS = 275e12
V4_POD_ALLREDUCE = 1.1e15
V4_POD_CHIPS = 4096
V4_32_CHIPS = 16


def worker(model: str, global_batch: int, steps: int) -> dict:
    import jax

    import bench_train

    row = bench_train.bench_model(model, global_batch, steps, "float32")
    row["devices"] = jax.device_count()
    row["load_avg"] = list(load_average())
    return row


def model_cost(model: str, batch: int) -> tuple[int, float]:
    """(params, train GFLOP per image) of a bench_train.py model from XLA cost analysis, without running a step."""
    import jax
    import numpy as np

    import bench_train
    from flaxdiff import losses, models, predictors, schedules
    from flaxdiff.training import DiffusionTrainer, TrainConfig

    preset, overrides, shape = bench_train.MODELS[model]
    example = {"image": np.zeros((batch,) + shape, np.float32)}
    trainer = DiffusionTrainer(models.get(preset, **overrides), None, schedules.get("cosine"), predictors.get("v"),
                               losses.weightings.get("uniform"), losses.time_samplers.get("uniform"),
                               TrainConfig(), example)
    state = trainer.init()
    params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state.params))
    cost = trainer._step_fn.lower(state, trainer.global_batch(example)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return params, float(cost.get("flops", 0.0)) / batch / 1e9


def print_projection(name: str, params: int, gflop: float) -> list[dict]:
    print(f"\nTPU v4-32 projection for {name}: {V4_32_CHIPS} chips, gradients 4 x {params / 1e6:.2f}M = "
          f"{4 * params / 1e6:.1f} MB per step, {gflop:.2f} train GFLOP/image (XLA cost analysis)")
    print(f"{'per-chip batch':>14s} {'MFU':>5s} {'bw':>5s} {'GB/s':>6s} {'t_comm ms':>10s} {'t_compute ms':>13s} "
          f"{'efficiency':>10s}")
    projections = []
    for per_chip_batch in (32, 128):
        for fraction in (1.0, 0.5):
            proj = projection(params, gflop, per_chip_batch, 0.3, fraction)
            proj["model"] = name
            projections.append(proj)
            print(f"{per_chip_batch:14d} {proj['assumed_mfu']:5.2f} {fraction:5.2f} "
                  f"{proj['allreduce_GBps_per_chip']:6.0f} {proj['t_comm_ms']:10.3f} {proj['t_compute_ms']:13.3f} "
                  f"{proj['efficiency_no_overlap']:10.3f}")
    return projections


def projection(params: int, gflop_per_image: float, per_chip_batch: int, mfu: float, bandwidth_fraction: float) -> dict:
    chips = V4_32_CHIPS
    grad_bytes = 4.0 * params
    per_chip_allreduce = V4_POD_ALLREDUCE / V4_POD_CHIPS * bandwidth_fraction
    t_comm = 2.0 * (chips - 1) / chips * grad_bytes / per_chip_allreduce
    t_compute = gflop_per_image * 1e9 * per_chip_batch / (V4_PEAK_FLOPS * mfu)
    return {"chips": chips, "gradient_bytes": grad_bytes, "allreduce_GBps_per_chip": per_chip_allreduce / 1e9,
            "t_comm_ms": 1e3 * t_comm, "t_compute_ms": 1e3 * t_compute, "per_chip_batch": per_chip_batch,
            "assumed_mfu": mfu, "bandwidth_fraction": bandwidth_fraction,
            "efficiency_no_overlap": t_compute / (t_compute + t_comm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet", help="a model name of bench_train.py (unet, unet-tiny, dit)")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--projection-models", default="unet,dit",
                        help="also project these models (cost analysis only, no timing)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.global_batch, args.steps)), flush=True)
        return

    import flax
    import jax

    load = load_text()
    print(f"environment: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load}", flush=True)
    rows = []
    for count in [int(v) for v in args.devices.split(",")]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
                               "--global-batch", str(args.global_batch), "--steps", str(args.steps)],
                              capture_output=True, text=True, env=env, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"worker with {count} devices failed:\n{proc.stderr[-3000:]}")
        row = json.loads(lines[-1])
        rows.append(row)
        print(f"devices {row['devices']}: {row['step_time_s']:.3f} s/step, {row['images_per_s']:.1f} images/s "
              f"(global batch {row['batch']}, {row['batch'] // row['devices']} per device; "
              f"load {row['load_avg'][0]:.2f})", flush=True)
    base = rows[0]["step_time_s"]
    print(f"\n{args.model} ({rows[0]['params'] / 1e6:.2f}M params), global batch {args.global_batch}, "
          f"{os.cpu_count()} shared CPU cores")
    print(f"{'devices':>7s} {'s/step':>8s} {'images/s':>9s} {'time vs 1 device':>17s}")
    for row in rows:
        row["time_vs_1_device"] = row["step_time_s"] / base
        print(f"{row['devices']:7d} {row['step_time_s']:8.3f} {row['images_per_s']:9.1f} "
              f"{row['time_vs_1_device']:16.2f}x")

    print("\nassumptions: pure data parallelism, float32 gradients all-reduced once per step, bandwidth-optimal "
          "all-reduce (2(n-1)/n of the bytes per chip), per-chip all-reduce bandwidth = 1.1 PB/s / 4096 chips "
          "(v4 pod figure) or half of it (bw 0.5: a 2x2x4 slice is a mesh, not a torus), no overlap of "
          "communication with the backward pass (XLA's async collectives can hide part of it), bf16 peak "
          "275 TFLOP/s per chip at an assumed MFU of 0.3.")
    projections = print_projection(args.model, rows[0]["params"], rows[0]["train_gflop_per_image"])
    for name in [m for m in args.projection_models.split(",") if m and m != args.model]:
        projections += print_projection(name, *model_cost(name, 8))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "global_batch": args.global_batch, "cpu_count": os.cpu_count(),
                       "jax": jax.__version__, "rows": rows, "tpu_v4_32_projection": projections}, handle, indent=2)


if __name__ == "__main__":
    main()
