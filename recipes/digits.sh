#!/usr/bin/env bash
# The main job: the embedded digits teacher (32 DDIM steps) distilled by PD to 4 steps, with DDIL
# and (plain) teacher-forced, then sampled and evaluated in the embedded feature space, ending in
# one table. About 4.5 minutes on 2 free CPU cores. Usage: recipes/digits.sh [OUT]   (env: UPDATES,
# PER_DIGIT, QUIET=1 for no progress bars). ddil picks its torch thread count itself (--threads).
set -euo pipefail
OUT=${1:-runs/digits}
UPDATES=${UPDATES:-360}          # per student, over the 3 halving stages 32 -> 16 -> 8 -> 4
PER_DIGIT=${PER_DIGIT:-100}      # samples per digit for evaluation (x 10 digits)
DDIL=${DDIL:-ddil}
QUIET=${QUIET:+--quiet}
mkdir -p "$OUT"

# A line per stage with the time so far and an estimate of what is left: each stage's expected
# seconds on 2 free cores at the default UPDATES and PER_DIGIT (its share of the timed run in
# docs/results.md; the two distillations run side by side), once the distill stage is done
# scaled by how fast this run has gone so far.
STAGE_COST=(5 140 105 13 13 3 3 3 1)
STAGE_INDEX=0
STAGE_DONE_COST=0
stage() {  # stage "what it does"
  local total=0 left=0 c i
  for c in "${STAGE_COST[@]}"; do total=$((total + c)); done
  for ((i = STAGE_INDEX; i < ${#STAGE_COST[@]}; i++)); do left=$((left + STAGE_COST[i])); done
  local estimate
  if [ "$STAGE_DONE_COST" -ge 100 ]; then  # the small first stage is mostly start-up: no basis to scale
    estimate=$((left * SECONDS / STAGE_DONE_COST))
  else
    estimate=$left
  fi
  printf '\n[%d/%d] %s  (elapsed %d:%02d, about %d:%02d left)\n' $((STAGE_INDEX + 1)) ${#STAGE_COST[@]} "$1" \
    $((SECONDS / 60)) $((SECONDS % 60)) $((estimate / 60)) $((estimate % 60))
  STAGE_DONE_COST=$((STAGE_DONE_COST + STAGE_COST[STAGE_INDEX]))
  STAGE_INDEX=$((STAGE_INDEX + 1))
}
SECONDS=0

# 1. Real data: sklearn's handwritten digits as image-caption shards (train / held-out).
stage "data: sklearn's digits as train / held-out shards"
[ -f "$OUT/data/digits.json" ] || python -m ddil_cli.data.digits --out "$OUT/data"
TRAIN="$OUT/data/train-{000000..000001}.tar"
HELDOUT="$OUT/data/heldout-000000.tar"

# 2. Distil: PD + DDIL (default prior schedule), then plain teacher-forced PD at equal updates.
# 16 rollouts every 40 updates: two collections per 120-update stage (the default schedule stops
# collecting at 60% of a stage), 3.1% of training time; every 30 made three (4.6%) and tied PD
# on every metric just the same (5 paired seeds each, docs/results.md, "Overhead").
COMMON=(--method pd --teacher embedded:digits --data "$TRAIN" --teacher-steps 32 --steps 4
        --max-updates "$UPDATES" --batch-size 32 --lr 1e-4 --collect-every 40 --rollouts-per-collect 16 $QUIET)
# The two students train at once, one torch thread each (ddil's default on 2 cores): plain PD in
# the background (its log in $OUT/pd-distill.log), PD + DDIL in the foreground with its bars.
stage "distill: PD + DDIL (shown) and plain teacher-forced PD (background), 32 -> 4 steps, $UPDATES updates each"
$DDIL distill "${COMMON[@]}" --prior data=1 --out "$OUT/pd" --overwrite --quiet > "$OUT/pd-distill.log" 2>&1 &
PLAIN_PID=$!
trap 'kill $PLAIN_PID 2>/dev/null || true' EXIT
$DDIL distill "${COMMON[@]}" --out "$OUT/pd-ddil" --overwrite
if ! wait $PLAIN_PID; then
  echo "the plain PD distillation failed:" >&2; cat "$OUT/pd-distill.log" >&2; exit 1
fi
trap - EXIT

# 3. Sample: the teacher at 32 steps, each student at 4; the same prompts and seeds.
PROMPTS="$OUT/prompts.txt"
python -c "from ddil_cli.data.digits import digit_prompt; print('\n'.join(digit_prompt(d) for d in range(10)))" > "$PROMPTS"
S=(--teacher embedded:digits --prompts "$PROMPTS" --num-per-prompt "$PER_DIGIT" --batch-size 250 --overwrite $QUIET)
stage "sample: the teacher, 32 steps, $((10 * PER_DIGIT)) digits"
$DDIL sample "${S[@]}" --teacher-steps 32 --out "$OUT/samples/teacher"
stage "sample: PD + DDIL student, 4 steps"
$DDIL sample "${S[@]}" --student "$OUT/pd-ddil/student" --steps 4 --teacher-steps 32 --out "$OUT/samples/pd-ddil"
stage "sample: PD student, 4 steps"
$DDIL sample "${S[@]}" --student "$OUT/pd/student" --steps 4 --teacher-steps 32 --out "$OUT/samples/pd"

# 4. Evaluate against the held-out digits in the embedded classifier's feature space.
for name in teacher pd-ddil pd; do
  stage "evaluate: $name against the held-out digits"
  $DDIL evaluate --samples "$OUT/samples/$name" --reference "$HELDOUT" --features embedded:digits \
    --metrics fid,pr,dc,clip --out "$OUT/eval/$name" --overwrite --quiet  # its table would repeat the final one
done

# 5. One table.
stage "table"
python "$(dirname "$0")/table.py" "teacher, 32 steps=$OUT/eval/teacher" \
  "PD + DDIL, 4 steps=$OUT/eval/pd-ddil" "PD, 4 steps=$OUT/eval/pd" | tee "$OUT/table.md"
printf '\ndone in %d:%02d; outputs in %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$OUT"
