#!/usr/bin/env bash
# The thesis' pruning grid on the real S2DS release, with the controls a reviewer asks for: every variant and a
# dense twin fine-tuned by the same recipe, the Random criterion as the control, three seeds for the spread.
#
#   grid: Magnitude (L2), Taylor and Random x 20/40/60/70% x 1 or 5 steps, BatchNorm recalibrated after each step,
#         2000 fine-tuning steps (validated every 250, the best kept), 100 between steps, seeds 1 2 3
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
# this script, with its DEVICE: 3 steps of utils.finetune's fine-tuning loop on 512 px crops of TRAIN_DIR (seconds
# per step, the first step's start-up included, so an upper bound) and utils/timing.py's latency of the deployed
# network on a test image. Per run (one variant or the dense twin, one seed): fine-tuning steps x the step time,
# plus the val passes (one per validation and the untuned one) and the test pass x the forward time. The
# dense network's times stand for every variant, so a pruned one costs less (about a third at 50% of the channels).
# No GPU was available when this script was written, so its GPU cost was not measured: run --estimate there.
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
FINETUNE_STEPS=2000
VAL_EVERY=250
BATCH=4
COMMON=(--state_dict "$WEIGHTS" --data "$TRAIN" --val_data "$VAL" --test_data "$TEST" --pruning_ratio "${RATIOS[@]}"
        --iterative_steps "${STEPS[@]}" --seeds "${SEEDS[@]}" --finetune_steps "$FINETUNE_STEPS"
        --finetune_val_every "$VAL_EVERY" --step_finetune_steps 100
        --batch_size "$BATCH" --crop_size 512 --device "$DEVICE" --output_dir "$OUT")

MAIN_VARIANTS=$(( 3 * ${#RATIOS[@]} * ${#STEPS[@]} ))
L1_VARIANTS=$(( WITH_L1 * ${#RATIOS[@]} * ${#STEPS[@]} ))
PYTHONPATH=. "$PY" - "$WEIGHTS" "$TRAIN" "$VAL" "$TEST" "$BATCH" "$FINETUNE_STEPS" "$VAL_EVERY" "${#SEEDS[@]}" \
    "$MAIN_VARIANTS" \
    "$L1_VARIANTS" "$DEVICE" <<'EOF'
"""Cost of the grid from step times measured here: the one fine-tuning loop and the one latency measure."""
import sys
import time

import torch

from utils import data
from utils.checkpoint import load_model
from utils.cli import device_name, resolve_device
from utils.distributed import DistContext
from utils.finetune import FinetuneBudget, PruneData, endless_batches, finetune
from utils.recipe import Recipe, make_criterion, train_loader
from utils.timing import deployed_latencies, synchronize

weights, train_dir, val_dir, test_dir = sys.argv[1:5]
batch, steps, val_every, seeds, main_variants, l1_variants = map(int, sys.argv[5:11])
device = resolve_device(sys.argv[11])
counts = {name: len(data.S2DSDataset(folder)) for name, folder in
          (("train", train_dir), ("val", val_dir), ("test", test_dir))}
height, width = data.S2DSDataset(test_dir, data.EvalTransform())[0][0].shape[-2:]
model, _ = load_model(weights, device=device)
forward_s = deployed_latencies([model], (height, width), device, runs=3)[0]
train_set = data.training_set(train_dir, 512)
context = DistContext(device=device)
prepared = PruneData(train_set=train_set, criterion=make_criterion("ce", train_set, False).to(device),
                     calibration=endless_batches(train_loader(train_set, batch, 0, 0, context)))
started = time.perf_counter()
finetune(model.train(), prepared, Recipe(batch_size=batch, lr=0.001), FinetuneBudget(), context, 3)
synchronize(device)
step_s = (time.perf_counter() - started) / 3
validations = steps // val_every + 1
one_step = steps * step_s + validations * counts["val"] * forward_s + counts["test"] * forward_s
five_steps = one_step + 4 * 100 * step_s  # 100 fine-tuning steps after each of the first 4 of 5 pruning steps
print(f"S2DS here: {counts['train']} train / {counts['val']} val / {counts['test']} test images (test images "
      f"{width}x{height} px); {steps} fine-tuning steps of {batch} images per run, validated every {val_every}")
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
