#!/usr/bin/env bash
# The thesis' pruning grid on the real S2DS release, with the controls a reviewer asks for: every variant and a
# dense twin fine-tuned by the same recipe, the Random criterion as the control, three seeds for the spread.
#
#   grid: Magnitude (L2), Taylor and Random x 20/40/60/70% x 1 or 5 steps, 10 fine-tuning epochs, seeds 1 2 3
#         (the thesis also swept the L1 norm; Random has no norm, so L1 runs as a second study, NAME_l1, with
#         --with-l1: Magnitude L1 with its own dense twin)
#
# Usage: scripts/study_s2ds.sh [--estimate] [--with-l1] WEIGHTS TRAIN_DIR VAL_DIR TEST_DIR [OUTPUT_DIR [NAME]]
#   WEIGHTS     the trained dense network (results/runs/<run>/best.pth or the thesis' *_weights.pth)
#   --estimate  print the images found and the estimated cost per variant and of the whole grid; run nothing
#   PYTHON=...  the interpreter (default .venv/bin/python); DEVICE=cuda|cpu|auto (default auto)
# Rerun the same command to resume after an interruption: finished (variant, seed) runs are kept.
#
# The estimate (--estimate, or printed before the study starts) comes from step times measured on the machine that runs
# this script, with its DEVICE: one epoch of utils.pruning's fine-tuning loop over 3 batches of 512 px crops of
# TRAIN_DIR (seconds per step, the first step's start-up included, so an upper bound) and utils/timing.py's latency
# of the deployed network on a test image. Per run (one variant or the dense twin, one seed): fine-tuning steps x
# the step time, plus the val passes (one per epoch and the untuned one) and the test pass x the forward time. The
# dense network's times stand for every variant, so a pruned one costs less (about a third at 50% of the channels).
# What was measured when this script was written: see the README's "Pruning study" section (CPU only; no GPU was
# available, so the GPU cost is "not measured": run --estimate on your GPU machine).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-auto}
ESTIMATE=0
WITH_L1=0
while [ $# -gt 0 ]; do
    case "$1" in
        --estimate) ESTIMATE=1; shift ;;
        --with-l1) WITH_L1=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
if [ $# -lt 4 ] || [ $# -gt 6 ]; then
    echo "usage: scripts/study_s2ds.sh [--estimate] [--with-l1] WEIGHTS TRAIN_DIR VAL_DIR TEST_DIR [OUTPUT_DIR [NAME]]" >&2
    exit 2
fi
WEIGHTS=$1 TRAIN=$2 VAL=$3 TEST=$4 OUT=${5:-results} NAME=${6:-s2ds_study}
for folder in "$TRAIN" "$VAL" "$TEST"; do
    [ -d "$folder" ] || { echo "study_s2ds.sh: data folder not found: $folder" >&2; exit 2; }
done
[ -f "$WEIGHTS" ] || { echo "study_s2ds.sh: weights not found: $WEIGHTS" >&2; exit 2; }

RATIOS=(20 40 60 70)
STEPS=(1 5)
SEEDS=(1 2 3)
EPOCHS=10
BATCH=4
COMMON=(--state_dict "$WEIGHTS" --data "$TRAIN" --val_data "$VAL" --test_data "$TEST" --pruning_ratio "${RATIOS[@]}"
        --iterative_steps "${STEPS[@]}" --seeds "${SEEDS[@]}" --finetune_epochs "$EPOCHS" --step_finetune_epochs 1
        --batch_size "$BATCH" --crop_size 512 --device "$DEVICE" --output_dir "$OUT")

MAIN_VARIANTS=$(( 3 * ${#RATIOS[@]} * ${#STEPS[@]} ))
L1_VARIANTS=$(( WITH_L1 * ${#RATIOS[@]} * ${#STEPS[@]} ))
PYTHONPATH=. "$PY" - "$WEIGHTS" "$TRAIN" "$VAL" "$TEST" "$BATCH" "$EPOCHS" "${#SEEDS[@]}" "$MAIN_VARIANTS" \
    "$L1_VARIANTS" "$DEVICE" <<'EOF'
"""Cost of the grid from step times measured here: the one fine-tuning loop and the one latency measure."""
import sys
import time

import torch

from utils import data
from utils.checkpoint import load_model
from utils.cli import device_name, resolve_device
from utils.distributed import DistContext
from utils.pruning import PruneData, PruneOptions, finetune
from utils.recipe import make_criterion
from utils.timing import deployed_latencies, synchronize

weights, train_dir, val_dir, test_dir = sys.argv[1:5]
batch, epochs, seeds, main_variants, l1_variants = map(int, sys.argv[5:10])
device = resolve_device(sys.argv[10])
counts = {name: len(data.S2DSDataset(folder)) for name, folder in
          (("train", train_dir), ("val", val_dir), ("test", test_dir))}
height, width = data.S2DSDataset(test_dir, data.EvalTransform())[0][0].shape[-2:]
model, _ = load_model(weights, device=device)
forward_s = deployed_latencies([model], (height, width), device, runs=3)[0]
train_set = data.training_set(train_dir, 512)
subset = torch.utils.data.Subset(train_set, range(min(len(train_set), 3 * batch)))
prepared = PruneData(train_set=subset, criterion=make_criterion("ce", subset, False).to(device))
tuning = PruneOptions(importance_type="Magnitude", p_value=2, pruning_ratio=None, iterative_steps=1,
                      global_pruning=False, round_to=None, finetune_epochs=0, calib_batches=1, calib_mode="eval",
                      seed=0, optimizer="sgd", lr=0.001, weight_decay=1e-4, batch_size=batch, workers=0)
started = time.perf_counter()
finetune(model, prepared, tuning, DistContext(device=device), 1, 0)
synchronize(device)
step_s = (time.perf_counter() - started) / (len(subset) // batch)
steps_per_epoch = counts["train"] // batch
one_step = epochs * steps_per_epoch * step_s + (epochs + 1) * counts["val"] * forward_s + counts["test"] * forward_s
five_steps = one_step + 5 * steps_per_epoch * step_s  # 1 fine-tuning epoch after each of the 5 pruning steps
print(f"S2DS here: {counts['train']} train / {counts['val']} val / {counts['test']} test images (test images "
      f"{width}x{height} px); {steps_per_epoch} steps of {batch} per epoch, {epochs} epochs per run")
print(f"measured on {device_name(device)}: {step_s:.2f} s per fine-tuning step (batch {batch}, 512 px crops), "
      f"{forward_s:.2f} s per test image (deployed network, batch 1)")
print(f"estimated cost per run: 1-step variant or dense twin {one_step / 3600:.2f} h, 5-step variant "
      f"{five_steps / 3600:.2f} h")
twins = 1 + (1 if l1_variants else 0)
total = seeds * ((main_variants + l1_variants) / 2 * (one_step + five_steps) + twins * one_step)
print(f"whole grid: {main_variants + l1_variants} variants + {twins} dense twin(s), x {seeds} seeds: "
      f"{total / 3600:.0f} h ({total / 86400:.1f} days) on this device")
EOF
[ "$ESTIMATE" = 1 ] && exit 0

"$PY" study.py "${COMMON[@]}" --importance_type Magnitude Taylor Random --p_value 2 --name "$NAME"
if [ "$WITH_L1" = 1 ]; then
    "$PY" study.py "${COMMON[@]}" --importance_type Magnitude --p_value 1 --name "${NAME}_l1"
fi
