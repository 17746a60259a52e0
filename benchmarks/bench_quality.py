"""Quality per CPU-minute on the bundled MNIST: class accuracy and Fréchet distance after 2, 5 and 10 minutes.

For each variant (U-Net or DiT, rectified flow or EDM), ``training.py`` trains a class-conditional model on the
bundled MNIST digits with a learning-rate schedule sized to end at the last mark (10 minutes), checkpointing every
``--every`` steps; the minute marks are read off the run's own clock (``train/elapsed_s`` in metrics.jsonl: wall
time since training began, compilation and checkpoint saves included; data loading and model construction before
it are not). The checkpoint at the first logged step at or past each mark is evaluated with ``flaxdiff eval``
(EMA params, the sampler/steps/guidance below, ``--per-class`` samples per class): class accuracy by the bundled
digit classifier and the Fréchet distance in its feature space against held-out real digits.

Sizing the schedule: a short probe run (compile plus ``--probe-steps`` steps) measures the variant's steady
steps/s and compile time on this machine; the real run gets ``steps = rate * (last mark - compile time)``. The
2- and 5-minute points are therefore mid-schedule checkpoints of the 10-minute run (learning rate not yet
annealed), not runs of their own. Usage:

    python benchmarks/bench_quality.py [--variants unet-rf,unet-edm,dit-rf,dit-edm] [--marks 2,5,10] \
        [--per-class 30] [--workroot DIR] [--json out.json]

Run it on an otherwise idle machine: every number is a wall-clock budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

from _common import load_average, load_text

REPO = Path(__file__).resolve().parent.parent

EDM = ["--schedule", "edm", "--predictor", "edm", "--time-sampler", "edm_lognormal", "--weighting", "edm"]
DIT = ["--model", "dit", "--model-config",
       '{"patch_size": 4, "hidden_size": 128, "depth": 6, "num_heads": 4, "frequency_dim": 128}',
       "--learning-rate", "0.001"]
VARIANTS = {
    "unet-rf": [],                 # training.py's defaults: the main job
    "unet-edm": EDM,
    "dit-rf": DIT,
    "dit-edm": DIT + EDM,
}


def _records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/elapsed_s" in r]


def _train(workdir: Path, flags: list[str], steps: int, every: int, checkpoint_every: int) -> float:
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, str(REPO / "training.py"), "--workdir", str(workdir), "--steps", str(steps),
               "--log-every", str(every), "--checkpoint-every", str(checkpoint_every), "--keep-checkpoints", "1000",
               "--preview-per-class", "0", *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _eval(workdir: Path, step: int, args: argparse.Namespace) -> dict:
    out = workdir / f"eval_{step}.json"
    command = [sys.executable, "-m", "flaxdiff.cli", "eval", str(workdir), "--step", str(step), "--sampler",
               args.sampler, "--steps", str(args.sampler_steps), "--guidance", str(args.guidance), "--per-class",
               str(args.per_class), "--out", str(out), "--overwrite"]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(out.read_text())


def run_variant(name: str, args: argparse.Namespace, marks: list[float]) -> dict:
    flags = VARIANTS[name]
    root = Path(args.workroot)
    probe = root / f"{name}-probe"
    _train(probe, flags, args.probe_steps, 5, args.probe_steps)   # clock every 5 steps, no checkpoint until the end
    records = _records(probe)
    compile_s = records[0]["train/elapsed_s"]
    steady = records[len(records) // 2:]
    rate = (steady[-1]["step"] - steady[0]["step"]) / (steady[-1]["train/elapsed_s"] - steady[0]["train/elapsed_s"])
    steps = max(args.every, int(rate * (marks[-1] * 60 - compile_s)) // args.every * args.every)
    print(f"{name}: probe {rate:.2f} steps/s, first step (compile) {compile_s:.1f} s -> {steps} steps for "
          f"{marks[-1]:g} min (load {load_text(count=1)})", flush=True)
    workdir = root / name
    wall = _train(workdir, flags, steps, args.every, args.every)
    records = _records(workdir)
    rows = []
    for mark in marks:
        hit = next((r for r in records if r["train/elapsed_s"] >= mark * 60), records[-1])
        result = _eval(workdir, hit["step"], args)
        row = {"minutes": mark, "step": hit["step"], "elapsed_s": hit["train/elapsed_s"],
               "class_accuracy": result["class_accuracy"], "frechet_distance": result["frechet_distance"]}
        rows.append(row)
        print(f"    {mark:4g} min: step {row['step']:5d} (at {row['elapsed_s']:6.1f} s)  class accuracy "
              f"{row['class_accuracy']:.3f}  Fréchet distance {row['frechet_distance']:7.2f}", flush=True)
    return {"variant": name, "flags": flags, "probe_steps_per_s": rate, "compile_s": compile_s, "steps": steps,
            "training_py_wall_s": wall, "marks": rows, "load_avg_end": load_average()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--marks", default="2,5,10", help="minutes of training at which to evaluate")
    parser.add_argument("--every", type=int, default=50, help="steps between checkpoints / clock readings")
    parser.add_argument("--probe-steps", type=int, default=40)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--workroot", default=str(Path(tempfile.gettempdir()) / "bench_quality"),
                        help="directory of the runs (default: <system temp dir>/bench_quality)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="PNG: class accuracy and Fréchet distance against minutes")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    marks = sorted(float(m) for m in args.marks.split(","))
    if not marks or marks[0] <= 0 or not all(math.isfinite(m) for m in marks):
        parser.error(f"--marks {args.marks!r}: give positive minutes, e.g. 2,5,10")
    import flax
    import jax

    print(f"environment: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
          f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load_text(count=1)}; "
          f"eval: {args.sampler} {args.sampler_steps} steps, guidance {args.guidance}, {args.per_class} per class",
          flush=True)
    results = [run_variant(name, args, marks) for name in names]
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "jax": jax.__version__,
                                               "eval": {"sampler": args.sampler, "steps": args.sampler_steps,
                                                        "guidance": args.guidance, "per_class": args.per_class},
                                               "results": results}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, fd) = plt.subplots(1, 2, figsize=(10, 4))
    for row in results:
        minutes = [m["elapsed_s"] / 60 for m in row["marks"]]
        acc.plot(minutes, [m["class_accuracy"] for m in row["marks"]], "o-", label=row["variant"])
        fd.plot(minutes, [m["frechet_distance"] for m in row["marks"]], "o-", label=row["variant"])
    acc.set(xlabel="minutes of training (2 CPU cores)", ylabel="class accuracy of samples", ylim=(0, 1))
    fd.set(xlabel="minutes of training (2 CPU cores)", ylabel="Fréchet distance (classifier features)", yscale="log")
    acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
