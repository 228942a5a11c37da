#!/usr/bin/env bash
# One call on a fresh GPU machine with torch (and triton) already installed:
#   bash bench/gpu_suite.sh OUTDIR
# builds the package, runs the GPU tests and the benchmarks, and writes OUTDIR/summary.md (a short table) plus
# the raw CSV/JSON and logs. The released cost matrices are read from data/ (copy ../shared/data/*.pth there
# before the call; the folder is git-ignored) or WKD_DATA_DIR.
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_suite.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
status=0
log() { echo "[gpu_suite $(date +%T)] $*" | tee -a "$OUT/suite.log"; }

log "build"
pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { log "BUILD FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1; }
python -c "import wkd_kernels, json, torch; print(torch.cuda.get_device_name(), json.dumps(wkd_kernels.build_info()))" | tee -a "$OUT/suite.log"

log "GPU tests"
python -m pytest python_tests -q -m gpu -x -p no:cacheprovider >"$OUT/tests_gpu.log" 2>&1 || status=1
tail -3 "$OUT/tests_gpu.log" | tee -a "$OUT/suite.log"

log "compare_pot (Sinkhorn)"
timeout 300 python bench/compare_pot.py --device cuda --sizes 256x1000,256x100,256x91,2048x100,2048x91 \
  --reps 50 --warmup 10 --pot-reps 1 --pot-batch-rows 16 --json "$OUT/compare_pot.json" >"$OUT/compare_pot.txt" 2>&1 || status=1
cat "$OUT/compare_pot.txt" | tee -a "$OUT/suite.log"

for extra in bench/bench_gaussian.py bench/train_step_latency.py; do
  if [ -f "$extra" ]; then
    name=$(basename "$extra" .py)
    log "$name"
    timeout 240 python "$extra" --device cuda --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || status=1
    tail -40 "$OUT/$name.txt" | tee -a "$OUT/suite.log"
  fi
done

# Issue 6: ImageNet-size synthetic training throughput, KD vs WKD-L vs WKD-L+WKD-F (ResNet34 -> ResNet18,
# global batch 256, bf16, channels_last; random teacher and random stand-in cost: the step cost does not depend
# on their values). images_per_s is in each run's summary.json.
if python -c "import torchvision" 2>/dev/null; then
  for m in kd wkd_l wkd_lf; do
    log "classification throughput r34_r18/$m"
    timeout 150 python -m examples.classification.train --config examples/classification/configs/imagenet/r34_r18/$m.yaml \
      --synthetic --out "$OUT/cls_$m" train.epochs=1 train.steps_per_epoch=150 data.synthetic_size=38400 \
      data.synthetic_val_size=256 train.log_every=50 >"$OUT/cls_$m.log" 2>&1 || status=1
    python -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], 'img/s', s.get('images_per_s'))" \
      "$OUT/cls_$m/summary.json" "$m" 2>&1 | tee -a "$OUT/classification_throughput.txt" "$OUT/suite.log"
  done
  # Issue 7: Faster R-CNN FPN step time at batch 8, student only vs WKD-L + WKD-F (RN101 -> RN18).
  log "detection step time"
  timeout 200 python -m examples.detection.bench_step --pair r101_r18 --batch 8 --size 800 --amp bf16 \
    --modes student,wkd_lf --json "$OUT/detection_step.json" >"$OUT/detection_step.txt" 2>&1 || status=1
  tail -15 "$OUT/detection_step.txt" | tee -a "$OUT/suite.log"
else
  log "torchvision missing: examples' throughput skipped"
fi

{
  echo "# GPU suite: $(python -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)')"
  echo
  echo '## tests'; echo '```'; tail -3 "$OUT/tests_gpu.log"; echo '```'
  echo '## compare_pot'; echo '```'; cat "$OUT/compare_pot.txt"; echo '```'
  for f in "$OUT"/bench_gaussian.txt "$OUT"/train_step_latency.txt "$OUT"/classification_throughput.txt \
           "$OUT"/detection_step.txt; do
    [ -f "$f" ] && { echo "## $(basename "$f" .txt)"; echo '```'; tail -40 "$f"; echo '```'; }
  done
} >"$OUT/summary.md"
log "done (status $status)"
exit $status
