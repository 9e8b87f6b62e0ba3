#!/usr/bin/env bash
# The one script a GPU session runs, from the repository root, with $OUT an (empty) output
# folder: records the machine, builds pydistill_ext in place with its CUDA kernels, runs the
# CUDA / Triton / op tests and the kd_loss GPU benchmark.
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh
#
# Knobs (environment):
#   GPU_CHECK_BUDGET_S  wall-clock budget of the whole script, seconds (default 560: one device
#                       command may run 600 s). Each stage gets what is left, in this order:
#                       build, tests/cuda, tests/triton, benchmarks (kd_loss, then dsa_augment
#                       with what is left), tests/ops (CPU-only tests,
#                       last: they need no GPU).
#   STAGES              subset of "env build cuda triton bench bnbench trajbench ops" (default:
#                       all; each benchmark stage runs only if time is left), e.g. split
#                       over two calls on a warm machine: STAGES="env build cuda" then
#                       STAGES="triton bench ops" (the in-place build stays between calls).
# Files written to $OUT (at most 8 come back): env.txt, build.log, pytest_cuda.txt,
# pytest_triton.txt, pytest_ops.txt, bench.log, bench_kd_loss_gpu.json, bench_kd_loss_gpu.md.
# No internet is needed: a Liger-Kernel wheel under ./wheels/ is installed with --no-index if
# present (else the benchmark skips Liger).
set -euo pipefail

: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUDGET_S="${GPU_CHECK_BUDGET_S:-560}"
STAGES="${STAGES:-env build cuda triton bench bnbench trajbench ops}"
T0=$(date +%s)
PY="${PYTHON:-python}"

log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
want() { [[ " $STAGES " == *" $1 "* ]]; }
STATUS=()

# ------------------------------------------------------------------ 1. machine and versions
if want env; then
  log "recording the machine into $OUT/env.txt"
  {
    echo "== date"; date -u
    echo "== nvidia-smi"; nvidia-smi || true
    echo "== nvidia-smi query"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version,compute_cap \
      --format=csv || true
    echo "== python / torch"
    "$PY" - <<'EOF' || true
import sys, torch
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "mem GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
EOF
    echo "== nvcc"; (/usr/local/cuda/bin/nvcc --version || nvcc --version) 2>&1 || true
    echo "== cpu"; nproc; (lscpu | head -20) 2>/dev/null || true
    echo "== pip"; "$PY" -m pip list 2>/dev/null | grep -iE "torch|triton|liger|numpy|pytest|hypothesis|setuptools|ninja|transformers" || true
  } > "$OUT/env.txt" 2>&1
  # Liger-Kernel from a local wheel only (no internet on the GPU machine)
  shopt -s nullglob
  wheels=(wheels/liger_kernel*.whl wheels/liger-kernel*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} )); then
    if "$PY" -m pip install --no-deps --no-index "${wheels[0]}" >> "$OUT/env.txt" 2>&1; then
      log "installed ${wheels[0]}"
    else
      log "could not install ${wheels[0]} (benchmark goes on without Liger)"
    fi
  else
    log "no Liger wheel under ./wheels (benchmark goes on without Liger)"
  fi
  echo "== liger" >> "$OUT/env.txt"
  "$PY" -c "import importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" >> "$OUT/env.txt" 2>&1 || true
fi

# ------------------------------------------------------------------ 2. build in place
if want build; then
  ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST="$ARCH" CUDA_HOME=/usr/local/cuda PYDISTILL_FORCE_CUDA=1 MAX_JOBS=16
  log "building in place for sm_${ARCH/./} (log: $OUT/build.log)"
  if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    log "pip install -e . failed; trying setup.py build_ext --inplace"
    if ! "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
      tail -60 "$OUT/build.log"
      log "BUILD FAILED"
      exit 2
    fi
  fi
  grep -E "pydistill_ext build:|ptxas|warning: .*kd_loss_kernel" "$OUT/build.log" | head -20 || true
  if ! "$PY" -c "
import pydistill_ext
from pydistill_ext._lib import WITH_CUDA, has_kernel
ok = WITH_CUDA and has_kernel('kd_loss_forward', 'CUDA')
print('pydistill_ext:', pydistill_ext.__file__, 'with_cuda', WITH_CUDA, 'CUDA kd_loss kernel', ok)
raise SystemExit(0 if ok else 1)
" 2>&1 | tee -a "$OUT/build.log"; then
    log "the build has no CUDA kernels (see $OUT/build.log)"
    STATUS+=("build: no CUDA kernels")
  else
    STATUS+=("build: ok")
  fi
fi

# ------------------------------------------------------------------ 3. tests
run_tests() {  # name dir max_seconds
  local name=$1 dir=$2 cap=$3
  if ! want "$name"; then return 0; fi
  if ! compgen -G "$dir/test_*.py" > /dev/null; then
    log "no tests in $dir"
    STATUS+=("$dir: no tests")
    return 0
  fi
  local t; t=$(left)
  (( t > cap )) && t=$cap
  if (( t < 20 )); then
    log "no time left for $dir"
    STATUS+=("$dir: skipped (time budget)")
    return 0
  fi
  log "pytest $dir (up to ${t}s; log: $OUT/pytest_$name.txt)"
  local rc=0
  timeout -s INT -k 15 "$t" "$PY" -m pytest -x -q -p no:cacheprovider -rfE "$dir" \
    > "$OUT/pytest_$name.txt" 2>&1 || rc=$?
  tail -25 "$OUT/pytest_$name.txt"
  if (( rc == 0 )); then STATUS+=("$dir: passed")
  elif (( rc == 5 )); then STATUS+=("$dir: no test ran (all skipped or none collected)")
  elif (( rc == 124 || rc == 130 )); then STATUS+=("$dir: TIMED OUT after ${t}s")
  else STATUS+=("$dir: FAILED (rc=$rc)"); fi
}

