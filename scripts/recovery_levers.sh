#!/usr/bin/env bash
# The recovery lever table: one pruning study per recovery setting on the same network, grid (Magnitude L2, Taylor
# and Random at 30/50/70%), seed and step budget: nothing, BatchNorm recalibration, and 40 fine-tuning steps alone,
# with recalibration, with distillation, with both. `make results` renders the table from OUT/levers/studies.
#
# Usage: scripts/recovery_levers.sh WEIGHTS DATA_DIR [OUT]   (e.g. results/runs/demo/best.pth results/demo_data)
#   PYTHON=... the interpreter (default .venv/bin/python)
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: scripts/recovery_levers.sh WEIGHTS DATA_DIR [OUT]" >&2
    exit 2
fi
PY=${PYTHON:-.venv/bin/python}
WEIGHTS=$1 DATA=$2 OUT=${3:-results}
COMMON=(--state_dict "$WEIGHTS" --data "$DATA/train" --val_data "$DATA/val" --test_data "$DATA/test"
        --importance_type Magnitude Taylor Random --p_value 2 --pruning_ratio 30 50 70 --seeds 1
        --crop_size 96 --batch_size 8 --calib_batches 1 --measure_size 128 --latency_runs 0 --workers 2
        --quiet --output_dir "$OUT/levers" --overwrite)
TUNED=(--finetune_steps 40 --finetune_val_every 20)
lever() { name=$1; shift; echo "=== $name"; "$PY" study.py "${COMMON[@]}" --name "$name" "$@"; }
lever stale_untuned --bn_recalibrate 0 --finetune_steps 0
lever bn_untuned --bn_recalibrate 20 --finetune_steps 0
lever ft_only --bn_recalibrate 0 "${TUNED[@]}"
lever ft_bn --bn_recalibrate 20 "${TUNED[@]}"
lever ft_distill --bn_recalibrate 0 "${TUNED[@]}" --distill 1
lever ft_bn_distill --bn_recalibrate 20 "${TUNED[@]}" --distill 1
