#!/usr/bin/env bash
# The main job: CURE on Fashion-MNIST on the CPU in a few minutes (about 4-11 on 2 cores).
#
#   1. natural pre-training (ST): the small CNN, 2 epochs on 20,000 training images;
#   2. CURE from that checkpoint: 3 epochs on 4,096 images, L-inf eps 0.1, TRADES attack K = 10,
#      beta = 5, p = 0.3, alpha = 0.1, gamma = 1, r = 0.2, d = 0.999 (the fashion-mnist-cnn preset);
#   3. the final table: natural accuracy, PGD-20 accuracy and NRR on 1,000 test images for the trained
#      model and the revision model, at the last epoch and at the epoch with the best validation PGD-20.
#
# Validation (model selection) uses 500 images held out of the training split, never the test split.
# Outputs: $OUT/st and $OUT/cure (config.json, metrics.csv, TensorBoard events, last.pt, best.pt,
# summary.json). Set OUT to write elsewhere; extra arguments are passed to both `cure train` calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# One intra-op thread unless the caller sets OMP_NUM_THREADS. Measured on a 2-core machine: quiet, the
# job takes 3.4 min with 1 thread and 2.0 min with 2; with other jobs running, 5.2 min with 1 thread but
# 17.6 min with 2 (OpenMP threads that wait on each other stall when the cores are shared).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/main_job}
COMMON=(--dataset fashion-mnist --arch cnn --val-size 500 --eval-samples 1000 --seed 0 --overwrite --no-progress)

start=$(date +%s)
echo "== natural pre-training (ST) =="
"$PY" -m cure train --method st --epochs 2 --train-samples 20000 --out "$OUT/st" "${COMMON[@]}" "$@"

echo
echo "== CURE from the natural model =="
"$PY" -m cure train --method cure --init "$OUT/st/last.pt" --epochs 3 --train-samples 4096 \
    --out "$OUT/cure" "${COMMON[@]}" "$@"

echo
echo "main job finished in $(( $(date +%s) - start )) s; summaries: $OUT/st/summary.json $OUT/cure/summary.json"
