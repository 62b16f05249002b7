#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install the project with pinned, known-good dependencies.
# Idempotent: a second run with unchanged setup files only checks a stamp.
# Env: VENV (default .venv in the repo root), PYTHON (default python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-$root/.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
vpy="$venv/bin/python"
stamp="$venv/.setup-stamp"
want=$(cat setup.py requirements-lock.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$vpy" -c "import torch, deepspeed, data_prep" 2>/dev/null; then
  exit 0
fi
"$vpy" -m pip install -q --upgrade pip
# torch first: the local CPU wheel where no torch exists; a cluster's own CUDA torch is kept.
"$vpy" -c "import torch" 2>/dev/null || "$vpy" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$vpy" -m pip install -q -c requirements-lock.txt -e ".[dev,embed,logging]"
echo "$want" > "$stamp"
echo "setup: environment ready in $venv"
