"""Sampling cost: our compiled loop against FlaxDiff 0.2.11's sampler loop, same network, same params, same steps.

Both sides run in one process of the peer venv (benchmarks/flaxdiff_peer.py): FlaxDiff's
Unet(feature_depths=(64, 128, 256), num_res_blocks=2, emb_features=256) is initialised once; FlaxDiff's
``DDIMSampler.generate_samples`` drives it (a Python loop: one jitted network call per step, the update run op by
op), and ``flaxdiff.samplers.sample_model(..., sampler="ddim")`` drives the same ``Unet.apply`` with the same params
(the whole grid in one lax.scan under one jit). DDIM, 20 steps (20 network evaluations on both sides), batch 16,
32x32x3, cosine schedule (1000 steps), epsilon prediction. Then both loops drive a network that costs nothing
(F = 0): what remains is the sampler's own per-step overhead. Reported per side:

    ms/step          = median wall time of one full call / steps
    marginal ms/step = (t(slope_steps) - t(steps)) / (slope_steps - steps)      (zero network; fixed cost removed)

"ours" calls sample_model(grid="uniform") (the grid is rebuilt on every call); "ours, pre-built grid" passes the
grid as an array (only the compiled loop remains). Usage:

    python benchmarks/bench_sampling_cost.py --peer-venv $PEER_VENV [--json docs/sampling_cost.json] \
        [--plot docs/sampling_cost.png]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flaxdiff_peer  # noqa: E402
from _common import load_text  # noqa: E402


def environment_line() -> str:
    import flax
    import jax

    load = load_text()
    return (f"environment: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average {load}")


def summarise(raw: dict) -> list[dict]:
    steps, slope = raw["steps"], raw["slope_steps"]
    rows = []
    for label, key in (("FlaxDiff 0.2.11 loop", "flaxdiff_0_2_11_s"), ("ours, sample_model(grid='uniform')", "ours_s"),
                       ("ours, pre-built grid", "ours_pregrid_s")):
        unet = raw["unet"][f"{key}@{steps}"]
        zero, zero_long = raw["zero"][f"{key}@{steps}"], raw["zero"][f"{key}@{slope}"]
        rows.append({"loop": label, "unet_total_s": unet, "unet_ms_per_step": 1e3 * unet / steps,
                     "zero_ms_per_step": 1e3 * zero / steps,
                     "zero_marginal_ms_per_step": 1e3 * (zero_long - zero) / (slope - steps)})
    peer = rows[0]
    for row in rows:
        row["unet_speedup_vs_flaxdiff"] = peer["unet_total_s"] / row["unet_total_s"]
    return rows


def print_table(raw: dict, rows: list[dict]) -> None:
    print(f"\nFlaxDiff Unet {raw['unet_config']} ({raw['params'] / 1e6:.2f}M params), DDIM {raw['steps']} steps "
          f"(NFE: FlaxDiff {raw['unet']['peer_nfe']}, ours {raw['unet']['ours_nfe@' + str(raw['steps'])]}), "
          f"batch {raw['batch']}, {raw['size']}x{raw['size']}x3; load average at start "
          f"{', '.join(f'{v:.2f}' for v in raw['environment']['load_avg'])}, at end "
          f"{', '.join(f'{v:.2f}' for v in raw['load_avg_end'])}")
    print(f"{'loop':38s} {'Unet: s/call':>12s} {'ms/step':>9s} {'speed-up':>9s} {'F=0: ms/step':>13s} "
          f"{'marginal ms/step':>17s}")
    for row in rows:
        print(f"{row['loop']:38s} {row['unet_total_s']:12.3f} {row['unet_ms_per_step']:9.2f} "
              f"{row['unet_speedup_vs_flaxdiff']:8.2f}x {row['zero_ms_per_step']:13.3f} "
              f"{row['zero_marginal_ms_per_step']:17.4f}")
    print(f"(marginal = (t({raw['slope_steps']} steps) - t({raw['steps']} steps)) / {raw['slope_steps'] - raw['steps']},"
          f" zero network)", flush=True)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [row["loop"].replace(", ", ",\n") for row in rows]
    for ax, key, title in ((axes[0], "unet_ms_per_step", "FlaxDiff Unet (9.31M), ms per step"),
                           (axes[1], "zero_ms_per_step", "zero network: loop overhead, ms per step")):
        values = [row[key] for row in rows]
        bars = ax.bar(range(len(rows)), values, color=["#888888", "#3b75af", "#1f4e79"])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-venv", default=None, help="venv with flaxdiff==0.2.11 (or FLAXDIFF_PEER_VENV)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slope-steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--unet", default="medium", choices=sorted(flaxdiff_peer.PEER_UNETS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    print(environment_line(), flush=True)
    python = flaxdiff_peer.find_peer_python(args.peer_venv)
    if python is None:
        print("this benchmark drives FlaxDiff's Unet on both sides, so it needs the peer venv; nothing measured.")
        return
    raw = flaxdiff_peer.run_peer(python, "sampling", {"batch": args.batch, "steps": args.steps, "size": args.size,
                                                      "repeats": args.repeats, "unet": args.unet,
                                                      "slope_steps": args.slope_steps})
    env = raw["environment"]
    print(f"peer process: jax {env['jax']}, flax {env['flax']}, FlaxDiff {flaxdiff_peer.PEER_VERSION} + this "
          f"repository's flaxdiff, {env['devices']} device(s)", flush=True)
    rows = summarise(raw)
    print_table(raw, rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"raw": raw, "summary": rows}, handle, indent=2)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
