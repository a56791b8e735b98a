#!/usr/bin/env bash
# Trains the two committed source bundles from ../shared/data (labels of the source domain only).
#   cardiac-bssfp: mscmr_bssfp labels (test target: mscmr_lge)
#   cardiac-acdc:  acdc_cine labels  (test target: mscmr_bssfp)
# Stage 1 is supervised training with the standard augmentation; every later stage fine-tunes the previous
# stage's weights with random-convolution intensity augmentation and a fresh one-cycle learning-rate schedule
# (the shipped recipe; see docs/benchmarks.md for what each gave). The last stage writes bundles/NAME.
# Usage: scripts/train_default_bundles.sh [bssfp|acdc|all]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TTASEG_DATA:-../shared/data}
WHICH=${1:-all}
TTASEG=.venv/bin/ttaseg

# train NAME DOMAIN VAL_CASES STAGE1_STEPS FINE_TUNE_STEPS...
train() {
  local name=$1 domain=$2 val=$3 steps1=$4
  shift 4
  local common=(--images "$DATA/cardiac/$domain/images" --labels "$DATA/cardiac/$domain/labels"
    --label-names "$DATA/cardiac/labels.json" --name "$name" --val-cases "$val")
  $TTASEG train "${common[@]}" --out "runs/bundles/$name-stage1" --work "runs/train-$name-stage1" \
    --steps "$steps1" --random-convolution 0
  local stage=1 steps out
  for steps in "$@"; do
    stage=$((stage + 1))
    out="runs/bundles/$name-stage$stage"
    if [[ $stage -eq $(($# + 1)) ]]; then out="bundles/$name"; fi
    $TTASEG train "${common[@]}" --version "$stage" --out "$out" --work "runs/train-$name-stage$stage" \
      --steps "$steps" --random-convolution 0.8 --seed $((stage - 2)) \
      --pretrained "runs/bundles/$name-stage$((stage - 1))/weights.pt"
  done
}

if [[ $WHICH == bssfp || $WHICH == all ]]; then
  train cardiac-bssfp mscmr_bssfp 5 500 400
fi
if [[ $WHICH == acdc || $WHICH == all ]]; then
  train cardiac-acdc acdc_cine 6 300 600 700
fi
