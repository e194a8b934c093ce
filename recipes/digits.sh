#!/usr/bin/env bash
# The main job: the embedded digits teacher (32 DDIM steps) distilled by PD to 4 steps, with DDIL
# and (plain) teacher-forced, then sampled and evaluated in the embedded feature space, ending in
# one table. Usage: recipes/digits.sh [OUT]   (env: UPDATES, PER_DIGIT, QUIET=1 for no progress
# bars). ddil picks its torch thread count itself (--threads).
#
# Three independent chains run at once so that every core stays busy (on 2 cores the teacher's
# samples used to run alone on one of them, a third of the job):
#   PD + DDIL: distill -> sample -> evaluate   (foreground, with its progress bars)
#   plain PD:  distill -> sample -> evaluate   (background, log in $OUT/logs/pd.log)
#   teacher:   sample -> evaluate              (background, log in $OUT/logs/teacher.log)
# Every command's output is the same as when they ran one after the other (seeds come from the
# sample index, not from what else runs), so the table is too, except seconds per image.
set -euo pipefail
OUT=${1:-runs/digits}
UPDATES=${UPDATES:-360}          # per student, over the 3 halving stages 32 -> 16 -> 8 -> 4
PER_DIGIT=${PER_DIGIT:-100}      # samples per digit for evaluation (x 10 digits)
DDIL=${DDIL:-ddil}
QUIET=${QUIET:+--quiet}
mkdir -p "$OUT/logs"

