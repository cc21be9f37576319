#!/usr/bin/env bash
# The test run of `make test` and CI: the test suite, then every benchmark once in smoke mode.
# pytest's own exit codes pass through, so a run that collects no test (exit 5) fails.
set -euo pipefail
PY=${1:-python}
export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Fresh random test data each run; the seed is printed so that a failure can be replayed.
export EMALORA_TEST_SEED=${EMALORA_TEST_SEED:-$((RANDOM * 32768 + RANDOM))}
echo "test seed: EMALORA_TEST_SEED=$EMALORA_TEST_SEED"
"$PY" -m pytest tests -q -p no:cacheprovider --durations=10
EMALORA_BENCH_SMOKE=1 "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-disable-gc
