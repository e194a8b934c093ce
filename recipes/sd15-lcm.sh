#!/usr/bin/env bash
# Stable Diffusion 1.5, latent consistency distillation (LCM) with DDIL, for GPU users.
# NOT runnable in the project's CI as written (no GPU, no weights there); tests/test_lcm.py runs
# this same command chain on a tiny random SD pipeline by setting the variables below.
# Settings: diffusers' LCM example for SD 1.5 (lr 1e-6, pseudo-Huber c 0.001, EMA target 0.95,
# no weight decay, batch 12; fp16 there, bf16 here by default) with the LCM paper's guidance range w in [3, 15] (standard CFG
# scale; the paper writes it [2, 14] in its w - 1 convention), 50 DDIM solver steps, 4-step
# student; DDIL: at the 10 timesteps its own 3/4/5-step LCM rollouts visit, half of the inputs
# are those rollouts' states (--ddil-mix matched, the default; docs/lcm.md).
# Needs: the SD 1.5 weights (a local folder or a cached hub id), image-caption webdataset shards
# (.jpg/.png + .txt), a prompts file (e.g. COCO-2017 5k captions) and, to evaluate, the metric
# weights (docs/evaluate.md).
set -euo pipefail
TEACHER=${TEACHER:-stable-diffusion-v1-5/stable-diffusion-v1-5}
PROMPTS=${PROMPTS:?set PROMPTS to a captions file, one per line}
OUT=${OUT:-runs/sd15-lcm-ddil}
NPROC=${NPROC:-1}
DDIL=${DDIL:-$(command -v ddil)}                 # the ddil entry point (a Python script)
LAUNCH=${LAUNCH:-accelerate launch --num_processes $NPROC}
PRIOR=${PRIOR:-data=0.5,student=0.5}             # data=1: plain LCM (teacher forcing)
MAX_UPDATES=${MAX_UPDATES:-20000}
BATCH_SIZE=${BATCH_SIZE:-12}
GRAD_ACCUM=${GRAD_ACCUM:-1}
COLLECT_EVERY=${COLLECT_EVERY:-250}
ROLLOUTS=${ROLLOUTS:-64}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}  # bf16: no GradScaler; fp16 works too (its overflows are skipped steps)
TRACKER=${TRACKER:-tensorboard}
NUM_PER_PROMPT=${NUM_PER_PROMPT:-1}
SAMPLE_BATCH=${SAMPLE_BATCH:-16}
EXTRA_FLAGS=${EXTRA_FLAGS:-}                     # e.g. --gradient-checkpointing, --device cpu
DATA_FLAGS=()
if [ -n "${DATA:-}" ]; then DATA_FLAGS=(--data "$DATA"); fi
case "$PRIOR" in *data*) [ -n "${DATA:-}" ] || { echo "error: PRIOR $PRIOR draws data; set DATA to image-caption shards" >&2; exit 2; } ;; esac

# shellcheck disable=SC2086  # LAUNCH and EXTRA_FLAGS are word lists
$LAUNCH "$DDIL" distill --method lcm --teacher "$TEACHER" "${DATA_FLAGS[@]}" --prompts "$PROMPTS" \
  --steps 4 --solver-steps 50 --w-min 3 --w-max 15 --timestep-scaling 10 \
  --loss huber --huber-c 0.001 --target-ema 0.95 --unroll-steps 3,4,5 \
  --max-updates "$MAX_UPDATES" --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM" --lr 1e-6 --warmup 500 \
  --weight-decay 0 --mixed-precision "$MIXED_PRECISION" \
  --prior "$PRIOR" --student-prob 1 --collect-every "$COLLECT_EVERY" --rollouts-per-collect "$ROLLOUTS" \
  --buffer-size 50000 --checkpoint-every 1000 --tracker "$TRACKER" $EXTRA_FLAGS --out "$OUT"

# the student samples with its own LCMScheduler grid (999, 759, 499, 259) and re-noising sampler
"$DDIL" sample --teacher "$TEACHER" --student "$OUT/student" --steps 4 --prompts "$PROMPTS" \
  --num-per-prompt "$NUM_PER_PROMPT" --guidance 8 --batch-size "$SAMPLE_BATCH" --out "$OUT/samples"
if [ -n "${REFERENCE:-}" ]; then
  "$DDIL" evaluate --samples "$OUT/samples" --reference "$REFERENCE" \
    --inception "${INCEPTION:?path to clean-fid inception-2015-12-05.pt}" --clip "${CLIP:?OpenCLIP ViT-g-14 weights}" \
    --dinov2 "${DINOV2:?DINOv2 ViT-L/14 weights}" --eval-res 256 --out "$OUT/eval"
fi
