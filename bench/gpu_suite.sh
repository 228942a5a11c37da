#!/usr/bin/env bash
# The GPU suite: one call on a fresh GPU machine with torch and triton installed, at most 8 minutes, that comes back
# with a table even when a step fails:
#   bash bench/gpu_suite.sh OUTDIR            # on the GPU machine
#   bash bench/gpu_suite.sh --dry-run OUTDIR  # on a CPU machine: every step's command on tiny sizes (CPU tensors,
#                                             # TRITON_INTERPRET=1, the extension already built), ~2 minutes, then
#                                             # a check that OUTDIR holds the files a GPU run returns
#   bash bench/gpu_suite.sh --tuning-ops OUTDIR  # the build also compiles the benchmark-only CUDA ops
#                                             # torch.ops.wkd_tuning.* (WKD_BUILD_TUNING_OPS=1, off in the product
#                                             # build), so that a later `python bench/tune_sinkhorn.py
#                                             # --sweep-cuda-tiles --sweep-cuda-rows` on the same machine reuses this
#                                             # build: one build serves the suite and the sweep
# Steps, in order, each under a hard cap (seconds; the caps sum to 480, python_tests/test_gpu_suite.py checks it):
#   preflight     one line: GPU name and clocks, driver, torch and its CUDA, nvcc, Triton, ninja, pytest plugins
#   build         pip install -e . (CUDA C++ sources for TORCH_CUDA_ARCH_LIST, default 9.0); if it fails,
#   build_no_cuda the same with WKD_NO_CUDA=1, and the suite goes on (Triton and torch rows and tests); the failed
#                 build's log stays in OUTDIR (build.log, its error lines in build_error.txt)
#   gpu_quick     bench/gpu_quick.py: the design questions first (rows in the schema of bench/_common.py)
#   tests_cuda    GPU tests of the CUDA C++ and device-generic (torch) backends, one line per test (-v)
#   tests_triton  then the Triton ones; a failure's line gives its error, a tolerance miss its measured error
#   bures         Bures / WKD-F at 256x512x7x7 (bench/bench_gaussian_wasserstein.py)
#   train_step    training-step latency, ResNet34 -> ResNet18 at batch 256, bf16 (needs torchvision)
# OUTDIR: summary.md (rewritten after every step, so a killed run still returns it), suite.log, preflight.txt,
# build.log (+ build_no_cuda.log, build_error.txt after a failed build), gpu_quick.{json,md,csv} (rewritten after
# every row), tests_gpu.log, gaussian/bench_gaussian_wasserstein.json, train_step.json.
# The released cost matrices are read from data/ (copy them there before the call; the folder is git-ignored, so
# it must be copied to the GPU machine with the checkout) or WKD_DATA_DIR; without them gpu_quick uses a random
# stand-in and says so.
set -uo pipefail
DRY=0
TUNING_OPS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --tuning-ops) TUNING_OPS=1; shift ;;
    *) break ;;
  esac
done
OUT="${1:?usage: bash bench/gpu_suite.sh [--dry-run] [--tuning-ops] OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# a reused OUTDIR: this run's files only (the dry run checks that they were made)
rm -f "$OUT"/{summary.md,suite.log,preflight.txt,build.log,build_no_cuda.log,build_error.txt,tests_gpu.log} \
  "$OUT"/{gpu_quick.json,gpu_quick.md,gpu_quick.csv,bures.txt,train_step.json,train_step.txt}
rm -rf "$OUT/gaussian"
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
# the checkout (the package imports even when both builds failed: the torch backend needs no extension) and the
# pytest plugin python_tests/tolerance.py
export PYTHONPATH="$PWD:$PWD/python_tests${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

# Step caps in seconds (sum 480: 8 minutes, for a GPU machine that runs one command for at most 10; `timeout` may
# add 5 s per step to kill).
CAP_PREFLIGHT=20
CAP_BUILD=120
CAP_BUILD_NO_CUDA=45
CAP_QUICK=120
CAP_TESTS_CUDA=55
CAP_TESTS_TRITON=65
CAP_BURES=25
CAP_TRAIN_STEP=30

