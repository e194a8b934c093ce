#!/usr/bin/env bash
# The main job: the embedded digits teacher (32 DDIM steps) distilled by PD to 4 steps, with DDIL
# and (plain) teacher-forced, then sampled and evaluated in the embedded feature space, ending in
# one table. About 10 minutes on 2 CPU cores. Usage: recipes/digits.sh [OUT]   (env: UPDATES, PER_DIGIT)
set -euo pipefail
# One torch thread: on 2 shared cores two threads spin against any other load (measured 40x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-runs/digits}
UPDATES=${UPDATES:-360}          # per student, over the 3 halving stages 32 -> 16 -> 8 -> 4
PER_DIGIT=${PER_DIGIT:-100}      # samples per digit for evaluation (x 10 digits)
DDIL=${DDIL:-ddil}
mkdir -p "$OUT"

# 1. Real data: sklearn's handwritten digits as image-caption shards (train / held-out).
[ -f "$OUT/data/digits.json" ] || python -m ddil_cli.data.digits --out "$OUT/data"
TRAIN="$OUT/data/train-{000000..000001}.tar"
HELDOUT="$OUT/data/heldout-000000.tar"

# 2. Distil: PD + DDIL (default prior schedule), then plain teacher-forced PD at equal updates.
COMMON=(--method pd --teacher embedded:digits --data "$TRAIN" --teacher-steps 32 --steps 4
        --max-updates "$UPDATES" --batch-size 32 --lr 1e-4 --collect-every 20 --rollouts-per-collect 16 --quiet)
$DDIL distill "${COMMON[@]}" --out "$OUT/pd-ddil" --overwrite
$DDIL distill "${COMMON[@]}" --prior data=1 --out "$OUT/pd" --overwrite

# 3. Sample: the teacher at 32 steps, each student at 4; the same prompts and seeds.
PROMPTS="$OUT/prompts.txt"
python -c "from ddil_cli.data.digits import digit_prompt; print('\n'.join(digit_prompt(d) for d in range(10)))" > "$PROMPTS"
S=(--teacher embedded:digits --prompts "$PROMPTS" --num-per-prompt "$PER_DIGIT" --batch-size 250 --overwrite --quiet)
$DDIL sample "${S[@]}" --teacher-steps 32 --out "$OUT/samples/teacher"
$DDIL sample "${S[@]}" --student "$OUT/pd-ddil/student" --steps 4 --teacher-steps 32 --out "$OUT/samples/pd-ddil"
$DDIL sample "${S[@]}" --student "$OUT/pd/student" --steps 4 --teacher-steps 32 --out "$OUT/samples/pd"

# 4. Evaluate against the held-out digits in the embedded classifier's feature space.
for name in teacher pd-ddil pd; do
  $DDIL evaluate --samples "$OUT/samples/$name" --reference "$HELDOUT" --features embedded:digits \
    --metrics fid,pr,dc,clip --out "$OUT/eval/$name" --overwrite --quiet
done

# 5. One table.
python "$(dirname "$0")/table.py" "teacher, 32 steps=$OUT/eval/teacher" \
  "PD + DDIL, 4 steps=$OUT/eval/pd-ddil" "PD, 4 steps=$OUT/eval/pd" | tee "$OUT/table.md"
