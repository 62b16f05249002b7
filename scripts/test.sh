#!/usr/bin/env bash
# Set up (idempotent), lint, then run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh --dev  # the test and lint tools too
venv=${VENV:-${VIRTUAL_ENV:-$root/.venv}}  # where setup.sh installed
export PATH="$venv/bin:$PATH"
ruff check .
exec python -m pytest -q "$@"
