#!/usr/bin/env bash
# The full-size GPU check in one go, under 8 minutes on one H100 or H200: seconds per update, MFU
# from bench/ledger.py's FLOPs and peak GPU memory for PD and LCM at SD 1.5 size (batch 8, 512 px,
# bf16), DMD2 at SSD-1B size (batch 7, 10 critic updates) and DMD2 at SDXL size with LoRA.
# Random weights built on the device (bench/gpu_check.py); nothing is downloaded.
#
# A machine without diffusers / webdataset: first, where pip works, put their wheels in .whl/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata==8.7.0
# and take .whl/ along; this script installs them into /tmp/site.
#
#   bash bench/gpu_check.sh                    # on the GPU machine; writes gpu_check.json into OUT (default .)
#   bash bench/gpu_check.sh --tiny --device cpu   # the CPU dry run at the tiny size
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-.}
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
# each case in its own process: one case's memory cannot inflate the next one's peak
LEDGER=reports/2026-12-06-ledger.json  # the meta-device counts (python bench/ledger.py --json ...)
CASE_TIMEOUT=${CASE_TIMEOUT:-150}      # seconds a case may take (a CPU dry run needs more)
for case in 1 2 3 4; do
  timeout "$CASE_TIMEOUT" $PY bench/gpu_check.py --cases "$case" --ledger-json "$LEDGER" \
    --json "$OUT/gpu_check-$case.json" "$@" || echo "| case $case | failed or over $CASE_TIMEOUT s |"
done
$PY - "$OUT" <<'PYEOF'
import json, sys, glob, importlib.util
spec = importlib.util.spec_from_file_location("gpu_check", "bench/gpu_check.py")
check = importlib.util.module_from_spec(spec); spec.loader.exec_module(check)
rows = [r for f in sorted(glob.glob(f"{sys.argv[1]}/gpu_check-*.json")) for r in json.load(open(f))]
print("\nall cases\n" + check.format_table(rows))
PYEOF
