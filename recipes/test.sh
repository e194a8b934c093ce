#!/usr/bin/env bash
# Create (or reuse) ./.venv, install ddil-cli with its test extra, run the test suite offline.
# Torch threads: tests/conftest.py applies ddil's default (cli/common.py default_threads).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source recipes/disk-check.sh
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
