#!/usr/bin/env bash
# Install the project with pinned, known-good dependencies, reusing the torch the environment already has.
#   bash scripts/setup.sh          what the commands need (scripts/demo.sh)
#   bash scripts/setup.sh --embed  also the retrieval libraries of bert-embed (scripts/demo_retrieval.sh)
#   bash scripts/setup.sh --dev    also the test and lint tools and the retrieval libraries (scripts/test.sh)
# Where: $VENV if set, else the active virtualenv ($VIRTUAL_ENV: a cluster's environment with its CUDA torch),
# else .venv in the repo root, created with --system-site-packages when $PYTHON already has torch (so the
# cluster's or the system's torch is used, not replaced). torch==$TORCH_VERSION (default 2.13.0, CPU) is
# installed only where no torch is importable. Idempotent: a second run with unchanged setup files only checks
# a stamp. Env: VENV, PYTHON (default python3), TORCH_VERSION.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
extras=logging
[ "${1:-}" = --embed ] && extras=embed,logging
[ "${1:-}" = --dev ] && extras=dev,embed,logging
venv=${VENV:-${VIRTUAL_ENV:-$root/.venv}}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  # a system, conda or module python with torch: the venv sees its packages, torch included (a venv's own
  # python would lend its base interpreter's packages instead: activate that venv to install into it)
  if "$py" -c "import sys, torch; sys.exit(sys.prefix != sys.base_prefix)" 2>/dev/null; then
    echo "setup: $py has torch $("$py" -c 'import torch; print(torch.__version__)'); the venv reuses it"
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
vpy="$venv/bin/python"
stamp="$venv/.setup-stamp"
want=$(cat setup.py requirements-lock.txt | sha256sum | cut -d' ' -f1)
check="import torch, deepspeed, data_prep"
[ "$extras" = dev,embed,logging ] && check="$check, pytest"
if [ -f "$stamp" ] && grep -qx "$want $extras\|$want dev,embed,logging" "$stamp" && "$vpy" -c "$check" 2>/dev/null; then
  exit 0
fi
# torch first: the local CPU wheel where no torch exists; a cluster's own CUDA torch is kept.
"$vpy" -c "import torch" 2>/dev/null || "$vpy" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$vpy" -m pip install -q -c requirements-lock.txt -e ".[$extras]"
echo "$want $extras" > "$stamp"
echo "setup: environment ready in $venv (extras: $extras; torch $("$vpy" -c 'import torch; print(torch.__version__)'))"
