#!/usr/bin/env bash
# Set up (idempotent), lint, then run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
venv=${VENV:-$root/.venv}
export PATH="$venv/bin:$PATH"
ruff check .
exec python -m pytest -q "$@"
