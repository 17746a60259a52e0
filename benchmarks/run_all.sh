#!/usr/bin/env bash
# Run every benchmark once and write its JSON (and plots) into docs/. Usage, from the repository root:
#   FLAXDIFF_PEER_VENV=$PEER_VENV benchmarks/run_all.sh [python]
# Without FLAXDIFF_PEER_VENV the FlaxDiff 0.2.11 side is skipped with a note (see benchmarks/README.md).
set -euo pipefail
PYTHON="${1:-python}"
cd "$(dirname "$0")/.."
echo "== uptime: $(uptime)"
"$PYTHON" benchmarks/bench_samplers.py --out docs/samplers_benchmark.json --plot docs/samplers_error_vs_nfe.png
echo "== uptime: $(uptime)"
"$PYTHON" benchmarks/bench_sampling_cost.py --repeats 3 --json docs/sampling_cost.json --plot docs/sampling_cost.png
echo "== uptime: $(uptime)"
"$PYTHON" benchmarks/bench_train.py --json docs/train_benchmark.json
echo "== uptime: $(uptime)"
"$PYTHON" benchmarks/bench_kernels.py --json docs/kernel_ceiling.json
echo "== uptime: $(uptime)"
"$PYTHON" benchmarks/bench_scaling.py --model unet-tiny --json docs/scaling_unet_tiny.json
echo "== uptime: $(uptime)"
"$PYTHON" benchmarks/bench_quality.py --json docs/quality_per_minute.json --plot docs/quality_per_minute.png
echo "== uptime: $(uptime)"
