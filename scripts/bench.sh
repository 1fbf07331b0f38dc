#!/usr/bin/env bash
# Runs every benchmark and rewrites BENCHMARKS.md from the results of this one run.
# Usage: scripts/bench.sh [load-generator flags, e.g. --clients 32 --seconds 5]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench engine -- --noplot
cargo bench --bench load -- --out target/bench-load.md "$@"
cargo bench --bench erasure -- --out target/bench-erasure.md
# Ten minutes at 70% of capacity beside a hostile client (SOAK_MINUTES to change it).
cargo bench --bench load -- --soak-minutes "${SOAK_MINUTES:-10}" --out target/bench-soak.md
# The SQLCipher peer needs Debian's libsqlcipher-dev; install it if we may.
if ! pkg-config --exists sqlcipher 2>/dev/null && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsqlcipher-dev pkg-config >/dev/null
fi
if pkg-config --exists sqlcipher 2>/dev/null; then
  cargo bench --features peer-sqlcipher --bench peer -- --out target/bench-peer.md
else
  echo "libsqlcipher-dev missing: skipping the SQLCipher peer" >&2
  rm -f target/bench-peer.md
fi
python3 scripts/bench_report.py > BENCHMARKS.md
echo "BENCHMARKS.md regenerated"
