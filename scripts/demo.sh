#!/usr/bin/env bash
# `make demo`: a generated S2DS-format sample dataset, then every stage of the workflow on it.
# Usage: scripts/demo.sh PYTHON DATA_DIR   (the Makefile passes .venv/bin/python results/demo_data)
set -euo pipefail
PY=${1:-.venv/bin/python}
DATA=${2:-results/demo_data}
RESULTS=results
RUN=$RESULTS/runs/demo
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
step() { printf '\n=== %s\n' "$*"; }
started=$SECONDS

step "1. sample dataset (40 images of 128x128 px) in $DATA"
if [ -d "$DATA/train" ]; then
    echo "reusing $DATA (delete it to generate a new one)"
else
    $PY -m utils.synthetic "$DATA" --count 40 --size 128
fi
$PY -m utils.data check "$DATA/train"

step "2. train DeepLabV3-ResNet101 from scratch (small crops; the demo run is replaced each time)"
$PY train.py "$DATA/train" "$DATA/val" demo --init none --epochs 8 --batch_size 4 --crop_size 96 \
    --optimizer adamw --lr 0.003 --workers 2 --overwrite --output_dir "$RESULTS"