if [ $DRY -eq 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  QUICK_ARGS=(--device cpu --smoke)
  BURES_ARGS=(--device cpu --sizes 2x8x3x3 --reps 1 --warmup 0)
  STEP_ARGS=(--device cpu --batch 2 --image-size 64 --classes 10 --reps 1 --warmup 0 --amp none
             --methods "CE,WKD-L (ours)")
  OTHER_TESTS=()  # the kernel test files' CPU cases are CI's; the dry run runs the GPU file (it skips) only
  # CPU steps on a loaded machine (interpreter, model construction) take longer than their GPU caps allow
  CAP_PREFLIGHT=40 CAP_BURES=60 CAP_TRAIN_STEP=60
else
  unset TRITON_INTERPRET
  QUICK_ARGS=(--device cuda)
  BURES_ARGS=(--device cuda --sizes 256x512x7x7 --reps 10 --dense-max-work 0)
  STEP_ARGS=(--device cuda --reps 10 --warmup 3)
  OTHER_TESTS=(python_tests/test_sinkhorn_{values,gradients,zero_mass,log_domain,history,bad_input}.py
               python_tests/test_sinkhorn_{compile_opcheck,triton_tiles,triton_onchip,cuda,random_cases}.py
               python_tests/test_feature_stats.py python_tests/test_sqrtm.py python_tests/test_nuclear_norm.py
               python_tests/test_bures_wasserstein.py)
fi
START=$(date +%s)
STEPS=()   # "name|cap|seconds|status"
status=0
PREFLIGHT="(preflight not run)"

HAS_TORCHVISION=false
$PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is None)" 2>/dev/null && HAS_TORCHVISION=true

log() { echo "[gpu_suite +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/suite.log"; }

summarize() {
  {
    echo "# GPU suite$([ $DRY -eq 1 ] && echo ' (DRY RUN on CPU: tiny sizes, no GPU numbers)') | $(date -u +%FT%TZ)"
    echo
    echo "$PREFLIGHT"
    echo
    echo "| step | cap_s | took_s | status |"; echo "|---|---|---|---|"
    for s in "${STEPS[@]}"; do IFS='|' read -r n c t st <<<"$s"; echo "| $n | $c | $t | $st |"; done
    echo
    [ -s "$OUT/build_error.txt" ] && { echo "## build error (CUDA C++)"; echo '```'; cat "$OUT/build_error.txt"; echo '```'; }
    [ -f "$OUT/gpu_quick.md" ] && { echo "## gpu_quick"; echo; cat "$OUT/gpu_quick.md"; echo; }
    if [ -f "$OUT/tests_gpu.log" ]; then
      echo "## GPU tests"; echo '```'
      grep -E "^(=+ .*(passed|failed|skipped|error|deselected).* =+|# step )" "$OUT/tests_gpu.log"
      grep -E " (FAILED|TOLERANCE MISS|ERROR)( |$)" "$OUT/tests_gpu.log" | grep -v "^FAILED\|^ERROR" | head -40
      echo '```'
    fi
    [ -f "$OUT/gaussian/bench_gaussian_wasserstein.md" ] &&
      { echo "## gaussian_wasserstein"; echo; cat "$OUT/gaussian/bench_gaussian_wasserstein.md"; echo; }
    for f in bures train_step; do
      [ -f "$OUT/$f.txt" ] && { echo "## $f"; echo '```'; tail -25 "$OUT/$f.txt"; echo '```'; }
    done
    true  # (the status of the last test above is not the summary's)
  } >"$OUT/summary.md.tmp"
  mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}

# to_file FILE COMMAND...: COMMAND with its stdout and stderr appended to FILE.
to_file() { local f=$1; shift; "$@" >>"$f" 2>&1; }
export -f to_file

# run NAME CAP COMMAND...: run under `timeout CAP`, record the time and status, refresh the summary.
run() {
  local name=$1 cap=$2; shift 2
  log "$name (cap ${cap}s): $*"
  local t0 rc took st=ok
  t0=$(date +%s)
  timeout --kill-after=5 "$cap" bash -c '"$@"' "$name" "$@"; rc=$?  # bash: the exported functions too
  took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="TIMEOUT after ${cap}s"; status=1
  elif [ $rc -ne 0 ]; then st="FAILED (exit $rc)"; status=1; fi
  STEPS+=("$name|$cap|$took|$st")
  log "$name: $st in ${took}s"
  summarize
  return $rc
}

