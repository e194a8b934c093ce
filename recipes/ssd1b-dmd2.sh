#!/usr/bin/env bash
# SSD-1B, DMD2 + DDIL at the paper's settings: a 4-step generator (999, 749, 499, 249), batch 7,
# reflected thresholding, 10 critic updates per generator update, GAN head, priors
# student=0.5,teacher=0.5 (backward simulation + teacher states). For GPU users; NOT runnable in
# the project's CI (no GPU, no weights there). CI runs this same script end to end on a tiny random
# SDXL-architecture pipeline (tests/test_dmd2.py) by setting the variables below.
# Needs: the SSD-1B weights (a local folder or a cached hub id), image-caption webdataset shards
# for the GAN's real data, a prompts file (e.g. COCO-2017 captions, one per line).
set -euo pipefail
TEACHER=${TEACHER:-segmind/SSD-1B}
DATA=${DATA:?set DATA to image-caption webdataset shards (a brace pattern such as /data/laion/NNNNN.tar)}
PROMPTS=${PROMPTS:?set PROMPTS to a captions file, one per line}
OUT=${OUT:-runs/ssd1b-dmd2-ddil}
NPROC=${NPROC:-1}
LAUNCH=${LAUNCH:-accelerate launch --num_processes $NPROC $(command -v ddil)}  # the distill launcher
DDIL=${DDIL:-ddil}  # sample
BATCH=${BATCH:-7}                 # per process, the paper's
UPDATES=${UPDATES:-20000}         # generator updates
CRITIC_UPDATES=${CRITIC_UPDATES:-10}
TEACHER_STEPS=${TEACHER_STEPS:-32}  # the teacher's DDIM grid for its transitions in rollouts
COLLECT_EVERY=${COLLECT_EVERY:-250}
ROLLOUTS=${ROLLOUTS:-64}
NUM_PER_PROMPT=${NUM_PER_PROMPT:-1}
EXTRA=${EXTRA:---mixed-precision bf16 --gradient-checkpointing --checkpoint-every 1000 --tracker tensorboard}

# DMD2's SDXL settings: real score CFG 8, lr 5e-7 for generator and critic, GAN 5e-3 / 1e-2,
# grad clip 10; --threshold static:4 keeps every x0 (real, fake, generator) in the latents' range.
# Plain DMD2 (backward simulation only) for comparison: --prior student=1 --student-prob 1.
# shellcheck disable=SC2086
$LAUNCH distill --method dmd2 --teacher "$TEACHER" --data "$DATA" --prompts "$PROMPTS" \
  --generator-timesteps 999,749,499,249 --teacher-steps "$TEACHER_STEPS" \
  --real-guidance 8 --lr 5e-7 --critic-lr 5e-7 --critic-updates "$CRITIC_UPDATES" \
  --gan-weight 5e-3 --critic-gan-weight 1e-2 --max-grad-norm 10 \
  --prior student=0.5,teacher=0.5 --threshold static:4 \
  --batch-size "$BATCH" --max-updates "$UPDATES" \
  --collect-every "$COLLECT_EVERY" --rollouts-per-collect "$ROLLOUTS" --buffer-size 10000 \
  --out "$OUT" $EXTRA

# the generator samples with its own re-noising steps (its LCMScheduler) at the real guidance
# shellcheck disable=SC2086
$DDIL sample --teacher "$TEACHER" --student "$OUT/student" --steps 4 --teacher-steps "$TEACHER_STEPS" \
  --prompts "$PROMPTS" --num-per-prompt "$NUM_PER_PROMPT" --guidance 8 --batch-size 8 \
  --out "$OUT/samples" $(echo "$EXTRA" | grep -o -- '--device [a-z]*' || true) --quiet
