#!/usr/bin/env bash
# `make demo`: a generated S2DS-format sample dataset, then every stage of the workflow on it:
# train -> evaluate -> prune -> fine-tune -> evaluate -> inference -> ONNX export -> benchmark -> pruning study.
# Usage: scripts/demo.sh PYTHON DATA_DIR   (the Makefile passes .venv/bin/python results/demo_data)
set -euo pipefail
PY=${1:-.venv/bin/python}
DATA=${2:-results/demo_data}
RESULTS=results
RUN=$RESULTS/runs/demo
TRAIN_MINUTES=${TRAIN_MINUTES:-3.5}  # the rest of the demo takes about 11 minutes on 2 cores
PRUNE_STEPS=${PRUNE_STEPS:-120}      # fine-tuning steps of the pruned network (step 4)
STUDY_STEPS=${STUDY_STEPS:-80}       # fine-tuning steps of every study arm (step 9)
DISTILL=${DISTILL:-1}                # weight of distillation from the dense network while fine-tuning
PRUNED=$RESULTS/pruned/demo_l2_50.pth
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
step() { printf '\n=== %s (%ss so far)\n' "$*" "$SECONDS"; }

step "1. sample dataset (60 images of 128x128 px) in $DATA"
if [ -d "$DATA/train" ]; then
    echo "reusing $DATA (delete it to generate a new one)"
else
    $PY -m utils.synthetic "$DATA" --count 60 --size 128
fi
$PY -m utils.data check "$DATA/train"

step "2. train DeepLabV3-ResNet101 from scratch for $TRAIN_MINUTES minutes at output stride 16 (the demo run is replaced each time)"
$PY train.py "$DATA/train" "$DATA/val" demo --init none --aux_loss False --output_stride 16 --loss ce_weighted_dice \
    --cat_max_ratio 0.75 --skeleton_recall 1 --max_minutes "$TRAIN_MINUTES" --val_every 10 --batch_size 8 \
    --crop_size 64 --optimizer adamw --lr 0.001 --workers 2 --overwrite --output_dir "$RESULTS"

step "3. evaluate it on the test split: an Excel report and one row in the comparison workbook"
$PY test.py "$DATA/test" --weights "$RUN/best.pth" --save_predictions --overwrite --workers 2 \
    --output_dir "$RESULTS"

step "4. prune 50% of the channels by L2 magnitude, recalibrate BatchNorm, fine-tune $PRUNE_STEPS steps distilled from the dense network (the recipe the network was trained with, the best validated step kept)"
$PY torchvision_pruning.py --pruning_ratio 50 --importance_type Magnitude --p_value 2 --model_name demo_l2_50 \
    --state_dict "$RUN/best.pth" --data "$DATA/train" --val_data "$DATA/val" --bn_recalibrate 20 \
    --finetune_steps "$PRUNE_STEPS" --finetune_val_every 20 --distill "$DISTILL" --crop_size 96 \
    --measure_size 256 --latency_runs 3 --workers 2 --overwrite --output_dir "$RESULTS"

step "5. evaluate the pruned network beside the dense one (one more row in the comparison workbook)"
$PY test.py "$DATA/test" --weights "$PRUNED" --overwrite --workers 2 --output_dir "$RESULTS"

step "6. inference on a sample photo in all three modes, and a whole folder through the sliding window"
SAMPLES=("$DATA"/test/Images/*)
$PY inference.py --state_dict "$RUN/best.pth" --image "${SAMPLES[0]}" --mode overlay --save_figure \
    --output_dir "$RESULTS"
$PY inference.py --state_dict "$RUN/best.pth" --image "${SAMPLES[0]}" --mode side_by_side save_mask \
    --save_figure --output_dir "$RESULTS"
$PY inference.py --state_dict "$PRUNED" --image "$DATA/test/Images" \
    --mode save_mask --tile 96 --stride 64 --output_dir "$RESULTS"

step "7. ONNX export for TensorRT, checked against PyTorch in onnxruntime"
$PY export.py "$RUN/best.pth" --size 128 --dynamic --overwrite --output_dir "$RESULTS"

step "8. speed and size, dense vs pruned"
$PY benchmark.py "$RUN/best.pth" "$PRUNED" --size 128 --runs 5 --warmup 1 \
    --output_dir "$RESULTS"

step "9. pruning study: L2 magnitude, Taylor and the Random control at 30/50%, each and the dense twin recalibrated and fine-tuned $STUDY_STEPS steps alike (distilled), scored and timed (make study-demo: 70% too, a GMACs budget, INT8, two seeds)"
$PY study.py --state_dict "$RUN/best.pth" --data "$DATA/train" --val_data "$DATA/val" --test_data "$DATA/test" \
    --importance_type Magnitude Taylor Random --p_value 2 --pruning_ratio 30 50 --iterative_steps 1 \
    --bn_recalibrate 20 --finetune_steps "$STUDY_STEPS" --finetune_val_every 20 --distill "$DISTILL" \
    --crop_size 96 --calib_batches 1 --measure_size 128 --latency_runs 3 --workers 2 \
    --name demo_study --overwrite --output_dir "$RESULTS"

step "10. results/results.md: the figures above as data, each stamped with its command, date, machine and commit"
$PY scripts/render_results.py --results "$RESULTS" --output "$RESULTS/results.md"

step "done"
cat <<EOT
sample dataset        $DATA/{train,val,test}
training run          $RUN/ (best.pth, last.pth, metrics.csv, curves.png, args.json)
evaluation            $RESULTS/test/demo_best.xlsx, demo_best_confusion.png, demo_best_predictions/
pruned network        $RESULTS/pruned/demo_l2_50.pth and demo_l2_50_steps.csv
pruned evaluation     $RESULTS/test/demo_l2_50.xlsx
comparison workbook   $RESULTS/model_test_results.xlsx (one row per test.py run)
inference figures     $RESULTS/inference/ (<photo>_demo_best_overlay.png, _side_by_side.png, _mask.png;
                      the pruned model's masks as <photo>_demo_l2_50_mask.png)
ONNX model            $RESULTS/export/ (see the trtexec line above)
benchmark             $RESULTS/benchmark/
pruning study         $RESULTS/studies/demo_study/ (study.png: test mIoU and crack F1 against GMACs and latency;
                      study.xlsx, study.csv, one checkpoint per variant)
EOT
