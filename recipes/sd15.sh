#!/usr/bin/env bash
# Stable Diffusion 1.5, PD 32 -> 4 steps with DDIL, for GPU users (the paper's setting).
# NOT run by the project's CI (no GPU, no weights there): a recipe to adapt, every flag explained
# in `ddil distill --help`. Needs: the SD 1.5 weights (a local folder or a cached hub id),
# image-caption webdataset shards (LAION-style .jpg/.png + .txt), a prompts file (e.g. COCO-2017
# 5k captions, one per line) and the metric weights (see docs/evaluate.md).
set -euo pipefail
TEACHER=${TEACHER:-stable-diffusion-v1-5/stable-diffusion-v1-5}
DATA=${DATA:?set DATA to image-caption shards, e.g. a brace pattern over /data/laion/NNNNN.tar}
PROMPTS=${PROMPTS:?set PROMPTS to a captions file, one per line}
OUT=${OUT:-runs/sd15-pd-ddil}
NPROC=${NPROC:-1}

# Guided distillation (w ~ U[2, 14] as input), then 32 -> 16 -> 8 -> 4 with DDIL priors.
accelerate launch --num_processes "$NPROC" "$(command -v ddil)" distill --method pd \
  --teacher "$TEACHER" --data "$DATA" --prompts "$PROMPTS" \
  --teacher-steps 32 --steps 4 --guided-updates 5000 --stage-updates 5000 \
  --guidance-range 2,14 --batch-size 16 --grad-accum 4 --lr 1e-5 --warmup 500 --ema-decay 0.999 \
  --mixed-precision bf16 --gradient-checkpointing --threshold static:4 \
  --collect-every 250 --rollouts-per-collect 64 --buffer-size 50000 \
  --checkpoint-every 1000 --tracker tensorboard --out "$OUT"

ddil sample --teacher "$TEACHER" --student "$OUT/student" --steps 4 --teacher-steps 32 \
  --prompts "$PROMPTS" --num-per-prompt 1 --guidance 7.5 --batch-size 16 --out "$OUT/samples"
ddil evaluate --samples "$OUT/samples" --reference "${REFERENCE:?set REFERENCE to COCO images or a stats .npz}" \
  --inception "${INCEPTION:?path to clean-fid inception-2015-12-05.pt}" --clip "${CLIP:?OpenCLIP ViT-g-14 weights}" \
  --dinov2 "${DINOV2:?DINOv2 ViT-L/14 weights}" --eval-res 256 --out "$OUT/eval"
