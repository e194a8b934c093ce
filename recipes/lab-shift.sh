#!/usr/bin/env bash
# The covariate-shift picture of the Gaussian-mixture lab (docs/covariate-shift.md): a plain PD
# student (teacher-forced, --prior data=1) and a PD + DDIL student (default prior schedule), both
# 16 -> 8 -> 4 steps with the same updates, then `ddil covariate-shift` on them. CPU, about 2 minutes.
# Rerunning reuses the students and every finished setting.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DDIL=${DDIL:-.venv/bin/ddil}
OUT=${OUT:-runs/lab-shift}
TEACHER=${TEACHER:-gmm:ring:8}
TRAIN=(--method pd --teacher "$TEACHER" --steps 4 --teacher-steps 16 --max-updates 3000 --batch-size 256 --lr 1e-3 --quiet)
[ -d "$OUT/pd/student" ] || "$DDIL" distill "${TRAIN[@]}" --prior data=1 --out "$OUT/pd"
[ -d "$OUT/ddil/student" ] || "$DDIL" distill "${TRAIN[@]}" --out "$OUT/ddil"
"$DDIL" covariate-shift --teacher "$TEACHER" --teacher-steps 16 --student "$OUT/pd/student" --student-label pd \
    --compare-student "pd-ddil=$OUT/ddil/student" --compare-student "ddim4=$TEACHER" --shift-samples 4000 --out "$OUT/shift"
echo "table.md, table.csv, direct.csv and plots/ are in $OUT/shift"
