#!/usr/bin/env bash
# Runs every benchmark and rewrites BENCHMARKS.md from the results of this one run.
# Usage: scripts/bench.sh [load-generator flags, e.g. --clients 32 --seconds 5]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench engine -- --noplot
cargo bench --bench load -- --out target/bench-load.md "$@"
python3 scripts/bench_report.py > BENCHMARKS.md
echo "BENCHMARKS.md regenerated"