# 0. Preflight: one line naming the machine and the tools.
preflight() {
  local gpu nvcc
  gpu=$(nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,driver_version \
        --format=csv,noheader 2>/dev/null | head -1 |
        awk -F', ' '{printf "GPU %s, SM clock %s (max %s), memory clock %s (max %s), driver %s", $1,$2,$3,$4,$5,$6}')
  nvcc=$( (command -v nvcc >/dev/null && nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) \
          2>/dev/null | grep -o "release [0-9.]*" | head -1)
  $PY - "$gpu" "$nvcc" <<'EOF'
import importlib.metadata as md, shutil, subprocess, sys
import torch
gpu, nvcc = sys.argv[1] or "GPU: none (nvidia-smi absent or failed)", sys.argv[2] or "none"
try:
    import triton; tri = triton.__version__
except Exception as e:  # noqa: BLE001
    tri = f"unavailable ({type(e).__name__})"
try:
    ninja = subprocess.run([shutil.which("ninja") or "ninja", "--version"], capture_output=True, text=True,
                           timeout=5).stdout.strip() or "none"
except Exception:  # noqa: BLE001
    ninja = "none"
plugins = sorted({f"{ep.dist.name} {ep.dist.version}" for ep in md.entry_points(group="pytest11") if ep.dist})
cuda = f"{torch.cuda.get_device_name()}, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() \
    else "CUDA not available to torch"
print(f"preflight: {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}; {cuda}) | nvcc {nvcc} | "
      f"triton {tri} | ninja {ninja} | pytest {md.version('pytest')}, plugins: {', '.join(plugins) or 'none'} | "
      f"python {sys.version.split()[0]}")
EOF
}
export -f preflight
export PY
run preflight "$CAP_PREFLIGHT" to_file "$OUT/preflight.txt" preflight
PREFLIGHT="$(head -c 2000 "$OUT/preflight.txt" 2>/dev/null)"
log "$PREFLIGHT"
summarize

# 1. Build; on failure the same without the CUDA C++ sources, and on. With --tuning-ops the build adds
#    bench/cuda/sinkhorn_tuning_ops.cu (the ops bench/tune_sinkhorn.py sweeps; setup.py's WKD_BUILD_TUNING_OPS).
if [ $TUNING_OPS -eq 1 ]; then
  export WKD_BUILD_TUNING_OPS=1
  log "--tuning-ops: the build includes the benchmark-only ops torch.ops.wkd_tuning (WKD_BUILD_TUNING_OPS=1)"
fi
if [ $DRY -eq 1 ]; then
  STEPS+=("build|$CAP_BUILD|0|skipped (dry run: the CPU extension is already built)")
  summarize
elif ! run build "$CAP_BUILD" bash -c "$PY -m pip install --no-build-isolation --no-deps -e . >'$OUT/build.log' 2>&1"
then
  grep -E -i "error|fatal|killed" "$OUT/build.log" | head -40 >"$OUT/build_error.txt"
  [ -s "$OUT/build_error.txt" ] || tail -30 "$OUT/build.log" >"$OUT/build_error.txt"
  log "the CUDA C++ build failed (build_error.txt); retrying with WKD_NO_CUDA=1: Triton and torch rows and tests"
  run build_no_cuda "$CAP_BUILD_NO_CUDA" bash -c "WKD_NO_CUDA=1 $PY -m pip install --no-build-isolation --no-deps \
      -e . >'$OUT/build_no_cuda.log' 2>&1" || log "the build without CUDA C++ failed too; going on with what imports"
fi

# 2. gpu_quick: its rows go to OUTDIR as they are made (a kill keeps the finished ones), its lines to suite.log
#    (its first line names the build: wkd_kernels.build_info(), i.e. whether the CUDA C++ kernels are in).
run gpu_quick "$CAP_QUICK" to_file "$OUT/suite.log" $PY bench/gpu_quick.py "${QUICK_ARGS[@]}" \
  --budget-s $(( CAP_QUICK - 15 )) --out "$OUT"

