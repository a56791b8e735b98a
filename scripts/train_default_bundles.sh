#!/usr/bin/env bash
# Trains the two committed source bundles from ../shared/data (labels of the source domain only).
#   cardiac-bssfp: mscmr_bssfp labels (test target: mscmr_lge)
#   cardiac-acdc:  acdc_cine labels  (test target: mscmr_bssfp)
# Two stages per bundle: supervised training with the standard augmentation, then fine-tuning with
# random-convolution intensity augmentation (the shipped recipe; see docs/benchmarks.md for what each gave).
# Usage: scripts/train_default_bundles.sh [bssfp|acdc|all]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TTASEG_DATA:-../shared/data}
WHICH=${1:-all}
TTASEG=.venv/bin/ttaseg

# train NAME DOMAIN VAL_CASES STAGE1_STEPS STAGE2_STEPS
train() {
  local name=$1 domain=$2 val=$3 steps1=$4 steps2=$5
  local common=(--images "$DATA/cardiac/$domain/images" --labels "$DATA/cardiac/$domain/labels"
    --label-names "$DATA/cardiac/labels.json" --name "$name" --val-cases "$val")
  $TTASEG train "${common[@]}" --out "runs/bundles/$name-stage1" --work "runs/train-$name-stage1" \
    --steps "$steps1" --random-convolution 0
  $TTASEG train "${common[@]}" --version 2 --out "bundles/$name" --work "runs/train-$name-stage2" \
    --steps "$steps2" --random-convolution 0.8 --pretrained "runs/bundles/$name-stage1/weights.pt"
}

if [[ $WHICH == bssfp || $WHICH == all ]]; then
  train cardiac-bssfp mscmr_bssfp 5 500 400
fi
if [[ $WHICH == acdc || $WHICH == all ]]; then
  train cardiac-acdc acdc_cine 6 300 600
fi
