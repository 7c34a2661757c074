#!/usr/bin/env bash
# Every GPU benchmark in one go, within 8 minutes: run it first whenever a GPU machine is at hand.
#
#   bash bench/gpu.sh [RESULTS_FILE]      (default: $OUT/gpu-results.txt if $OUT is set, else bench/gpu-results.txt)
#   PYTHON=python3 bash bench/gpu.sh      (on the lent GPU machine: its python3, no .venv; see docs/GPU.md)
#
# First a device smoke (bench/device_smoke.py: every trainer builds its stage on the GPU with bf16
# and channels_last on tiny data, finite losses, exports load back), then the throughput benchmarks.
# Nothing here needs Prefect, gensim, faiss, nltk, tensorboard or the weight packages (absent on
# the GPU machine): networks start from random weights. tests/test_bench.py runs the tiny mode under
# bench/device_view (those packages made unimportable), so that cannot regress unnoticed.
#
# Each benchmark runs under its own time limit (the sum stays under 8 minutes), prints its
# RESULT lines, and they are collected, with the machine, into RESULTS_FILE for docs/BENCHMARKS.md.
# A benchmark that fails or runs out of time is reported as such and the others still run.
# The 2-GPU data-parallel check runs only when 2 or more GPUs are visible.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "no python at '$PY': set PYTHON (e.g. PYTHON=python3)" >&2; exit 2; }
RESULTS=${1:-${OUT:+$OUT/gpu-results.txt}}
RESULTS=${RESULTS:-bench/gpu-results.txt}
export TMPDIR=${TMPDIR:-$(pwd)/data}
mkdir -p "$TMPDIR" "$(dirname "$RESULTS")"
START=$(date +%s)
FAILED=0
{
  echo "# bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# gpu: /'
  "$PY" -c "import torch; print(f'# torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible')"
} > "$RESULTS"

run() {  # run LIMIT_S NAME COMMAND...: its RESULT lines to the results file
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local log="$TMPDIR/gpu-$name.log"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  grep -v '^RESULT ' "$log" | tail -n 5
  if [ $rc -eq 0 ]; then
    grep '^RESULT ' "$log" | sed "s/^RESULT /RESULT $name /" | tee -a "$RESULTS"
  else
    FAILED=$((FAILED + 1))
    grep '^RESULT ' "$log" | sed "s/^RESULT /RESULT $name /" | tee -a "$RESULTS"
    echo "# $name: failed (exit $rc; 124 = out of time); last lines:" | tee -a "$RESULTS"
    tail -n 3 "$log" | sed 's/^/#   /' | tee -a "$RESULTS"
  fi
}

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "${BENCH_TINY:-0}" = 1 ]; then  # the test suite's CPU check of this script: tiny sizes, same code
  SMOKE="--size 32 --images 8 --limit 120"
  DEVISE="--images 32 --size 32 --batch 4 --steps 3 --warmup 1 --workers 1 --backbone resnet18 --dims 50"
  SUPERRES="--sizes 32 --batches 2 --images 16 --steps 3 --warmup 1 --workers 1 --arch johnson"
  GAN="--size 32 --batch 2 --images 16 --steps 3 --warmup 1 --workers 1 --critic-nf 8 --encoder efficientnet_lite0"
  STYLE="--size 48 --iterations 2 --train-size 32 --batch 2 --steps 3 --warmup 1 --workers 1 --images 16"
  DDP="--nproc 2 --size 32 --batch 2 --steps 4 --warmup 1 --images 64 --workers 0 --arch johnson"
  [ "$GPUS" -lt 2 ] && GPUS=2  # gloo processes stand in for GPUs
else
  SMOKE="--size 64 --images 24 --limit 60"
  DEVISE="--images 4096 --steps 40 --warmup 8"
  SUPERRES="--images 2048 --steps 30 --warmup 6"
  GAN="--images 1024 --steps 30 --warmup 6"
  STYLE="--iterations 20 --images 1024 --steps 30"
  DDP="--nproc 2 --size 128 --batch 32 --steps 30 --images 4096"
fi
# shellcheck disable=SC2086  (the option strings are meant to split)
[ "$GPUS" -ge 2 ] && [ "${BENCH_TINY:-0}" = 1 ] && export SMOKE_DDP=1  # the tiny mode's DDP part on gloo
run 150 device_smoke "$PY" bench/device_smoke.py $SMOKE
run 70 train_devise "$PY" bench/train_devise.py $DEVISE
run 80 train_superres "$PY" bench/train_superres.py $SUPERRES
run 60 train_gan "$PY" bench/train_gan.py $GAN
run 50 style "$PY" bench/style.py $STYLE
if [ "$GPUS" -ge 2 ]; then
  run 60 ddp_scaling "$PY" bench/ddp_scaling.py $DDP
else
  echo "# ddp_scaling: skipped ($GPUS GPU visible; it needs 2)" | tee -a "$RESULTS"
fi
[ "$FAILED" -eq 0 ] || echo "# $FAILED benchmark(s) failed" | tee -a "$RESULTS"
echo "# total $(( $(date +%s) - START )) s" | tee -a "$RESULTS"
echo "results: $RESULTS"
[ "$FAILED" -eq 0 ]
