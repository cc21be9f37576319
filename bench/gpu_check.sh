#!/usr/bin/env bash
# The prepared GPU check, one command: install, GPU tests, quick benchmarks; results in OUTDIR.
#   bench/gpu_check.sh OUTDIR
# Meant to finish in under 6 minutes on an H100. Uses the machine's own torch and triton.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0

{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1

MAX_JOBS=${MAX_JOBS:-8} pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed (see install.log)"; tail -30 "$OUT/install.log"; exit 1; }

timeout 300 python -m pytest tests -m gpu -q -p no:cacheprovider -rs \
  --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 240 python -m emalora_fast bench --quick --output-dir "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: exit $status; results in $OUT"
exit $status
