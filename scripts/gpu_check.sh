#!/usr/bin/env bash
# `make gpu-check`: everything a GPU session should run, in one script that fits 8 minutes on one H200
# (16 cores, its own torch and CUDA, no internet). Steps, each under its own time limit and a global deadline:
#   1. environment (nvidia-smi, nvcc, torch)        -> gpu-check.log
#   2. wheels from .whl/ if present (pytorch-metric-learning for the comparison tests)
#   3. build the extension for sm_90 only, MAX_JOBS=16
#   4. the CUDA test cases (pytest -m needs_cuda)  -> pytest-cuda.xml (junit), output in gpu-check.log;
#      the triplet ones again on the scan path (METRICOPS_CUDA_TRIPLET_PATH=scan), the distance, contrastive,
#      triplet and retrieval ones on the review's other new kernels (METRICOPS_CUDA_COLUMN_SUMS=chunked,
#      METRICOPS_CUDA_SEMIHARD_COEFFICIENTS=warp, METRICOPS_CUDA_KNN_INSERT=warp)
#   5. compute-sanitizer memcheck and racecheck on scripts/gpu_smoke.py (every op once, small sizes)
#                                                   -> sanitizer-memcheck.log, sanitizer-racecheck.log
#   6. the review benchmarks (scripts/gpu_review_bench.py), each old and new kernel side by side
#      -> review-bench.json
#   7. the quick benchmark suite (python -m benchmarks --quick) -> bench-cuda.json, bench-cuda.png
#   8. summary.json: each step's status, seconds and log tail
# Results go to $GPU_CHECK_OUT, else $OUT (the device tool's folder that comes back), else build/gpu-check:
# at most 8 files, as the device tool returns.
#
# GPU_CHECK_DRY_RUN=1 (or --dry-run): on a machine without a GPU, print and check every step, and run
# what runs without one: the script's syntax, the CUDA tests' collection, the smoke script and the review
# benchmarks on CPU (tiny sizes), the benchmark CLI's --help. Nothing is built (the in-place build is used).
set -u -o pipefail

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-build/gpu-check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu-check.log"
STEPS="$OUT_DIR/.steps.tsv"  # folded into summary.json at the end, then removed
: > "$LOG"
: > "$STEPS"
if [ -z "${PYTHON:-}" ]; then
  if [ "$DRY_RUN" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-450}))  # leaves the device call's 8 minutes some slack
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { echo "[gpu-check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in the log, under min(LIMIT_S, time left).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 10 ]; then
    say "SKIP $name (global deadline reached)"
    printf '%s\tskipped\t0\t%s\n' "$name" "deadline" >> "$STEPS"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "RUN  $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status="failed(rc=$rc)"
  [ "$rc" -eq 124 ] && status="timed_out"
  say "DONE $name: $status in $(($(date +%s) - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$*" >> "$STEPS"
  return 0
}

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
say "root $ROOT, results in $OUT_DIR, python $PYTHON, dry run: $DRY_RUN"

# 1. environment
step environment 30 bash -c "uname -a; nproc; (nvidia-smi || echo 'no nvidia-smi'); (nvcc --version || echo 'no nvcc'); \
  echo \"compute-sanitizer: ${SANITIZER:-none}\"; \
  $PYTHON -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())'"

