"""Sampling throughput of `flaxdiff eval` at a run's saved settings, next to the run's training throughput.

    python benchmarks/bench_eval_sampling.py RUN_DIR [--per-class 50] [--repeats 2] [--json out.json]

Loads the run like `flaxdiff eval` does (its `sample` section: sampler, steps, grid, guidance, EMA), draws
``10 x per_class`` class-conditional images in batches of ``--batch-size``, and prints images/s of every repeat (the
first includes compilation; later repeats must compile nothing: the number of XLA compilations per repeat is
printed too). Training images/s is read from the run's ``metrics.jsonl`` (the median of the logged intervals after
the first, which holds the compile). The load average is printed with the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from flaxdiff.pipeline import Pipeline

from _common import load_average


def training_images_per_s(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [row["train/images_per_s"] for row in map(json.loads, path.read_text().splitlines())
             if "train/images_per_s" in row]
    return float(statistics.median(rates[1:])) if len(rates) > 1 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    pipe = Pipeline.from_pretrained(args.run_dir)
    if pipe.num_classes == 0:
        print("the run is not class-conditional", file=sys.stderr)
        return 2
    labels = np.repeat(np.arange(pipe.num_classes, dtype=np.int32), args.per_class)
    compiles: list[float] = []

    def listener(event: str, duration: float, **kwargs: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    rows = []
    for repeat in range(args.repeats):
        before = len(compiles)
        start = time.perf_counter()
        pipe.generate(labels=labels, seed=repeat, output="float", batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        rows.append({"repeat": repeat, "seconds": seconds, "images_per_s": len(labels) / seconds,
                     "compilations": len(compiles) - before})
    jax.monitoring.unregister_event_duration_listener(listener)
    settings = pipe.sample.to_dict()
    result = {"run_dir": str(args.run_dir), "images": int(len(labels)), "batch_size": args.batch_size,
              "sample": settings, "repeats": rows, "training_images_per_s": training_images_per_s(args.run_dir),
              "load_average": load_average(), "devices": [str(d) for d in jax.devices()]}
    print(f"sample settings: {settings}")
    for row in rows:
        print(f"repeat {row['repeat']}: {row['seconds']:.2f} s, {row['images_per_s']:.1f} images/s, "
              f"{row['compilations']} compilations")
    print(f"training: {result['training_images_per_s']} images/s (median of the run's logged intervals)")
    print(f"load average: {result['load_average']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
