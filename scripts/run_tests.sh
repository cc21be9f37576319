#!/usr/bin/env bash
# The test run of `make test` and CI: the test suite, then every benchmark once in smoke mode.
# pytest's own exit codes pass through, so a run that collects no test (exit 5) fails.
set -euo pipefail
PY=${1:-python}
export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Fresh random test data each run; the seed is printed so that a failure can be replayed.
export EMALORA_TEST_SEED=${EMALORA_TEST_SEED:-$((RANDOM * 32768 + RANDOM))}
echo "test seed: EMALORA_TEST_SEED=$EMALORA_TEST_SEED"
# The ahead-of-time compile check (ptxas, one core, minutes) runs beside the rest of the suite,
# whose interpreted kernels keep one core busy; its output follows the suite's.
compile_log=$(mktemp)
"$PY" -m pytest tests/kernels/test_compile.py -q -s -p no:cacheprovider -rs >"$compile_log" 2>&1 &
compile_pid=$!
trap 'kill "$compile_pid" 2>/dev/null || true; rm -f "$compile_log"' EXIT
suite=0
"$PY" -m pytest tests -q -p no:cacheprovider --durations=10 --ignore=tests/kernels/test_compile.py \
  || suite=$?
compile=0
wait "$compile_pid" || compile=$?
echo "--- compile check (tests/kernels/test_compile.py) ---"
cat "$compile_log"
if [ "$suite" -ne 0 ] || [ "$compile" -ne 0 ]; then
  echo "test suite exit $suite, compile check exit $compile" >&2
  exit $(( suite != 0 ? suite : compile ))
fi
EMALORA_BENCH_SMOKE=1 "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-disable-gc
