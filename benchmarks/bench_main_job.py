"""The main job, timed end to end and scored: this default against an earlier default, back to back.

    python benchmarks/bench_main_job.py [--root runs/bench_main_job] [--baseline configs/mnist_unet.json] [--per-class 50]

Runs ``python training.py --workdir ROOT/default`` (no flags: the current defaults) and then ``python training.py
--config BASELINE --workdir ROOT/baseline`` (the previous default, kept as a config file) as separate processes on
the same machine, one after the other, and times each whole process (imports, data, compile, training, checkpoints,
preview grid). Each run is then scored by ``flaxdiff eval RUN --per-class N`` with no sampling flags, i.e. with the
sampling settings saved in the run. Prints one row per run (wall seconds, class accuracy, Fréchet distance) and the
wall-time ratio, with the load average before and after each job; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import load_text

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], log: Path) -> tuple[float, str, str]:
    before = load_text(' ')
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited with {code}; see {log}")
    return wall, before, load_text(' ')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/bench_main_job"),
                        help="directory for the two run directories and logs (relative paths: to the repository)")
    parser.add_argument("--baseline", type=Path, default=REPO / "configs" / "mnist_unet.json",
                        help="config file of the run to compare with (default: the previous default, the U-Net)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.root = args.root if args.root.is_absolute() else REPO / args.root

    args.root.mkdir(parents=True, exist_ok=True)
    jobs = [("default", [])]
    if not args.skip_baseline:
        baseline = args.baseline.resolve()
        shown = baseline.relative_to(REPO) if baseline.is_relative_to(REPO) else baseline
        jobs.append(("baseline", ["--config", str(shown)]))   # training.py runs in the repository
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, load average {load_text(' ')}")
    rows = []
    for name, flags in jobs:
        run_dir = args.root / name
        wall, before, after = timed([sys.executable, "training.py", "--workdir", str(run_dir), "--overwrite", *flags],
                                    args.root / f"{name}_train.log")
        print(f"{name}: training.py {wall:.1f} s wall (load average {before} -> {after})", flush=True)
        rows.append({"run": name, "flags": flags, "wall_s": wall, "load_before": before, "load_after": after})
    for row in rows:
        out = args.root / f"{row['run']}_eval.json"
        subprocess.run([sys.executable, "-m", "flaxdiff.cli", "eval", str(args.root / row["run"]), "--per-class",
                        str(args.per_class), "--out", str(out), "--overwrite"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        scores = json.loads(out.read_text())
        row.update({key: scores[key] for key in ("class_accuracy", "frechet_distance", "sampler", "steps", "grid",
                                                  "guidance_scale", "guidance_interval") if key in scores})
    print(f"\n{'run':>9} {'wall s':>7} {'acc %':>6} {'FD':>6}  sampling")
    for row in rows:
        print(f"{row['run']:>9} {row['wall_s']:7.1f} {100 * row['class_accuracy']:6.1f} {row['frechet_distance']:6.1f}"
              f"  {row.get('sampler')} {row.get('steps')} {row.get('grid')} w={row.get('guidance_scale')}"
              f" interval={row.get('guidance_interval')}")
    if len(rows) == 2:
        print(f"wall-time ratio default / baseline: {rows[0]['wall_s'] / rows[1]['wall_s']:.3f}")
    print(f"load average {load_text(' ')}")
    if args.json:
        args.json.write_text(json.dumps({"per_class": args.per_class, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
