#!/usr/bin/env bash
# The prepared GPU check, one command (at most about 17 minutes, with every step at its timeout;
# a few minutes when all goes well) on an H100/H200: results in OUTDIR.
#   bench/gpu_check.sh OUTDIR
# Uses the machine's own torch and triton. Every step runs under its own timeout and the script
# goes on after a failure, so that it ends with results whatever breaks. OUTDIR gets seven files:
#   summary.txt    environment, install tail, one status line per step (ok / FAILED rc / TIMEOUT)
#   compile.md     compile report (sm_90 and sm_80, ahead of time) with the byte/FLOP floors
#   smoke.log      correctness smoke of each kernel on the device, and the two fused-linear
#                  backward forms timed side by side
#   gpu-tests.log  pytest -m gpu
#   bench.log      emalora-fast bench --quick (with the Lightning callback's rows where Lightning
#                  is installed: `pip install --no-deps lightning pytorch-lightning
#                  lightning-utilities torchmetrics`)
#   bench.json     its rows and metadata
#   trl-bench.log  python -m emalora_fast.benchmarks.trl (TRL's callback and loss vs ours)
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
status=0

{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
  > "$SUMMARY" 2>&1

# step NAME SECONDS LOG COMMAND...: run with a timeout, append the output to LOG, record status.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  echo "=== $name" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local what="ok"
  if [ "$rc" -eq 124 ]; then what="TIMEOUT after ${limit} s"; elif [ "$rc" -ne 0 ]; then
    what="FAILED rc=$rc"; fi
  [ "$rc" -eq 0 ] || status=1
  echo "step $name: $what ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
}

step install 180 "$SUMMARY" env MAX_JOBS="${MAX_JOBS:-8}" \
  pip install --no-build-isolation --no-deps -e .
step compile-report 120 "$OUT/compile.md" python -m emalora_fast bench --compile-report
step smoke 150 "$OUT/smoke.log" python bench/gpu_smoke.py
step gpu-tests 180 "$OUT/gpu-tests.log" python -m pytest tests -m gpu -q -p no:cacheprovider -rs
BENCH_DIR=$(mktemp -d)
step bench 150 "$OUT/bench.log" python -m emalora_fast bench --quick --output-dir "$BENCH_DIR"
cp "$BENCH_DIR/bench.json" "$OUT/bench.json" 2>/dev/null || echo "no bench.json" >> "$SUMMARY"
rm -rf "$BENCH_DIR"
# TRL rows (needs trl, pip install 'emalora-fast[trl]'): SDFT teacher update on the 32-layer
# Llama-3-8B LoRA set, generalized_jsd_loss step at V = 49,152 and 128,256.
step trl-bench 240 "$OUT/trl-bench.log" python -m emalora_fast.benchmarks.trl

echo "gpu_check: exit $status; results in $OUT" | tee -a "$SUMMARY"
exit $status
