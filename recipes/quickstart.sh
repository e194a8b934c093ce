#!/usr/bin/env bash
# Create (or reuse) ./.venv, install ddil-cli, run the main job on the embedded default:
# the digits teacher distilled by PD + DDIL and by plain PD, sampled, evaluated, one table.
# It prints a line per step and per stage, with an estimate of what is left (docs/install.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SECONDS=0
source recipes/disk-check.sh
if [ -x .venv/bin/python ]; then
  echo "[install] reusing ./.venv"
else
  echo "[install] creating ./.venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
echo "[install] pip install -e . (the first time this downloads torch and friends: a few minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
# one line per package pip fetches (cut to 100 characters by grep -o itself: a second filter
# such as cut would buffer its output when it is not a terminal), so a slow download shows as
# progress, not as a hang
set +o pipefail
.venv/bin/python -m pip install -e . | { grep --line-buffered -oE '^(Collecting|Successfully installed).{0,80}'; true; }
status=${PIPESTATUS[0]}
set -o pipefail
[ "$status" -eq 0 ] || { echo "error: pip install failed (above); fix that and rerun" >&2; exit 1; }
printf '[install] done in %d:%02d\n' $((SECONDS / 60)) $((SECONDS % 60))
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
bash recipes/digits.sh "${OUT:-runs/digits}"
