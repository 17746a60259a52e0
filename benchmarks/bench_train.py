"""Train-step throughput of the DiffusionTrainer against FlaxDiff 0.2.11's, side by side, and the kernel ceiling.

    images/s = batch / median step time;   ratio = ours images/s / FlaxDiff 0.2.11 images/s at matched parameters
    MFU = (XLA cost-analysis FLOPs of one jitted train step / measured step time) / peak,
    peak = FLOP/s of a jitted float32 (n x n) @ (n x n) matmul measured in the same run (2 n^3 FLOPs per call),
    fraction of the kernel ceiling = (time of the step's convolutions and matmuls alone, ``bench_kernels.ceiling``)
                                     / measured step time   (1 = nothing but the heavy kernels costs time)

Models and their peers (parameter counts within 5%): a small U-Net (9.59M params at 32x32x3, 3% above the 9.31M of
FlaxDiff's Unet(feature_depths=(64, 128, 256), num_res_blocks=2, emb_features=256), peer config "medium"), the
same U-Net with its attention on the 8x8 instead of the 16x16 map ("unet-attn8", same parameters, peer "medium"),
a tiny U-Net (0.43M, peer "tiny"), the main job's DiT ("dit-mnist": 4x4 patches, width 128, 6 blocks, 1.85M
params on 32x32x1; peer "dit-p4": SimpleDiT with 4x4 patches, width 128, 4 heads, 5 blocks, 1.90M) and DiT-S/2 on
32x32x4 (32.9M, peer "dit-s2": FlaxDiff's SimpleDiT with patch 2, width 384, 6 heads, 11 blocks, 33.0M). With ``--peer-venv`` (or FLAXDIFF_PEER_VENV) each of our models is followed, in the
same run, by FlaxDiff 0.2.11's own jitted train step (``DiffusionTrainer._define_train_step``: cosine schedule,
epsilon loss, Adam, EMA) on its peer, in a subprocess of the peer venv; its MFU uses the matmul peak measured here.
Usage:

    python benchmarks/bench_train.py [--models unet,unet-tiny,dit] [--batch 32] [--steps 5] [--json out.json] \
        [--peer-venv $PEER_VENV] [--no-ceiling] [--image-size 28]
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
from _common import load_average, load_text  # noqa: E402

MODELS = {
    "unet": ("unet", {"in_channels": 3, "base_channels": 64, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                      "attention_levels": (1,), "num_heads": 4, "norm_num_groups": 16}, (32, 32, 3)),
    # the same U-Net with its attention on the 8x8 map instead of the 16x16 one (FlaxDiff's Unet "medium" has three
    # attention blocks at 8x8 and two at 16x16): the same 9.59M parameters, 10% fewer train FLOPs per image
    "unet-attn8": ("unet", {"in_channels": 3, "base_channels": 64, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                            "attention_levels": (2,), "num_heads": 4, "norm_num_groups": 16}, (32, 32, 3)),
    "unet-tiny": ("unet", {"in_channels": 3, "base_channels": 24, "channel_mult": (1, 2), "num_res_blocks": 1,
                           "attention_levels": (1,), "num_heads": 4, "norm_num_groups": 8}, (32, 32, 3)),
    "dit": ("DiT-S/2", {"input_size": 32, "in_channels": 4, "learn_sigma": False}, (32, 32, 4)),
    # the MNIST main job's DiT (configs/mnist_default.json, unconditional here): 4x4 patches, width 128, 6 blocks
    "dit-mnist": ("dit", {"patch_size": 4, "hidden_size": 128, "depth": 6, "num_heads": 4, "frequency_dim": 128,
                          "in_channels": 1}, (32, 32, 1)),
}
# the FlaxDiff 0.2.11 config (benchmarks/flaxdiff_peer.py) each of our models is compared with
PEER_OF = {"unet": "medium", "unet-attn8": "medium", "unet-tiny": "tiny", "dit": "dit-s2",
           "dit-mnist": "dit-p4"}


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


def model_shape(name: str, image_size: int | None) -> tuple[int, int, int]:
    """The input shape of model ``name``: its own, or ``image_size`` square with its channels."""
    shape = MODELS[name][2]
    return shape if image_size is None else (image_size, image_size, shape[-1])


def bench_model(name: str, batch: int, steps: int, compute_dtype: str, image_size: int | None = None) -> dict:
    preset, overrides, _ = MODELS[name]
    shape = model_shape(name, image_size)
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


def print_row(name: str, row: dict) -> None:
    print(f"{name:28s} {row['params'] / 1e6:7.2f}M params  batch {row['batch']}  {row['step_time_s']:.3f} s/step  "
          f"{row['images_per_s']:7.1f} images/s  {row['train_gflop_per_image']:6.2f} train GFLOP/image  "
          f"{row['achieved_gflops']:6.1f} GFLOP/s  MFU {row['mfu']:.2f}  (load {row['load_avg'][0]:.2f})", flush=True)


def add_ceiling(row: dict, batch: int, repeats: int, peak: float) -> None:
    """Time the model's convolutions and matmuls alone (bench_kernels) and the fraction of that ceiling reached."""
    import bench_kernels

    kernels = bench_kernels.ceiling(row["model"], batch, repeats, tuple(row["shape"]))
    row["kernel_ceiling"] = {"seconds": kernels["seconds"], "gflop": kernels["gflop"], "gflops": kernels["gflops"],
                             "ceiling_mfu": kernels["gflops"] * 1e9 / peak, "ops": kernels["ops"],
                             "distinct_ops": kernels["distinct_ops"]}
    row["fraction_of_ceiling"] = kernels["seconds"] / row["step_time_s"]
    row["mfu_fraction_of_ceiling"] = row["mfu"] / row["kernel_ceiling"]["ceiling_mfu"]
    print(f"{'':28s} kernel ceiling: its {kernels['ops']} convolutions/matmuls alone take {kernels['seconds']:.3f} s "
          f"(ceiling MFU {row['kernel_ceiling']['ceiling_mfu']:.2f}) -> the step reaches "
          f"{row['fraction_of_ceiling']:.2f} of the ceiling by time, {row['mfu_fraction_of_ceiling']:.2f} by MFU "
          f"(goal >= 0.9; load {load_text(count=1)})", flush=True)


