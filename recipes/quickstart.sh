#!/usr/bin/env bash
# Create (or reuse) ./.venv, install ddil-cli, run the main job on the embedded default:
# the digits teacher distilled by PD + DDIL and by plain PD, sampled, evaluated, one table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
bash recipes/digits.sh "${OUT:-runs/digits}"