run_tests cuda tests/cuda 240
run_tests triton tests/triton 150

# ------------------------------------------------------------------ 4. benchmark
if want bench; then
  reserve=0
  want ops && reserve=60
  b=$(( $(left) - reserve - 45 ))  # 45 s: the variant in flight when the budget ends + writing
  if (( b < 30 )); then
    log "no time left for the benchmark"
    STATUS+=("bench: skipped (time budget)")
  else
    log "benchmark (budget ${b}s; log: $OUT/bench.log)"
    rc=0
    timeout -s INT -k 15 $(( b + 60 )) "$PY" benchmarks/bench_kd_loss_gpu.py \
      --out "$OUT/bench_kd_loss_gpu.json" --budget-s "$b" > "$OUT/bench.log" 2>&1 || rc=$?
    if (( rc == 0 )); then STATUS+=("bench: ok"); else STATUS+=("bench: FAILED (rc=$rc)"); tail -30 "$OUT/bench.log"; fi
    # fused DSA op vs per-image loop vs batched torch, CUDA, table appended to bench.log
    b=$(( $(left) - reserve - 15 ))
    if (( b >= 40 )); then
      timeout -s INT -k 10 "$b" "$PY" -m benchmarks.bench_dsa_augment --device cuda --reps 5 \
        --no-compile --print-only >> "$OUT/bench.log" 2>&1 && STATUS+=("bench dsa_augment: ok") \
        || STATUS+=("bench dsa_augment: FAILED or out of time")
    fi
  fi
fi

# bnbench: bn_moments vs the anchors' BN hook / var_mean / torch.compile on
# the GPU (benchmarks/bench_bn_moments.py --device cuda; writes bench_bn_moments_gpu.md only)
if want bnbench && (( $(left) > 90 )); then
  log "bn_moments GPU benchmark (log: $OUT/bench_bn_moments_gpu.md)"
  timeout -s INT -k 15 $(( $(left) - 30 )) "$PY" -m benchmarks.bench_bn_moments --device cuda \
    --reps 51 --out "$OUT" --name bench_bn_moments_gpu > "$OUT/bench_bn_moments_gpu.log" 2>&1 \
    && { rm -f "$OUT/bench_bn_moments_gpu.log" "$OUT/bench_bn_moments_gpu.json"; STATUS+=("bnbench: ok"); } \
    || { tail -20 "$OUT/bench_bn_moments_gpu.log"; STATUS+=("bnbench: FAILED"); }
  # BNStatMatcher vs the anchors' hook / compile, statistics and one whole recover iteration
  # (ResNet-18, batch 64, 32x32) on the GPU; writes bench_bn_matcher_gpu.md
  if (( $(left) > 60 )); then
    timeout -s INT -k 15 $(( $(left) - 30 )) "$PY" -m benchmarks.bench_bn_matcher --device cuda \
      --reps 51 --out "$OUT" --name bench_bn_matcher_gpu > "$OUT/bench_bn_matcher_gpu.log" 2>&1 \
      && { rm -f "$OUT/bench_bn_matcher_gpu.log" "$OUT/bench_bn_matcher_gpu.json"; STATUS+=("bnbench recover: ok"); } \
      || { tail -20 "$OUT/bench_bn_matcher_gpu.log"; STATUS+=("bnbench recover: FAILED"); }
  fi
fi

# expert ensemble on the GPU (issue 6): K=8 ConvNet-3 experts, one gradient and 1 epoch, as
# grouped convolutions, vmapped and one after another, on random images of MNIST / CIFAR shape
# (no dataset on this machine); writes bench_trajectory_gpu.md
if want trajbench && (( $(left) > 90 )); then
  log "expert-ensemble GPU benchmark (log: $OUT/bench_trajectory_gpu.log)"
  timeout -s INT -k 15 $(( $(left) - 30 )) "$PY" -m benchmarks.bench_trajectory --device cuda \
    --skip-part-a --experts 8 --expert-data synthetic-mnist:16384:256 synthetic-cifar:16384:256 \
    --step mnist:8:256 cifar:8:256 --step-reps 5 \
    --out "$OUT" --name bench_trajectory_gpu > "$OUT/bench_trajectory_gpu.log" 2>&1 \
    && { rm -f "$OUT/bench_trajectory_gpu.log" "$OUT/bench_trajectory_gpu.json"; STATUS+=("trajbench: ok"); } \
    || { tail -20 "$OUT/bench_trajectory_gpu.log"; STATUS+=("trajbench: FAILED"); }
fi

run_tests ops tests/ops 120

# ------------------------------------------------------------------ summary
echo
log "summary"
for s in "${STATUS[@]+"${STATUS[@]}"}"; do echo "  - $s"; done
if [[ -f "$OUT/bench_kd_loss_gpu.md" ]]; then
  echo
  cat "$OUT/bench_kd_loss_gpu.md"
fi