# 2. wheels carried in .whl/ (the device machine has no internet; see README "Running on a GPU")
if ls .whl/*.whl > /dev/null 2>&1; then
  if [ "$DRY_RUN" = 1 ]; then
    step wheels 60 bash -c "ls -la .whl/ && for w in .whl/*.whl; do $PYTHON -m zipfile -l \"\$w\" > /dev/null && echo \"ok \$w\"; done"
  else
    step wheels 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl
    export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  say "no .whl/ wheels: tests that need pytorch-metric-learning or faiss skip"
fi

# 3. build: sm_90 only (the H100/H200), all cores
if [ "$DRY_RUN" = 1 ]; then
  say "dry run: would build with: TORCH_CUDA_ARCH_LIST=9.0 METRICOPS_CUDA=1 MAX_JOBS=16 $PYTHON setup.py -q build_ext --inplace"
  step build-check 60 "$PYTHON" -c "import metricops, sys; info = metricops.build_info(); print(info); sys.exit(0 if info['cuda'] else 'the in-place build has no CUDA kernels')"
else
  step build 240 env TORCH_CUDA_ARCH_LIST=9.0 METRICOPS_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" setup.py -q build_ext --inplace
  step info 30 "$PYTHON" -m metricops.info
fi

# 4. the CUDA test cases
PYTEST=("$PYTHON" -m pytest tests -p no:cacheprovider -q -rs -m needs_cuda --durations=15 --junitxml="$OUT_DIR/pytest-cuda.xml")
if [ "$DRY_RUN" = 1 ]; then
  step cuda-tests-collect 120 "$PYTHON" -m pytest tests -p no:cacheprovider -q -m needs_cuda --collect-only
else
  step cuda-tests 120 "${PYTEST[@]}" -s
  # The triplet tests again on the sort-free scan path (METRICOPS_CUDA_TRIPLET_PATH=scan; output in the log).
  step cuda-tests-scan 60 env METRICOPS_CUDA_TRIPLET_PATH=scan "$PYTHON" -m pytest tests/test_triplet.py \
    tests/test_streaming.py tests/test_streaming_blocks.py tests/test_cuda_review.py -p no:cacheprovider -q -m needs_cuda
  # The review's new kernels, each selected by its own variable, on the tests that reach them: chunked row and
  # column sums (distance, contrastive, triplet backwards), the warp-per-row semi-hard coefficients, the
  # warp-cooperative knn insertion.
  step cuda-tests-review-paths 75 env METRICOPS_CUDA_COLUMN_SUMS=chunked METRICOPS_CUDA_SEMIHARD_COEFFICIENTS=warp \
    METRICOPS_CUDA_KNN_INSERT=warp "$PYTHON" -m pytest tests/test_pairwise_distance.py tests/test_contrastive.py \
    tests/test_triplet.py tests/test_retrieval.py -p no:cacheprovider -q -m needs_cuda
fi

# 5. compute-sanitizer on the reduced suite, on metricops' own kernels (kernel names holding "metricops";
# cuBLAS and ATen kernels are not the subject and would take minutes). No caching allocator: every tensor is
# its own allocation, so an out-of-bounds access cannot hide inside a pooled block.
SMOKE=("$PYTHON" scripts/gpu_smoke.py --quick)
SAN_OPTS=(--target-processes all --kernel-name kns=metricops --error-exitcode 3 --print-limit 50)
if [ "$DRY_RUN" = 1 ]; then
  step smoke-cpu 180 "${SMOKE[@]}" --device cpu
  say "dry run: would run: ${SANITIZER:-compute-sanitizer} --tool memcheck|racecheck ${SAN_OPTS[*]} ${SMOKE[*]}"
elif [ -n "$SANITIZER" ]; then
  step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck "${SAN_OPTS[@]}" \
    --log-file "$OUT_DIR/sanitizer-memcheck.log" "${SMOKE[@]}"
  step racecheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck --racecheck-report hazard \
    "${SAN_OPTS[@]}" --log-file "$OUT_DIR/sanitizer-racecheck.log" "${SMOKE[@]}"
else
  say "no compute-sanitizer found: sanitizer steps skipped"
  printf 'sanitizers\tskipped\t0\tno compute-sanitizer\n' >> "$STEPS"
fi

# 6. the review benchmarks
if [ "$DRY_RUN" = 1 ]; then
  step review-bench-cpu 180 "$PYTHON" scripts/gpu_review_bench.py --device cpu --tiny --reps 1 --json "$OUT_DIR/review-bench.json"
else
  step review-bench 75 "$PYTHON" scripts/gpu_review_bench.py --json "$OUT_DIR/review-bench.json"
fi

# 7. the quick benchmark suite
if [ "$DRY_RUN" = 1 ]; then
  step bench-cli 60 "$PYTHON" -m benchmarks --help
else
  step bench 90 "$PYTHON" -m benchmarks --quick --device cuda --json "$OUT_DIR/bench-cuda.json" --png "$OUT_DIR/bench-cuda.png"
fi

# 8. summary
"$PYTHON" - "$STEPS" "$OUT_DIR/summary.json" "$LOG" "$DRY_RUN" "$START" <<'EOF'
import json, sys, time
steps_path, out_path, log_path, dry_run, start = sys.argv[1:]
steps = []
for line in open(steps_path):
    name, status, seconds, command = line.rstrip("\n").split("\t", 3)
    steps.append(dict(name=name, status=status, seconds=int(seconds), command=command))
with open(log_path, errors="replace") as f:
    tail = f.read()[-4000:]
summary = dict(dry_run=dry_run == "1", seconds=int(time.time()) - int(start), steps=steps,
               ok=all(s["status"] in ("ok", "skipped") for s in steps), log_tail=tail)
with open(out_path, "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "log_tail"}, indent=1))
EOF
rm -f "$STEPS"
ls -la "$OUT_DIR" | tee -a "$LOG"