def compare(ours: dict, peer: dict) -> dict:
    """The side-by-side numbers of one pair: parameter gap, images/s ratio."""
    gap = ours["params"] / peer["params"] - 1.0
    ratio = ours["images_per_s"] / peer["images_per_s"]
    print(f"{'':28s} ours / FlaxDiff 0.2.11: params {ours['params'] / 1e6:.2f}M vs {peer['params'] / 1e6:.2f}M "
          f"({gap:+.1%}, within 5%: {'yes' if abs(gap) <= 0.05 else 'NO'}), images/s {ours['images_per_s']:.2f} vs "
          f"{peer['images_per_s']:.2f}: ratio {ratio:.3f} (goal >= 1.15)", flush=True)
    return {"model": ours["model"], "peer": peer["model"], "param_gap": gap, "images_per_s_ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,unet-tiny,dit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--peer-venv", default=None, help="venv with flaxdiff==0.2.11 (or FLAXDIFF_PEER_VENV)")
    parser.add_argument("--peer-configs", default=None,
                        help=f"peer configs to run (default: the peers of --models, {PEER_OF})")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the kernel-ceiling measurement")
    parser.add_argument("--ceiling-repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size for every model and peer (default: each model's own, 32)")
    args = parser.parse_args()
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size {args.image_size} is invalid; accepted: a positive number of pixels")
    names = args.models.split(",")
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    peer_configs = args.peer_configs.split(",") if args.peer_configs else list(dict.fromkeys(PEER_OF[m] for m in names))
    unknown = [c for c in peer_configs if c not in flaxdiff_peer.PEER_MODELS]
    if unknown:
        parser.error(f"unknown peer config(s) {unknown}; choose from {flaxdiff_peer.PEER_MODELS}")
    import flax

    print(f"environment: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load_text()}", flush=True)
    peer_python = flaxdiff_peer.find_peer_python(args.peer_venv)
    peak = matmul_peak()
    print(f"jitted float32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)", flush=True)

    def run_peer(config: str) -> dict:
        row = flaxdiff_peer.run_peer(peer_python, "train", {"config": config, "batch": args.batch,
                                                            "size": args.image_size or 32,
                                                            "repeats": args.steps})
        row["mfu"] = row["achieved_gflops"] * 1e9 / peak
        row["load_avg"] = list(load_average())
        print_row(row["model"], row)
        return row

    results, peers, pairs = [], {}, []
    for name in names:
        row = bench_model(name, args.batch, args.steps, args.compute_dtype, args.image_size)
        row["mfu"] = row["achieved_gflops"] * 1e9 / peak
        row["load_avg"] = list(load_average())
        results.append(row)
        print_row(name, row)
        if not args.no_ceiling:
            add_ceiling(row, args.batch, args.ceiling_repeats, peak)
        if peer_python is not None and PEER_OF[name] in peer_configs:
            if PEER_OF[name] not in peers:
                peers[PEER_OF[name]] = run_peer(PEER_OF[name])
            pairs.append(compare(row, peers[PEER_OF[name]]))
    if peer_python is not None:
        for config in peer_configs:
            if config not in peers:
                peers[config] = run_peer(config)
    peak_end = matmul_peak()
    print(f"jitted float32 matmul peak re-measured at the end: {peak_end / 1e9:.1f} GFLOP/s (load {load_text()})",
          flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"matmul_peak_gflops": peak / 1e9, "matmul_peak_end_gflops": peak_end / 1e9,
                       "cpu_count": os.cpu_count(), "jax": jax.__version__, "flax": flax.__version__,
                       "results": results, "flaxdiff_0_2_11": list(peers.values()), "pairs": pairs}, handle, indent=2)


if __name__ == "__main__":
    main()
