"""Sampling-settings sweep for a class-conditional MNIST run: class accuracy and Fréchet distance per setting.

    python benchmarks/bench_guidance.py RUN_DIR --per-class 50 \
        --setting dpmpp_2m,20,logsnr_uniform,3 --setting dpmpp_2m,20,logsnr_uniform,3,0.3,5 ... [--json out.json]

Each ``--setting`` is ``SAMPLER,STEPS,GRID,GUIDANCE[,LO,HI]`` (LO, HI: the guidance interval in sigma/alpha).
The run is loaded once, like ``flaxdiff eval`` does, and every setting draws the same labels with the same seed, so
the rows differ only in the sampling settings; the numbers are those ``flaxdiff eval RUN --sampler ... --per-class
N`` prints for the same flags.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from flaxdiff import metrics
from flaxdiff.pipeline import Pipeline

from _common import load_text


def parse_setting(text: str) -> dict:
    parts = text.split(",")
    if len(parts) not in (4, 6):
        raise argparse.ArgumentTypeError(f"--setting {text!r}: expected SAMPLER,STEPS,GRID,GUIDANCE[,LO,HI]")
    setting = {"sampler": parts[0], "steps": int(parts[1]), "grid": parts[2], "guidance_scale": float(parts[3]),
               "guidance_interval": None}
    if len(parts) == 6:
        setting["guidance_interval"] = (float(parts[4]), float(parts[5]))
    return setting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--setting", type=parse_setting, action="append", required=True)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true", help="sample the raw params instead of the EMA")
    args = parser.parse_args(argv)

    pipe = Pipeline.from_pretrained(args.run_dir, step=args.step, ema=False if args.no_ema else None)
    classifier = metrics.get_mnist_classifier(image_size=32)
    labels = np.repeat(np.arange(pipe.num_classes, dtype=np.int32), args.per_class)
    rows = []
    print(f"run {args.run_dir} step {pipe.step}{' raw params' if args.no_ema else ''}, {len(labels)} samples per setting")
    print(f"{'sampler':>10} {'steps':>5} {'grid':>15} {'w':>5} {'interval':>14} {'acc %':>6} {'FD':>7} {'s':>6}")
    for setting in args.setting:
        start = time.perf_counter()
        images = pipe.generate(labels=labels, seed=args.seed, output="float", **setting)
        seconds = time.perf_counter() - start
        scores = metrics.evaluate_class_conditional(images, labels, classifier)
        interval = setting["guidance_interval"]
        shown = "-" if interval is None else f"[{interval[0]:g}, {interval[1]:g}]"
        print(f"{setting['sampler']:>10} {setting['steps']:>5} {setting['grid']:>15} {setting['guidance_scale']:>5g} "
              f"{shown:>14} {100 * scores['class_accuracy']:6.1f} {scores['frechet_distance']:7.1f} {seconds:6.1f}",
              flush=True)
        rows.append({**setting, **scores, "seconds": seconds})
    print(f"load average {load_text(' ')}")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run_dir), "step": pipe.step, "per_class": args.per_class,
                                         "seed": args.seed, "ema": not args.no_ema, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