# 3. GPU tests, one line each: CUDA C++ and torch backends first, then Triton. --maxfail and a per-test timeout
#    instead of -x (pytest-timeout when installed, else conftest's WKD_TEST_TIMEOUT_S).
tmo=()
if $PY -c "import pytest_timeout" 2>/dev/null; then tmo=(--timeout 60); else export WKD_TEST_TIMEOUT_S=60; fi
export PYTEST="$PY -m pytest -v -p tolerance -p no:cacheprovider --tb=short -rfE --maxfail=20 ${tmo[*]}"
export OTHER_TESTS_LIST="${OTHER_TESTS[*]}" OUT DRY
# tests_step NAME SELECTION OTHER_SELECTION: the GPU test file with -k SELECTION, then (on a GPU) the kernel test
# files with -k OTHER_SELECTION and every other test marked gpu with -k SELECTION, all into tests_gpu.log.
tests_step() {
  local others a b=5 c=5
  read -r -a others <<<"$OTHER_TESTS_LIST"
  echo "# step $1" >>"$OUT/tests_gpu.log"
  $PYTEST python_tests/test_sinkhorn_gpu.py -k "$2" >>"$OUT/tests_gpu.log" 2>&1; a=$?
  if [ ${#others[@]} -gt 0 ]; then
    $PYTEST "${others[@]}" -k "$3" >>"$OUT/tests_gpu.log" 2>&1; c=$?
    $PYTEST -m gpu python_tests --ignore=python_tests/test_sinkhorn_gpu.py "${others[@]/#/--ignore=}" -k "$2" \
      >>"$OUT/tests_gpu.log" 2>&1; b=$?
  fi
  # exit 5 = nothing selected: fine for the other files; for test_sinkhorn_gpu.py only in the dry run (no CUDA: its
  # tests, all marked gpu, are deselected)
  { [ $a -eq 0 ] || { [ "$DRY" = 1 ] && [ $a -eq 5 ]; }; } && { [ $b -eq 0 ] || [ $b -eq 5 ]; } &&
    { [ $c -eq 0 ] || [ $c -eq 5 ]; }
}
export -f tests_step
run tests_cuda "$CAP_TESTS_CUDA" tests_step tests_cuda "not triton" "cuda and not triton"
run tests_triton "$CAP_TESTS_TRITON" tests_step tests_triton "triton" "triton"

# 4. Bures / WKD-F at the ImageNet shape (N=256, C=512, 7x7), both covariances, grid 1 and 4.
run bures "$CAP_BURES" to_file "$OUT/bures.txt" $PY bench/bench_gaussian_wasserstein.py \
  "${BURES_ARGS[@]}" --time-limit $(( CAP_BURES - 8 )) --out "$OUT/gaussian"

# 5. Training-step latency: ResNet34 -> ResNet18 at batch 256, bf16 (needs torchvision).
if $HAS_TORCHVISION; then
  run train_step "$CAP_TRAIN_STEP" to_file "$OUT/train_step.txt" $PY bench/train_step_latency.py "${STEP_ARGS[@]}" \
    --json "$OUT/train_step.json"
else
  STEPS+=("train_step|$CAP_TRAIN_STEP|0|skipped (no torchvision)"); summarize
fi

# The dry run checks that OUTDIR holds what a GPU run returns (the build logs aside: the dry run does not build).
if [ $DRY -eq 1 ]; then
  want=(summary.md suite.log preflight.txt gpu_quick.json gpu_quick.md gpu_quick.csv tests_gpu.log
        gaussian/bench_gaussian_wasserstein.json)
  $HAS_TORCHVISION && want+=(train_step.json)
  missing=()
  for f in "${want[@]}"; do [ -s "$OUT/$f" ] || missing+=("$f"); done
  for f in gpu_quick.json gaussian/bench_gaussian_wasserstein.json train_step.json; do
    [ -s "$OUT/$f" ] && ! $PY -c "import json, sys; json.load(open(sys.argv[1]))" "$OUT/$f" 2>/dev/null &&
      missing+=("$f (not valid JSON)")
  done
  if [ ${#missing[@]} -gt 0 ]; then log "dry run: OUTDIR lacks ${missing[*]}"; status=1
  else log "dry run: OUTDIR holds ${want[*]}"; fi
fi
log "done in $(( $(date +%s) - START ))s (status $status); summary in $OUT/summary.md"
summarize
exit $status
