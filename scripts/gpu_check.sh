#!/usr/bin/env bash
# Every CUDA path of CrackSense on small generated data, in one command (a few minutes on one GPU): one line
# per check with its figure, ending in "N passed, M failed". Run it from anywhere in the repository:
#
#   scripts/gpu_check.sh                                       # the GPU machine, with its own python3 and PyTorch
#   PYTHON=.venv/bin/python scripts/gpu_check.sh --cpu-dry-run # the plumbing on a CPU: small, CUDA-only checks skipped
#
# It uses the machine's own PyTorch (PYTHON, default python3, not .venv) and installs torch-pruning from
# .whl/torch_pruning-*.whl (pip --no-deps) when it is missing. Work files and one log per check go to
# GPU_CHECK_DIR (default: a new folder under /tmp); a failed check names its log.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; elif [[ $# -gt 0 ]]; then
    echo "usage: scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2
fi
WORK=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
LOGS=$WORK/logs OUT=$WORK/results DATA=$WORK/data
mkdir -p "$LOGS"
PASSED=0 FAILED=0 SKIPPED=0

say() { printf '%-34s %s\n' "$1" "$2"; }
skip() { SKIPPED=$((SKIPPED + 1)); say "skip $1" "$2"; }

# check NAME PATTERN COMMAND...: run COMMAND (output in LOGS/NAME.log); pass shows the log lines matching
# PATTERN (the figure), fail the last line of the log.
check() {
    local name=$1 pattern=$2 log="$LOGS/$1.log" started=$SECONDS figure
    shift 2
    if timeout "${CHECK_TIMEOUT:-420}" "$@" >"$log" 2>&1; then
        figure=$(grep -E -- "$pattern" "$log" | sed 's/^ *//' | paste -sd '|' | sed 's/|/ | /g' | cut -c1-400)
        PASSED=$((PASSED + 1)); say "pass $name" "${figure:-ok} [$((SECONDS - started)) s]"
    else
        FAILED=$((FAILED + 1))
        say "FAIL $name" "$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-300) [log: $log]"
    fi
}

if ! "$PYTHON" -c "import torch_pruning" 2>/dev/null; then
    wheel=$(ls .whl/torch_pruning-*.whl 2>/dev/null | tail -n 1)
    if [[ -n "$wheel" ]]; then "$PYTHON" -m pip install --no-deps --quiet "$wheel" >"$LOGS/pip.log" 2>&1; fi
fi
check versions "^(python|torch|gpu|missing)" "$PYTHON" - <<'EOF'
import importlib, importlib.metadata as md, platform, sys
import torch
version = lambda name: md.version(name) if importlib.util.find_spec(name.replace("-", "_")) else "MISSING"
print(f"python {platform.python_version()}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), torchvision "
      f"{version('torchvision')}, torch-pruning {version('torch-pruning')}")
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu {torch.cuda.get_device_name()} (compute capability {major}.{minor}, bfloat16 "
          f"{'native' if major >= 8 else 'not native'}), {torch.cuda.device_count()} device(s)")
needed = ["torchvision", "torch_pruning", "numpy", "PIL", "scipy", "pandas", "openpyxl", "matplotlib", "tqdm", "onnx",
          "onnxruntime"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    print(f"missing {' '.join(missing)}")
sys.exit(1 if missing and set(missing) & {"torchvision", "torch_pruning"} else 0)
EOF

CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
BF16=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8))" \
       2>/dev/null || echo 0)
if [[ $DRY == 1 ]]; then
    DEV=cpu ARCH=deeplabv3_mobilenet_v3_large COUNT=8 SIZE=64 CROP=64 BATCH=2 TILE=48 BENCH=64 RUNS=2 BATCHES="1 2"
elif [[ $CUDA == 1 ]]; then
    DEV=cuda ARCH=deeplabv3_resnet101 COUNT=16 SIZE=256 CROP=256 BATCH=4 TILE=160 BENCH=512 RUNS=20 BATCHES="1 8"
else
    echo "no CUDA device: run with --cpu-dry-run to check the plumbing on a CPU" >&2
    exit 2
fi
cuda_only() { [[ $DRY == 0 ]] || { skip "$1" "no CUDA: skipped"; return 1; }; }

check data "^wrote .*/test:" "$PYTHON" -m utils.synthetic "$DATA" --count "$COUNT" --size "$SIZE"
TRAIN=(train.py "$DATA/train" "$DATA/val")
COMMON=(--arch "$ARCH" --init none --batch_size "$BATCH" --crop_size "$CROP" --workers 2 --device "$DEV"
        --output_dir "$OUT" --lr 0.003)
LAST="^epoch [0-9]+/"

# training: the run "base" (float16 with a GradScaler on a GPU, float32 in the dry run) is what later checks use
if [[ $DRY == 0 ]]; then
    check train_amp_float16 "$LAST" "$PYTHON" "${TRAIN[@]}" base "${COMMON[@]}" --epochs 2 --amp --amp_dtype float16
else
    skip train_amp_float16 "no CUDA: skipped (float16 autocast needs a GPU); float32 run instead"
    check train_float32 "$LAST" "$PYTHON" "${TRAIN[@]}" base "${COMMON[@]}" --epochs 2
fi
if [[ $BF16 == 1 || $DRY == 1 ]]; then
    check train_amp_bfloat16 "$LAST" "$PYTHON" "${TRAIN[@]}" bf16 "${COMMON[@]}" --epochs 1 --amp --amp_dtype bfloat16
