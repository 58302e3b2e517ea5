#!/usr/bin/env bash
# One prepared GPU check (issue 9): the step benchmark, the epoch benchmark and the test suite, all figures printed.
#
#   bash benchmarks/gpu_check.sh                 # all stages: step epoch tests
#   bash benchmarks/gpu_check.sh step epoch      # only these stages (each has its own time limit)
#
# Made for the lent machine (one H100/H200, 16 cores, no network; see /work/shared/spec/ecosystem.md): its timm
# may be older than 1.0.31, so carry the wheel and point TIMM_WHEEL at it; timm's train.py is not in any wheel,
# so carry a copy of the same release and point TIMM_TRAIN at it (the epoch stage is skipped without it).
# Everything printed also goes to $OUT/gpu_check.log when $OUT is set.
#   TIMM_WHEEL=shared/timm-1.0.31-py3-none-any.whl TIMM_TRAIN=shared/timm_train.py bash benchmarks/gpu_check.sh
# Budget: about 3 min (step; compilation included), 3 min (epoch; 10,240 JPEGs generated once), 4 min (tests).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(step epoch tests)
LOG="${OUT:-/tmp}/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
status=0

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree, no install (no network)
if [ -n "${TIMM_WHEEL:-}" ]; then
    python -m pip install --quiet --no-deps --target /tmp/timm_overlay "$TIMM_WHEEL" && \
        export PYTHONPATH="/tmp/timm_overlay:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, timm, accelerate, huggingface_hub as h; print('torch', torch.__version__, 'timm', \
timm.__version__, 'accelerate', accelerate.__version__, 'huggingface_hub', h.__version__)"

stage() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo; echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s) ==="
    timeout "$limit" "$@" || { echo "=== $name FAILED (exit $?) ==="; status=1; }
}

STEP=(python benchmarks/train_step.py --device cuda --amp bf16 -b 256 --img-size 224 --student deit_tiny_widelast
      --teacher cait_s24_224 --feat-loss mse --repeats 20 --warmup 5)
for s in "${STAGES[@]}"; do
    case $s in
        step)
            # eager rows, compiled rows and the bf16-weight teacher in one interleaved run
            stage "train_step: eager + compiled, bf16, batch 256, 224 px, CaiT-S24 -> WideLast" 300 \
                "${STEP[@]}" --compile --teacher-bf16-weights ;;
        step-cudagraphs)
            stage "train_step: teacher compiled with reduce-overhead (CUDA graphs)" 300 \
                "${STEP[@]}" --compile --teacher-compile-mode reduce-overhead ;;
        epoch)
            if [ -z "${TIMM_TRAIN:-}" ]; then
                echo "=== epoch skipped: set TIMM_TRAIN to timm's train.py ==="; status=1
            else
                stage "train_epoch: train_distill.py vs timm train.py, 10,240 JPEGs, 2 epochs, no teacher" 420 \
                    python benchmarks/train_epoch.py --timm-train "$TIMM_TRAIN" --device cuda --amp bf16 \
                    --images 10240 --img-size 224 -b 256 --workers 14 --epochs 2 --rounds 2
            fi ;;
        tests)
            stage "test suite (README's command)" 540 python -m pytest tests -q -p no:cacheprovider ;;
        *)
            echo "unknown stage $s (step, step-cudagraphs, epoch, tests)"; status=2 ;;
    esac
done
echo; echo "gpu_check done, exit $status; log: $LOG"
exit $status
