#!/usr/bin/env bash
# Trains the two committed source bundles from ../shared/data (labels of the source domain only).
#   cardiac-bssfp: mscmr_bssfp labels (test target: mscmr_lge)
#   cardiac-acdc:  acdc_cine labels  (test target: mscmr_bssfp)
# Usage: scripts/train_default_bundles.sh [bssfp|acdc|all] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${TTASEG_DATA:-../shared/data}
WHICH=${1:-all}
STEPS=${2:-1200}
TTASEG=.venv/bin/ttaseg
if [[ $WHICH == bssfp || $WHICH == all ]]; then
  $TTASEG train --images "$DATA/cardiac/mscmr_bssfp/images" --labels "$DATA/cardiac/mscmr_bssfp/labels" \
    --label-names "$DATA/cardiac/labels.json" --name cardiac-bssfp --out bundles/cardiac-bssfp \
    --work runs/train-cardiac-bssfp --steps "$STEPS" --val-cases 5
fi
if [[ $WHICH == acdc || $WHICH == all ]]; then
  $TTASEG train --images "$DATA/cardiac/acdc_cine/images" --labels "$DATA/cardiac/acdc_cine/labels" \
    --label-names "$DATA/cardiac/labels.json" --name cardiac-acdc --out bundles/cardiac-acdc \
    --work runs/train-cardiac-acdc --steps "$STEPS" --val-cases 6
fi
