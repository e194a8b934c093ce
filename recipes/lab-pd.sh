#!/usr/bin/env bash
# The Gaussian-mixture lab chain: plain PD and PD + DDIL students, their samples, exact metrics.
# Runs on a CPU in a few minutes. Usage: recipes/lab-pd.sh [OUT]
set -euo pipefail
OUT=${1:-runs/lab-pd}
SPEC=${SPEC:-gmm:ring:8}
COMMON=(--method pd --teacher "$SPEC" --steps 4 --teacher-steps 16 --max-updates 3000 --batch-size 256 --lr 1e-3)
ddil distill "${COMMON[@]}" --prior data=1 --out "$OUT/pd" --overwrite
ddil distill "${COMMON[@]}" --out "$OUT/ddil" --overwrite
ddil sample --teacher "$SPEC" --teacher-steps 16 --num-per-prompt 256 --out "$OUT/samples/teacher" --overwrite --quiet
for name in pd ddil; do
  ddil sample --teacher "$SPEC" --student "$OUT/$name/student" --steps 4 --teacher-steps 16 \
    --num-per-prompt 256 --out "$OUT/samples/$name" --overwrite --quiet
done
ddil evaluate --samples "$OUT/samples/teacher" --reference "$SPEC" --out "$OUT/eval/teacher" --overwrite
for name in pd ddil; do
  ddil evaluate --samples "$OUT/samples/$name" --reference "$SPEC" --out "$OUT/eval/$name" --overwrite \
    --compare "$OUT/eval/teacher/metrics.json"
done
