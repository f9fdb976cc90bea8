#!/usr/bin/env bash
# The GPU check, in one run from the repository root on a CUDA machine (no network):
#   OUT=/some/folder bash bench/gpu_check.sh
# 1. device and software versions; 2. builds the CUDA C++ extension once (cached);
# 3. pytest -m gpu: every Triton / CUDA kernel and the whole fused step vs the float64
#    oracle on CUDA, TF32 off; 4. the drop-in Functions' bench; 5. bench/gpu_bench.py: the
#    side-by-side table; 6. a profile of the fused step.
# Every stage is time-limited and runs even when an earlier one failed, all of them within
# TOTAL_LIMIT_S (560 s by default); logs, the table (gpu_bench.md / .json) and summary.txt
# land in $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export OUT="${OUT:-$PWD/gpu_check_out}"
export GRADREG_KERNELS_CACHE="${GRADREG_KERNELS_CACHE:-/tmp/gradreg_cache}"
export MAX_JOBS="${MAX_JOBS:-16}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

# The whole check ends within TOTAL_LIMIT_S (the device tool runs one command for at most
# 600 s): a stage gets its own limit or what is left of the total, whichever is less, and a
# stage with under 20 s left is skipped (said in the summary), so the summary is always written.
TOTAL_LIMIT_S="${TOTAL_LIMIT_S:-560}"

stage() {  # stage NAME TIMEOUT_S CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$(( TOTAL_LIMIT_S - ($(date +%s) - T0) - 5 ))
  if (( left < 20 )); then
    echo "+++ stage $name: skipped, ${left} s left of TOTAL_LIMIT_S=${TOTAL_LIMIT_S}" | tee -a "$SUMMARY"
    return 124
  fi
  (( limit > left )) && limit=$left
  echo "+++ [$(date +%T), $(( $(date +%s) - T0 )) s] stage $name (limit ${limit} s): $*"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "+++ stage $name: rc=$rc after $(( $(date +%s) - T0 )) s" | tee -a "$SUMMARY"
  return "$rc"
}

stage info 30 bash -c "nvidia-smi; which nvcc && nvcc --version | tail -1; \
  $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'; \
  $PY -c 'import triton; print(\"triton\", triton.__version__)'; \
  $PY -c 'import jax; print(\"jax\", jax.__version__, jax.devices())'; \
  $PY -c 'import pytest, pytest_benchmark; print(\"pytest\", pytest.__version__)'"

SKIP=""
if stage build_cuda 150 "$PY" -c "
from gradreg_kernels.backends.gpu_entries import cuda_unavailable
why = cuda_unavailable()
if why: raise SystemExit('CUDA backend unavailable: ' + why)
from gradreg_kernels.backends.cuda import load_extension
print('built', load_extension(verbose=True))"; then
  :
else
  echo "CUDA C++ backend not built: its tests and benchmark rows are skipped" | tee -a "$SUMMARY"
  export GRADREG_TEST_CUDA_BACKEND=0
  SKIP="--skip-backends cuda"
fi

# -s: the child run of every kernel case streams its progress into gpu_tests.log
stage gpu_tests 200 "$PY" -m pytest -q -s -m gpu -p no:cacheprovider -rs tests/ || true
# gradcheck / gradgradcheck of every drop-in Function on the CUDA backends
stage functional_tests "${FUNCTIONAL_TESTS_LIMIT_S:-60}" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_functional.py -k cuda || true
grep -E "(passed|failed|error|skipped)" "$OUT/gpu_tests.log" | tail -4 >> "$SUMMARY"
# the drop-in Functions before/after convert (and both user steps captured in a CUDA graph)
stage functional_bench "${FUNCTIONAL_LIMIT_S:-120}" "$PY" -m pytest -q -s -p no:cacheprovider \
  bench/test_functional_bench.py --benchmark-columns=min,median,rounds || true
# the side-by-side table: its own time budget shrinks to what is left, so that it writes the
# table (rows past the budget say so) before the stage's limit would cut it off
LEFT=$(( TOTAL_LIMIT_S - ($(date +%s) - T0) - 40 ))
BUDGET="${BENCH_BUDGET_S:-130}"
(( BUDGET > LEFT )) && BUDGET=$LEFT
(( BUDGET < 10 )) && BUDGET=10
stage gpu_bench "${BENCH_LIMIT_S:-180}" "$PY" bench/gpu_bench.py --out "$OUT" \
  --budget-s "$BUDGET" $SKIP ${GPU_BENCH_ARGS:-} || true
# where the fused step spends GPU time
stage profile "${PROFILE_LIMIT_S:-45}" "$PY" bench/gpu_profile.py --model mnist_cnn || true

grep -E "^(### |Goals|Relative error)" "$OUT/gpu_bench.md" >> "$SUMMARY" 2>/dev/null
echo "+++ done in $(( $(date +%s) - T0 )) s" | tee -a "$SUMMARY"
cat "$SUMMARY"
