#!/usr/bin/env bash
# Create (or reuse) ./.venv, install ddil-cli with its test extra, run the test suite offline.
set -euo pipefail
# One torch thread: on 2 shared cores two threads spin against any other load (measured 40x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
