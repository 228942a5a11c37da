#!/usr/bin/env bash
# The GPU suite: one call on a fresh GPU machine with torch (and triton) already installed, at most 8 minutes:
#   bash bench/gpu_suite.sh OUTDIR
# Steps, each under a hard cap (seconds; the caps sum to 475):
#   build 135 | gpu_quick 155 | GPU tests 105 | Bures 256x512x7x7 35 | training-step latency 45
# OUTDIR gets at most 7 files: summary.md (rewritten after every step, so a killed run still returns it),
# suite.log, build.log, tests_gpu.log, gpu_quick.json, gaussian.json, train_step.json.
# The released cost matrices are read from data/ (copy them there before the call; the folder is git-ignored and
# must be named in the device call's `carry`) or WKD_DATA_DIR; without them gpu_quick uses a random stand-in and
# says so. See the README section "GPU suite".
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_suite.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
CAP_BUILD=135 CAP_QUICK=155 CAP_TESTS=105 CAP_BURES=35 CAP_STEP=45
START=$(date +%s)
STEPS=()   # "name|cap|seconds|status"
status=0

log() { echo "[gpu_suite +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/suite.log"; }

# The header names the machine once (importing torch takes seconds: not on every summary).
HEADER="# GPU suite: $($PY -c 'import torch, triton; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "| torch", torch.__version__, "| triton", triton.__version__)' 2>/dev/null) | $(date -u +%F)"

summarize() {
  {
    echo "$HEADER"
    echo
    echo "| step | cap_s | took_s | status |"; echo "|---|---|---|---|"
    for s in "${STEPS[@]}"; do IFS='|' read -r n c t st <<<"$s"; echo "| $n | $c | $t | $st |"; done
    echo
    [ -f "$TMP/gpu_quick/gpu_quick.md" ] && { echo "## gpu_quick"; echo; cat "$TMP/gpu_quick/gpu_quick.md"; echo; }
    if [ -f "$OUT/tests_gpu.log" ]; then
      echo "## GPU tests (last lines of each run)"; echo '```'; grep -E "passed|failed|error|FAILED|ERROR" "$OUT/tests_gpu.log" | tail -30; echo '```'
    fi
    for f in bures train_step; do
      [ -f "$TMP/$f.txt" ] && { echo "## $f"; echo '```'; tail -25 "$TMP/$f.txt"; echo '```'; }
    done
  } >"$OUT/summary.md"
}

# run NAME CAP COMMAND...: run under `timeout CAP`, record the time and status, refresh the summary.
run() {
  local name=$1 cap=$2; shift 2
  log "$name (cap ${cap}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=5 "$cap" "$@"; rc=$?
  local took=$(( $(date +%s) - t0 )) st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="TIMEOUT after ${cap}s"; status=1
  elif [ $rc -ne 0 ]; then st="FAILED (exit $rc)"; status=1; fi
  STEPS+=("$name|$cap|$took|$st")
  log "$name: $st in ${took}s"
  summarize
  return $rc
}

# 1. Build (CUDA C++ sources for TORCH_CUDA_ARCH_LIST; the Triton kernels need no build).
if ! run build "$CAP_BUILD" bash -c "$PY -m pip install --no-build-isolation --no-deps -e . >'$OUT/build.log' 2>&1"; then
  tail -30 "$OUT/build.log" | tee -a "$OUT/suite.log"
  log "build failed: the ops need the compiled extension; stopping"
  exit 1
fi
$PY -c "import wkd_kernels, json, torch; print(torch.cuda.get_device_name(), json.dumps(wkd_kernels.build_info()))" 2>&1 | tee -a "$OUT/suite.log"

# 2. gpu_quick: correctness, determinism, timings and calibration (its own budget ends 15 s before the cap).
mkdir -p "$TMP/gpu_quick"
# (its lines stream into suite.log, so a run killed at the cap still shows the rows it finished)
run gpu_quick "$CAP_QUICK" $PY bench/gpu_quick.py --device cuda --budget-s $(( CAP_QUICK - 15 )) --out "$TMP/gpu_quick" \
  >>"$OUT/suite.log" 2>&1
cp "$TMP/gpu_quick/gpu_quick.json" "$OUT/" 2>/dev/null
summarize

# 3. GPU tests: the Triton and CUDA C++ kernel tests (all of them, on CUDA tensors) and every test marked gpu.
#    --maxfail and a per-test timeout instead of -x; pytest-xdist spreads them (and their Triton JIT) when present.
par=()
$PY -c "import xdist" 2>/dev/null && par=(-n 8)
tmo=()
if $PY -c "import pytest_timeout" 2>/dev/null; then tmo=(--timeout 60); else export WKD_TEST_TIMEOUT_S=60; fi
run gpu_tests "$CAP_TESTS" bash -c "$PY -m pytest -q -rfE -p no:cacheprovider --maxfail=25 ${par[*]} ${tmo[*]} \
    python_tests/test_sinkhorn.py python_tests/test_feature_stats.py python_tests/test_sqrtm.py \
    python_tests/test_nuclear_norm.py python_tests/test_bures_wasserstein.py \
    -k 'triton or cuda or gpu' >'$OUT/tests_gpu.log' 2>&1; a=\$?; \
  $PY -m pytest -q -rfE -p no:cacheprovider --maxfail=10 ${tmo[*]} -m gpu python_tests \
    --ignore=python_tests/test_sinkhorn.py --ignore=python_tests/test_feature_stats.py \
    --ignore=python_tests/test_sqrtm.py --ignore=python_tests/test_nuclear_norm.py \
    --ignore=python_tests/test_bures_wasserstein.py >>'$OUT/tests_gpu.log' 2>&1; b=\$?; \
  [ \$a -eq 0 ] && { [ \$b -eq 0 ] || [ \$b -eq 5 ]; }"

# 4. Bures / WKD-F at the ImageNet shape (N=256, C=512, 7x7), both covariances, grid 1 and 4.
run bures "$CAP_BURES" bash -c "$PY bench/bench_gaussian.py --device cuda --sizes 256x512x7x7 --reps 10 \
    --baseline-budget 5 --time-limit $(( CAP_BURES - 8 )) --json '$OUT/gaussian.json' >'$TMP/bures.txt' 2>&1"

# 5. Training-step latency subset: ResNet34 -> ResNet18 at batch 256, bf16 (needs torchvision).
if $PY -c "import torchvision" 2>/dev/null; then
  run train_step "$CAP_STEP" bash -c "$PY bench/train_step_latency.py --device cuda --reps 10 --warmup 3 \
      --json '$OUT/train_step.json' >'$TMP/train_step.txt' 2>&1"
else
  STEPS+=("train_step|$CAP_STEP|0|skipped (no torchvision)"); summarize
fi

log "done in $(( $(date +%s) - START ))s (status $status); summary in $OUT/summary.md"
rm -rf "$TMP"
exit $status