else
    skip train_amp_bfloat16 "this GPU has no native bfloat16 (compute capability < 8)"
fi
check train_resume "$LAST|resuming" "$PYTHON" "${TRAIN[@]}" base --epochs 3 --resume --device "$DEV" \
    --output_dir "$OUT" --workers 2
check train_channels_last "$LAST" "$PYTHON" "${TRAIN[@]}" cl "${COMMON[@]}" --epochs 1 --channels_last

# torchrun: two processes on one GPU with NCCL where it allows that, else gloo on CUDA tensors
DDP=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 "${TRAIN[@]}")
if [[ $DRY == 1 ]]; then
    check torchrun_gloo_cpu "$LAST" "${DDP[@]}" ddp "${COMMON[@]}" --epochs 1
else
    failed_before=$FAILED
    check torchrun_nccl_one_gpu "$LAST" "${DDP[@]}" ddp "${COMMON[@]}" --epochs 1
    if [[ $FAILED -gt $failed_before ]]; then
        FAILED=$failed_before
        say "  (not counted)" "NCCL refused two processes on one GPU: gloo on CUDA tensors instead"
        CRACKSENSE_DIST_BACKEND=gloo check torchrun_gloo_one_gpu "$LAST" "${DDP[@]}" ddp_gloo "${COMMON[@]}" --epochs 1
    fi
fi

BEST=$OUT/runs/base/best.pth
HALF=(); [[ $DRY == 0 ]] && HALF=(--half)
check test_tiled "^mIoU |^mean latency per image" "$PYTHON" test.py "$DATA/test" --weights "$BEST" --device "$DEV" \
    --tile "$TILE" --tile_batch 4 --output_dir "$OUT" --name check --workers 2
check inference_tiled${HALF:+_half} "tiled" "$PYTHON" inference.py --state_dict "$BEST" --image "$DATA/test/Images" \
    --mode save_mask --tile "$TILE" --tile_batch 4 "${HALF[@]}" --device "$DEV" --output_dir "$OUT"

# pruning with Taylor importance (gradients on the device), with and without channels rounded to 8
PRUNE=("$PYTHON" torchvision_pruning.py --state_dict "$BEST" --pruning_ratio 50 --importance_type Taylor
       --data "$DATA/train" --crop_size "$CROP" --batch_size "$BATCH" --calib_batches 2 --measure_size "$BENCH"
       --device "$DEV" --output_dir "$OUT")
check prune_taylor_50 "^dense .* -> pruned" "${PRUNE[@]}" --model_name p50
check prune_taylor_50_round_to_8 "^dense .* -> pruned" "${PRUNE[@]}" --model_name p50r8 --round_to 8
if cuda_only compile_pruned_train; then
    check compile_pruned_train "$LAST" "$PYTHON" "${TRAIN[@]}" compiled --pruned_model "$OUT/pruned/p50.pth" \
        --batch_size "$BATCH" --crop_size "$CROP" --workers 2 --device "$DEV" --output_dir "$OUT" --epochs 1 --compile
fi

check pruned_gpu_equals_cpu "max abs" "$PYTHON" - "$OUT/pruned/p50.pth" "$DEV" "$SIZE" <<'EOF'
import copy, sys
import torch
from utils.checkpoint import load_model
from utils.deploy import LogitsOnly
from utils.model import fold_batchnorm

torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 against float32
path, device, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, metadata = load_model(path)
cpu = fold_batchnorm(LogitsOnly(model, metadata["num_classes"]).eval())
image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    expected = cpu(image)
    actual = copy.deepcopy(cpu).to(device)(image.to(device)).cpu()
difference = (actual - expected).abs().max().item()
scale = expected.abs().max().item()
agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
print(f"{device} vs cpu, pruned network: max abs logit diff {difference:.2e} (logits up to {scale:.3g}), argmax "
      f"agreement {100 * agreement:.3f}%")
sys.exit(0 if difference <= 1e-4 * max(1.0, scale) and agreement >= 0.999 else 1)
EOF

# benchmark: dense against 50%-pruned (plain and rounded to 8 channels), float32 and float16, two batch sizes
CHECKPOINTS=("$BEST" "$OUT/pruned/p50.pth" "$OUT/pruned/p50r8.pth")
for dtype in float32 float16; do
    for batch in $BATCHES; do
        name=benchmark_${dtype}_batch${batch}
        if [[ $dtype == float16 ]] && ! cuda_only "$name"; then continue; fi
        extra=(); [[ $dtype == float16 ]] && extra=(--half)
        check "$name" "GEMM rate|x the speed" "$PYTHON" benchmark.py "${CHECKPOINTS[@]}" --size "$BENCH" \
            --batch "$batch" --runs "$RUNS" --warmup 3 "${extra[@]}" --device "$DEV" --output_dir "$OUT" --name "$name"
    done
done
if cuda_only benchmark_float16_channels_last; then
    check benchmark_float16_channels_last "GEMM rate|x the speed" "$PYTHON" benchmark.py "${CHECKPOINTS[@]}" \
        --size "$BENCH" --batch 8 --runs "$RUNS" --half --channels_last --device cuda --output_dir "$OUT" \
        --name benchmark_float16_channels_last
fi

echo "$PASSED passed, $FAILED failed, $SKIPPED skipped (logs in $LOGS)"
[[ $FAILED == 0 ]]
