#!/usr/bin/env bash
# Runs the CPU benchmarks and writes bench/results/cpu-<date>.json (raw pytest-benchmark data),
# cpu-<date>.md (table + targets) and cpu-<date>.png (chart). Extra arguments go to pytest,
# e.g. `bench/run_cpu.sh -k gpt2` or `bench/run_cpu.sh --bench-budget 2`.
# Run it on a quiet machine: other processes on the same cores make the timings meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEM=bench/results/cpu-$(date +%F)
mkdir -p bench/results
"$PY" -m pytest bench/test_bench_ops.py --benchmark-only -q \
  --benchmark-json "$STEM.json" --benchmark-columns=median,rounds "$@"
"$PY" bench/report.py "$STEM.json" --out-md "$STEM.md" --out-png "$STEM.png"
echo "wrote $STEM.json, $STEM.md and $STEM.png"
