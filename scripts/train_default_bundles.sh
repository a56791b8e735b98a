#!/usr/bin/env bash
# Trains the two committed source bundles from ../shared/data (labels of the source domain only).
#   cardiac-bssfp: mscmr_bssfp labels (test target: mscmr_lge)
#   cardiac-acdc:  acdc_cine labels  (test target: mscmr_bssfp)
# Each is trained from scratch with the trainer's defaults (5000 steps of 8 scans, random-convolution intensity
# augmentation, validation every 250 steps, best held-out Dice kept); their cards keep the largest connected
# object of the label maps (the heart). The scans are prepared once into an .npz
# (`ttaseg prepare`), which also lets the training run on a GPU machine without the source files.
# The committed bundles were trained on one H100, both side by side (about 11 min each; see their cards). On CPU
# a step of this 3D plan takes about 20 s on 2 cores, so the same recipe needs about a day there; a killed run
# resumes from runs/train-NAME when the script is run again.
# Usage: [DEVICE=cuda|cpu] [WORKERS=N] scripts/train_default_bundles.sh [bssfp|acdc|all]
#   DEVICE defaults to cuda when torch sees a GPU, else cpu; WORKERS (batch-preparing processes) to the cores - 1.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TTASEG_DATA:-../shared/data}
WHICH=${1:-all}
TTASEG=.venv/bin/ttaseg
DEVICE=${DEVICE:-$(.venv/bin/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
WORKERS=${WORKERS:-$(($(nproc) - 1))}
LABELS="$DATA/cardiac/labels.json"

# train NAME DOMAIN VAL_CASES
train() {
  local name=$1 domain=$2 val=$3 prepared="runs/data/$2.npz"
  mkdir -p runs/data
  $TTASEG prepare --images "$DATA/cardiac/$domain/images" --labels "$DATA/cardiac/$domain/labels" \
    --label-names "$LABELS" --out "$prepared"
  $TTASEG train --images "$prepared" --label-names "$LABELS" --name "$name" --version 4 --out "bundles/$name" \
    --work "runs/train-$name" --val-cases "$val" --seed 10 --largest-component foreground \
    --device "$DEVICE" --workers "$WORKERS"
}

if [[ $WHICH == bssfp || $WHICH == all ]]; then
  train cardiac-bssfp mscmr_bssfp 5
fi
if [[ $WHICH == acdc || $WHICH == all ]]; then
  train cardiac-acdc acdc_cine 6
fi
