#!/usr/bin/env bash
# Create (or reuse) ./.venv, install ddil-cli, run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/quickstart}
.venv/bin/ddil sample --teacher gmm:ring:8 --teacher-steps 32 --num-per-prompt 64 --overwrite --out "$OUT/teacher"
echo "samples, grid.png and manifest.json are in $OUT/teacher"
