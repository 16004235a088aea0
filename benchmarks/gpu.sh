#!/usr/bin/env bash
# Every GPU benchmark of issue #13 in one run, in under 8 minutes on one GPU: JSONL out, tables printed.
#
#   bash benchmarks/gpu.sh                     # CUDA, the issue's sizes; JSONL appended to benchmarks/results/gpu_*
#   OUT_DIR=/some/dir bash benchmarks/gpu.sh   # the JSONL files go there instead
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh  # every step at tiny sizes on CPU: a smoke test (JSONL to a temp folder)
#
# Steps, in this order (sizes without QUICK):
#   pacl_loss   exact vs materialised PACL loss, B=256, N=196, D=512, forward + backward: time, peak CUDA memory
#   encode      ViT-B-32 image and text towers at batch 1024, float32 eager, clip-pacl vs open_clip
#   train_b16   ViT-B-16 training step at batch 256, bf16 autocast + torch.compile (inductor), both libraries:
#               samples/s and MFU against a bf16 matmul peak measured in the same run; compilation happens in the
#               3 warm-up steps and is reported apart (warmup_excess_s), 10 timed steps
#   train_b32   the same for ViT-B-32 at batch 512
#   dataload    the loader feeding ViT-B-32's bf16 step at batch 256, 4 and 12 workers
# Each step runs under `timeout` with its own limit, cut to what is left of BUDGET_S (440 s) since the start (a
# step killed at its limit gets 10 s more to exit; the summary at most 20 s: under 8 minutes in all); a step that
# fails or runs out of time is reported and the next one still runs. At the end the issue's targets are printed
# against this run's numbers (benchmarks/gpu_summary.py), and the exit status is 1 if any step failed or was skipped.
# Environment: DEVICE (cuda), QUICK (0), OUT_DIR, BUDGET_S, PYTHON (python), OMP_NUM_THREADS (all cores).
set -euo pipefail

cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET_S=${BUDGET_S:-440}
PYTHON=${PYTHON:-python}
if [[ $QUICK == 1 ]]; then
    OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/clip_pacl_gpu_sh.XXXXXX)}
else
    OUT_DIR=${OUT_DIR:-benchmarks/results}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # measure this checkout's code
THREADS=(--threads "$OMP_NUM_THREADS")
RUN_DIR=$(mktemp -d /tmp/clip_pacl_gpu_run.XXXXXX)  # this run's records only; appended to OUT_DIR at the end
mkdir -p "$OUT_DIR"

if [[ $QUICK == 1 ]]; then
    PACL_SIZES=(--batch 16 --patches 16 --dim 32 --repeats 1)
    ENCODE_SIZES=(--models tiny --batch 2 --repeats 1 --warmup 0)
    TRAIN_B16=(--configs tiny:4:64 --warmup 1 --steps 1 --compile aot_eager)  # traced, no code generated: seconds
    TRAIN_B32=(--configs tiny:2:64 --warmup 1 --steps 1 --compile aot_eager)
    DATALOAD_SIZES=(--n 16 --model tiny --batch-size 8 --workers 0 --repeats 1)
else
    PACL_SIZES=(--batch 256 --patches 196 --dim 512 --repeats 5)
    ENCODE_SIZES=(--models ViT-B-32 --batch 1024 --repeats 10 --warmup 2)
    TRAIN_B16=(--configs ViT-B-16:256:224 --warmup 3 --steps 10 --compile)
    TRAIN_B32=(--configs ViT-B-32:512:224 --warmup 3 --steps 10 --compile)
    DATALOAD_SIZES=(--n 1024 --model ViT-B-32 --batch-size 256 --workers 4 12 --repeats 3)
fi

start=$SECONDS
problems=()

# step NAME LIMIT_S COMMAND...: run COMMAND under timeout (LIMIT_S, or what is left of the budget when less)
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - start)))
    if ((left < limit)); then
        limit=$left
    fi
    if ((limit < 15)); then
        echo "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
        problems+=("$name skipped")
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if ((rc == 0)); then
        echo "== $name: done in $((SECONDS - t0))s"
    elif ((rc == 124 || rc == 137)); then
        echo "== $name: TIMED OUT after ${limit}s"
        problems+=("$name timed out")
    else
        echo "== $name: FAILED (exit $rc)"
        problems+=("$name failed")
    fi
}

echo "clip-pacl GPU benchmarks: DEVICE=$DEVICE QUICK=$QUICK OUT_DIR=$OUT_DIR threads=$OMP_NUM_THREADS"
step pacl_loss 45 "$PYTHON" benchmarks/pacl_loss.py --device "$DEVICE" --impls exact materialised \
    "${PACL_SIZES[@]}" --out "$RUN_DIR/gpu_pacl_loss.jsonl"
step encode 75 "$PYTHON" benchmarks/encode.py --device "$DEVICE" --towers image,text "${ENCODE_SIZES[@]}" \
    "${THREADS[@]}" --out "$RUN_DIR/gpu_encode.jsonl"
step train_b16 180 "$PYTHON" benchmarks/train_step.py --device "$DEVICE" --modes step --amp bf16 "${TRAIN_B16[@]}" \
    "${THREADS[@]}" --label gpu.sh --out "$RUN_DIR/gpu_train_step.jsonl"
step train_b32 160 "$PYTHON" benchmarks/train_step.py --device "$DEVICE" --modes step --amp bf16 "${TRAIN_B32[@]}" \
    "${THREADS[@]}" --label gpu.sh --out "$RUN_DIR/gpu_train_step.jsonl"
step dataload 50 "$PYTHON" benchmarks/dataload.py --device "$DEVICE" --amp bf16 "${DATALOAD_SIZES[@]}" \
    "${THREADS[@]}" --out "$RUN_DIR/gpu_dataload.jsonl"

timeout 20 "$PYTHON" benchmarks/gpu_summary.py --train "$RUN_DIR/gpu_train_step.jsonl" \
    --encode "$RUN_DIR/gpu_encode.jsonl" --pacl "$RUN_DIR/gpu_pacl_loss.jsonl" || problems+=("the summary failed")
for file in "$RUN_DIR"/*.jsonl; do
    if [[ -f $file ]]; then
        cat "$file" >>"$OUT_DIR/$(basename "$file")"
    fi
done
rm -rf "$RUN_DIR"
echo "records appended to $OUT_DIR/gpu_*.jsonl; total $((SECONDS - start))s of the ${BUDGET_S}s budget"
if ((${#problems[@]})); then
    printf 'problem: %s\n' "${problems[@]}"
    exit 1
fi