# A line per foreground stage with the time so far and an estimate of what is left: each stage's
# expected seconds on 2 free cores at the default UPDATES and PER_DIGIT (with the background
# chains beside it), once the distill stage is done scaled by how fast this run has gone so far.
# Estimated from the sequential job's stage times on 2 free cores (distill 125 s, the teacher's
# samples 112 s) with the three chains sharing the cores: not yet measured this way.
STAGE_COST=(3 183 12 2 1 1)
STAGE_INDEX=0
STAGE_DONE_COST=0
stage() {  # stage "what it does"
  local left=0 i estimate
  for ((i = STAGE_INDEX; i < ${#STAGE_COST[@]}; i++)); do left=$((left + STAGE_COST[i])); done
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
BACKGROUND=()  # "name:pid" of each background chain
RUN=           # empty in the foreground; `killable` in a background chain
killable() {  # run a command as a child this chain can stop: a trap runs only between commands
  "$@" & CHILD=$!
  wait "$CHILD"
}
background() {  # background NAME FUNCTION: run FUNCTION in a subshell, its output in $OUT/logs/NAME.log
  ( set -euo pipefail; RUN=killable CHILD=
    trap 'kill "$CHILD" 2>/dev/null; exit 143' TERM  # stop its command too when the job ends early
    "$2" ) > "$OUT/logs/$1.log" 2>&1 &
  BACKGROUND+=("$1:$!")
}
wait_background() {  # wait for every background chain; a failed one ends the job with its log
  local entry
  for entry in "${BACKGROUND[@]}"; do
    if ! wait "${entry#*:}"; then
      echo "the ${entry%%:*} chain failed ($OUT/logs/${entry%%:*}.log):" >&2
      cat "$OUT/logs/${entry%%:*}.log" >&2; exit 1
    fi
  done
  BACKGROUND=()
}
trap 'for e in "${BACKGROUND[@]}"; do kill "${e#*:}" 2>/dev/null || true; done' EXIT
SECONDS=0

PROMPTS="$OUT/prompts.txt"
TRAIN="$OUT/data/train-{000000..000001}.tar"
HELDOUT="$OUT/data/heldout-000000.tar"
S=(--teacher embedded:digits --prompts "$PROMPTS" --num-per-prompt "$PER_DIGIT" --batch-size 250 --overwrite)
# 16 rollouts every 40 updates: two collections per 120-update stage (the default schedule stops
# collecting at 60% of a stage), 3.1% of training time; every 30 made three (4.6%) and tied PD
# on every metric just the same (5 paired seeds each, reports/2026-11-27-results.md,
# "Overhead").
COMMON=(--method pd --teacher embedded:digits --data "$TRAIN" --teacher-steps 32 --steps 4
        --max-updates "$UPDATES" --batch-size 32 --lr 1e-4 --collect-every 40 --rollouts-per-collect 16)
evaluate() {  # evaluate NAME: its samples against the held-out digits, in the embedded feature space
  $RUN $DDIL evaluate --samples "$OUT/samples/$1" --reference "$HELDOUT" --features embedded:digits \
    --metrics fid,pr,dc,clip --out "$OUT/eval/$1" --overwrite --quiet  # its table would repeat the final one
}
after_teacher_evaluation() {  # evaluate NAME once the teacher's evaluation has cached the held-out
  # digits' statistics: two evaluations computing the same reference at once would race on that cache
  while [ ! -d "$OUT/eval/teacher" ] && kill -0 "$TEACHER_CHAIN" 2>/dev/null; do sleep 1; done
  evaluate "$1"
}
teacher_chain() {  # the teacher at 32 steps: it needs only the prompts, so it starts first
  $RUN $DDIL sample "${S[@]}" --quiet --teacher-steps 32 --out "$OUT/samples/teacher"
  while [ ! -f "$OUT/data/digits.json" ]; do sleep 1; done  # the held-out shard, written by the data stage
  evaluate teacher
}
plain_pd_chain() {  # plain teacher-forced PD at equal updates, then its student at 4 steps
  $RUN $DDIL distill "${COMMON[@]}" --prior data=1 --out "$OUT/pd" --overwrite --quiet
  $RUN $DDIL sample "${S[@]}" --quiet --student "$OUT/pd/student" --steps 4 --teacher-steps 32 --out "$OUT/samples/pd"
  after_teacher_evaluation pd
}

# 1. Real data: sklearn's digits as image-caption shards (train / held-out); beside it, the
# teacher's samples (the same prompts and seeds as the students').
stage "data: sklearn's digits as train / held-out shards; the teacher's $((10 * PER_DIGIT)) samples start beside it"
python -c "from ddil_cli.data.digits import digit_prompt; print('\n'.join(digit_prompt(d) for d in range(10)))" > "$PROMPTS"
background teacher teacher_chain
TEACHER_CHAIN=${BACKGROUND[0]#*:}
[ -f "$OUT/data/digits.json" ] || python -m ddil_cli.data.digits --out "$OUT/data"

# 2. Distil: PD + DDIL (default prior schedule) here, plain teacher-forced PD in the background.
stage "distill: PD + DDIL, 32 -> 4 steps, $UPDATES updates (beside it: plain PD, then its samples; the teacher's samples)"
background pd plain_pd_chain
$DDIL distill "${COMMON[@]}" $QUIET --out "$OUT/pd-ddil" --overwrite

# 3. Sample the PD + DDIL student at 4 steps; 4. evaluate it against the held-out digits.
stage "sample: PD + DDIL student, 4 steps"
$DDIL sample "${S[@]}" $QUIET --student "$OUT/pd-ddil/student" --steps 4 --teacher-steps 32 --out "$OUT/samples/pd-ddil"
stage "evaluate: PD + DDIL against the held-out digits"
after_teacher_evaluation pd-ddil
stage "wait: the plain PD and teacher chains (logs in $OUT/logs/)"
wait_background

# 5. One table.
stage "table"
python "$(dirname "$0")/table.py" "teacher, 32 steps=$OUT/eval/teacher" \
  "PD + DDIL, 4 steps=$OUT/eval/pd-ddil" "PD, 4 steps=$OUT/eval/pd" | tee "$OUT/table.md"
printf '\ndone in %d:%02d; outputs in %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$OUT"
