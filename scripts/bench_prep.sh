#!/usr/bin/env bash
# Data preparation benchmark: bert-prep build vs raw tokenizers, 1 and 2 workers, the same text as Parquet,
# reader open/access. `--formats-only --repeats N`: just N txt/Parquet build pairs, alternating, with ratios.
# Usage: scripts/bench_prep.sh [--input FILE...] [--workdir DIR] [--workers 1 2 4] [--formats-only] ...  (see --help)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-$root/.venv}
[ -x "$venv/bin/python" ] && export PATH="$venv/bin:$PATH"
exec python -m data_prep.bench "$@"
