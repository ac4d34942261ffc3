#!/usr/bin/env bash
# The main job: CURE on Fashion-MNIST with a BatchNorm ResNet-20, on the CPU, in about 10 minutes on 2 cores.
#
#   1. natural pre-training (ST): ResNet-20, 2 epochs on 10,000 training images (lr 0.1, then 0.01);
#   2. CURE from that checkpoint: 4 epochs on 2,048 images (lr 0.1, drops to 0.01 and 0.001 at epochs 3 and
#      4), L-inf eps 0.1, TRADES attack of K = 5 steps of 0.025, beta = 5, p = 0.3, alpha = 0.1, gamma = 1,
#      r = 0.2, d = 0.999 (the paper's CURE values; the budget is ours, to fit a CPU);
#   3. the final table: natural accuracy, PGD-20 accuracy and NRR on 500 test images for the trained model
#      and the revision model, at the last epoch and at the epoch with the best validation PGD-20, and the
#      fraction of gradient entries the RGP mask kept (about 1 - p on this BatchNorm network).
#
# Validation (model selection) uses 256 images held out of the training split, never the test split.
# Outputs: $OUT/st and $OUT/cure (config.json, metrics.csv with the loss terms, TensorBoard events, last.pt,
# best.pt, summary.json). Set OUT to write elsewhere; extra arguments are passed to both `cure train` calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# One intra-op thread unless the caller sets OMP_NUM_THREADS: OpenMP threads that wait on each other
# stall when the cores are shared with other work (2 threads on a quiet machine are faster).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/main_job}
COMMON=(--dataset fashion-mnist --arch resnet20 --val-size 256 --eval-samples 500 --seed 0 --overwrite --no-progress)

start=$(date +%s)
echo "== natural pre-training (ST) =="
"$PY" -m cure train --method st --epochs 2 --train-samples 10000 --eval-attacks nat --out "$OUT/st" "${COMMON[@]}" "$@"

echo
echo "== CURE from the natural model =="
"$PY" -m cure train --method cure --init "$OUT/st/last.pt" --epochs 4 --train-samples 2048 --attack-steps 5 \
    --out "$OUT/cure" "${COMMON[@]}" "$@"

echo
echo "main job finished in $(( $(date +%s) - start )) s; summaries: $OUT/st/summary.json $OUT/cure/summary.json"
