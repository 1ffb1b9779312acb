#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a machine that has one:
#   1. configure with CUDA ON (arch 90 unless CUDA_ARCH says otherwise) and build,
#   2. ctest -L gpu (the CUDA backend against the CPU one, and the engine oracle on the GPU),
#   3. the GPU test binaries under compute-sanitizer memcheck (the engine's on a subset of its
#      matrix: every stage, one rank and three ranks on the GPU) and racecheck,
#   4. bench_gpu_update (fused AdamW vs its memcpy floor) and, if torch is installed,
#      scripts/bench_torch_adamw.py on the same parameter count, with the ratio.
# All output goes to the directory given as $1 (default: $OUT, else ./gpu-results): one log per
# step plus summary.txt. Every step runs even if an earlier one failed; the exit status is
# non-zero if any step failed. Environment: BUILD_DIR, CUDA_ARCH, JOBS, BENCH_PARAMS (default 1e9).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
results=${1:-${OUT:-$PWD/gpu-results}}
build=${BUILD_DIR:-$root/build-gpu}
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc)}
params=${BENCH_PARAMS:-1e9}
mkdir -p "$results"
results=$(cd "$results" && pwd)
summary="$results/summary.txt"
: >"$summary"
failed=0

# step <name> <command...>: runs it with output to $results/<name>.log (and the console).
step() {
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$summary"
  local start=$SECONDS
  "$@" 2>&1 | tee "$results/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "   -> exit $rc after $((SECONDS - start)) s" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

{
  echo "host: $(hostname)  date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi not available"
  nvcc --version 2>&1 | tail -1 || true
} | tee "$results/machine.txt"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
step configure cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSHARDOPT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DSHARDOPT_BUILD_EXAMPLES=OFF
step build cmake --build "$build" -j"$jobs" --target test_cuda_backend test_engine_cuda bench_gpu_update

test_bin="$build/tests/test_cuda_backend"
step ctest-gpu ctest --test-dir "$build" -L gpu --output-on-failure

if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # Left out of memcheck: the deliberate out-of-memory test (the sanitizer counts the failed
  # cudaMalloc as an API error) and NCCL (its own transport memory is outside what memcheck models).
  step memcheck "$cs" --tool memcheck --leak-check full --error-exitcode 1 "$test_bin" --gtest_brief=1 \
    --gtest_filter='-*HugeAllocation*:*Nccl*'
  step memcheck-engine "$cs" --tool memcheck --leak-check full --error-exitcode 1 "$build/tests/test_engine_cuda" \
    --gtest_brief=1 --gtest_filter='*CudaOracle*_world1_*adamw*:*CudaOracle*_world3_bf16_*:*CudaEngine*'
  step racecheck "$cs" --tool racecheck --error-exitcode 1 "$test_bin" --gtest_brief=1 \
    --gtest_filter='*SumSquares*:*FusedUpdate*:*Unscale*'
else
  echo "== compute-sanitizer not found: memcheck/racecheck not run" | tee -a "$summary"
  failed=1
fi

step bench-gpu-update "$build/bench/bench_gpu_update" --params "$params"
ms_per_1b=$(sed -n 's/^RESULT .*ms_per_1B=\([0-9.]*\).*/\1/p' "$results/bench-gpu-update.log" | tail -1)
torch_args=(--params "$params")
[ -n "$ms_per_1b" ] && torch_args+=(--shardopt-ms-per-1b "$ms_per_1b")
step bench-torch-adamw python3 "$root/scripts/bench_torch_adamw.py" "${torch_args[@]}"

grep -h -E '^(RESULT|fused|floor|update time|torch|shardopt /)' "$results"/bench-*.log >>"$summary" 2>/dev/null
echo "== results in $results (failed=$failed)" | tee -a "$summary"
exit "$failed"
