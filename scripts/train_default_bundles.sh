#!/usr/bin/env bash
# Trains the two committed source bundles from ../shared/data (labels of the source domain only).
#   cardiac-bssfp: mscmr_bssfp labels (test target: mscmr_lge)
#   cardiac-acdc:  acdc_cine labels  (test target: mscmr_bssfp)
# Recipe: the trainer's defaults (trainer.config.TrainConfig; docs/benchmarks.md, "Source recipes"): the slice-wise
# plan on each scan's own slices (target spacing 1.8 x 1.8 x 0 mm: no slice interpolated), GIN random-convolution
# and location-scale intensity augmentation, the one-cycle schedule over STEPS steps of 16 slices, validation every
# 250 steps, best held-out Dice kept; the cards keep the largest connected object of the label maps (the heart).
# The scans are prepared once into an .npz (`ttaseg prepare`, on the same default grid), which also lets the
# training run on another machine without the source files. On one CPU thread a step took about 2.6 s: the
# shipped 2000 steps took about 1.5 hours a bundle, both bundles side by side on 2 cores; the validation Dice was
# still rising there (docs/benchmarks.md, "Source models"), so a larger STEPS buys more. A killed run resumes from
# runs/train-NAME when the script is run again.
# Usage: [DEVICE=cuda|cpu] [WORKERS=N] [STEPS=N] scripts/train_default_bundles.sh [bssfp|acdc|all]
#   DEVICE defaults to cuda when torch sees a GPU, else cpu; WORKERS (batch-preparing processes) to 0.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TTASEG_DATA:-../shared/data}
WHICH=${1:-all}
TTASEG=.venv/bin/ttaseg
DEVICE=${DEVICE:-$(.venv/bin/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
WORKERS=${WORKERS:-0}
STEPS=${STEPS:-2000}
LABELS="$DATA/cardiac/labels.json"

# train NAME DOMAIN VAL_CASES
train() {
  local name=$1 domain=$2 val=$3 prepared="runs/data/$2-own-slices.npz"
  mkdir -p runs/data
  [[ -f $prepared ]] || $TTASEG prepare --images "$DATA/cardiac/$domain/images" \
    --labels "$DATA/cardiac/$domain/labels" --label-names "$LABELS" --out "$prepared"
  $TTASEG train --images "$prepared" --label-names "$LABELS" --steps "$STEPS" \
    --name "$name" --version 5 --out "bundles/$name" --work "runs/train-$name" --val-cases "$val" --seed 10 \
    --largest-component foreground --device "$DEVICE" --workers "$WORKERS"
}

if [[ $WHICH == bssfp || $WHICH == all ]]; then
  train cardiac-bssfp mscmr_bssfp 5
fi
if [[ $WHICH == acdc || $WHICH == all ]]; then
  train cardiac-acdc acdc_cine 6
fi
