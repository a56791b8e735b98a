#!/usr/bin/env bash
# Trains the two committed source bundles from ../shared/data (labels of the source domain only).
#   cardiac-bssfp: mscmr_bssfp labels (test target: mscmr_lge)
#   cardiac-acdc:  acdc_cine labels  (test target: mscmr_bssfp)
# Recipe: the trainer's defaults (trainer.config.TrainConfig; docs/benchmarks.md, "Source recipes"): the slice-wise
# plan on each scan's own slices (target spacing 1.8 x 1.8 x 0 mm: no slice interpolated), GIN random-convolution
# and location-scale intensity augmentation, steps of 16 slices, the best held-out Dice kept; the cards keep the
# largest connected object of the label maps (the heart); each scan is predicted once (no flip ensemble).
# Three stages, each a one-cycle schedule from the last one's best weights (warm restarts):
#   stage 1: STEPS (2000) steps from scratch, peak learning rate 2e-3, validation every 250 steps (the `:5` bundles,
#            kept in runs/stage1-NAME);
#   stage 2: FINE_STEPS (750) steps, peak 1e-3, validation every 150 steps (the `:6` weights, runs/stage2-NAME);
#   stage 3: LAST_STEPS (1000) steps, peak 5e-4, validation every 125 steps (the shipped `:7` bundles; the card
#            lists stages 1 and 2 under training.earlier_stages).
# The scans are prepared once into an .npz (`ttaseg prepare`, on the same default grid), which also lets the
# training run on another machine without the source files. On one CPU thread of the 2-core AMD machine a step took
# 2.6 to 3.6 s by instance, so 3 to 4 hours a bundle, both bundles side by side on 2 cores. A killed run resumes
# from runs/train-NAME-stageN when the script is run again.
# glibc's allocator otherwise maps and unmaps every large tensor, and a one-thread step spends a quarter of its time
# in the kernel (4.6 s a step instead of 3.6 s, measured by the trainer's progress lines on one machine).
# Usage: [DEVICE=cuda|cpu] [WORKERS=N] [STEPS=N] [FINE_STEPS=N] [LAST_STEPS=N] scripts/train_default_bundles.sh [bssfp|acdc|all]
#   DEVICE defaults to cuda when torch sees a GPU, else cpu; WORKERS (batch-preparing processes) to 0.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TTASEG_DATA:-../shared/data}
WHICH=${1:-all}
TTASEG=.venv/bin/ttaseg
DEVICE=${DEVICE:-$(.venv/bin/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
WORKERS=${WORKERS:-0}
STEPS=${STEPS:-2000}
FINE_STEPS=${FINE_STEPS:-750}
LAST_STEPS=${LAST_STEPS:-1000}
LABELS="$DATA/cardiac/labels.json"
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}

# train NAME DOMAIN VAL_CASES
train() {
  local name=$1 domain=$2 val=$3 prepared="runs/data/$2-own-slices.npz"
  local common=(--images "$prepared" --label-names "$LABELS" --name "$name" --val-cases "$val" --seed 10
    --largest-component foreground --device "$DEVICE" --workers "$WORKERS")
  mkdir -p runs/data
  [[ -f $prepared ]] || $TTASEG prepare --images "$DATA/cardiac/$domain/images" \
    --labels "$DATA/cardiac/$domain/labels" --label-names "$LABELS" --out "$prepared"
  [[ -f runs/stage1-$name/weights.pt ]] || $TTASEG train "${common[@]}" --steps "$STEPS" --version 5 \
    --out "runs/stage1-$name" --work "runs/train-$name-stage1"
  [[ -f runs/stage2-$name/weights.pt ]] || $TTASEG train "${common[@]}" --steps "$FINE_STEPS" --lr 1e-3 \
    --val-every 150 --version 6 --pretrained "runs/stage1-$name/weights.pt" --out "runs/stage2-$name" \
    --work "runs/train-$name-stage2"
  $TTASEG train "${common[@]}" --steps "$LAST_STEPS" --lr 5e-4 --val-every 125 --version 7 \
    --pretrained "runs/stage2-$name/weights.pt" --out "bundles/$name" --work "runs/train-$name-stage3"
}

if [[ $WHICH == bssfp || $WHICH == all ]]; then
  train cardiac-bssfp mscmr_bssfp 5
fi
if [[ $WHICH == acdc || $WHICH == all ]]; then
  train cardiac-acdc acdc_cine 6
fi
