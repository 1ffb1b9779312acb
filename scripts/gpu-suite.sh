#!/usr/bin/env bash
# Everything that needs a GPU, in one call, on a bare GPU machine (docs/gpu.md):
#
#   scripts/gpu-suite.sh [--quick | --build-only] [RESULTS_DIR]
#
# Needs the working tree, the ignored folder .gpu-bundle (scripts/gpu-bundle.sh: GoogleTest sources,
# header-only libraries) and the image: CUDA (nvcc), CMake, a host compiler, NCCL (the CUDA
# toolkit's, or the nvidia-nccl wheel of the image's python3). Nothing is downloaded.
#
# Steps, most valuable first, each with its own time cap and one log under RESULTS_DIR (default
# $OUT, else ./gpu-results); summary.txt there says what ran, how it ended and the key figures:
#   build.log            configure (CUDA on, sm_$CUDA_ARCH, NCCL required, no CLI/examples) + build
#   ctest-gpu.log        the gpu-labelled tests, every test as it ends: the CUDA backend against the
#                        CPU one, the engine's GPU tests (bits against the CPU, CUDA-graph capture),
#                        then the oracle matrix with every rank on the GPU
#   bench.log            bench_gpu_update (fused AdamW against a device-to-device copy), then
#                        PyTorch's fused AdamW on the same parameter count, then bench_gpu_step
#                        (a whole engine step captured in a CUDA graph against the eager step)
#   memcheck.log         compute-sanitizer memcheck over both GPU test binaries (subsets)
#   racecheck.log        compute-sanitizer racecheck over the reduction kernels
#   ncu.log              Nsight Compute on the fused update (occupancy, throughput)
# --quick: build, the gpu-labelled tests and bench_gpu_update only (for a rerun after a fix).
# --build-only: configure and build only, needs no GPU (CI runs this to keep the bundle complete).
#
# A GPU machine that is missing a GPU or NCCL fails at once, loudly (exit 2). The tests run with
# SHARDOPT_REQUIRE_GPU=1: a GPU test that would skip for want of a device or of NCCL fails.
# compute-sanitizer and ncu work on the Firecracker runtime only, not under gVisor: the suite
# says which runtime it is on and runs them only where they can work.
# The whole suite stays inside SUITE_BUDGET seconds (default 470, under 8 minutes); a step is cut
# at its own cap or at what is left of the budget, whichever is first; a step that cannot start
# with at least 20 s left is reported as not run. Every step runs even if an earlier one failed
# (except after a failed build). Exit status: 0 if every step passed, 1 otherwise, 2 if the machine
# lacks a GPU or NCCL.
# Environment: BUILD_DIR (default build-gpu), BUILD_TYPE (RelWithDebInfo), CUDA_ARCH (90), JOBS (all
# cores), BENCH_PARAMS (1e9), SUITE_BUDGET, CAP_SCALE (multiplies each step's cap; default 1),
# GPU_BUNDLE (default .gpu-bundle), SUITE_CXX_FLAGS (C++ flags of the build type, e.g. the main
# tree's in scripts/test.sh, so that ccache can reuse its objects).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=full
results=""
for a in "$@"; do
  case "$a" in
    --quick) mode=quick ;;
    --build-only) mode=build-only ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu-suite: unknown option $a" >&2; exit 2 ;;
    *) results=$a ;;
  esac
done
results=${results:-${OUT:-$PWD/gpu-results}}
build=${BUILD_DIR:-$root/build-gpu}
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc)}
params=${BENCH_PARAMS:-1e9}
budget=${SUITE_BUDGET:-470}
bundle=${GPU_BUNDLE:-$root/.gpu-bundle}
cap_scale=${CAP_SCALE:-1}  # multiplies every step's cap (CI's 2-core build needs more than 16 cores do)
mkdir -p "$results"
results=$(cd "$results" && pwd)
summary="$results/summary.txt"
: >"$summary"
failed=0
suite_start=$SECONDS

say() { echo "$*" | tee -a "$summary"; }

# step <name> <log> <cap seconds> <command...>: runs the command under `timeout`, capped at
# min(cap, what is left of the budget), appending its output to $results/<log> and the console.
# Records "<name>: ok|FAILED (exit N)|TIMED OUT after N s|not run (...)" in the summary.
step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local left=$((budget - (SECONDS - suite_start)))
  if [ "$left" -lt 20 ]; then
    say "== $name: not run (only $left s left of the $budget s budget)"
    failed=1
    return 1
  fi
  cap=$((cap * cap_scale))
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (cap $cap s): $*" | tee -a "$results/$log"
  local start=$SECONDS
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$results/$log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    say "== $name: ok ($took s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "== $name: TIMED OUT after $took s (cap $cap s)"
    failed=1
  else
    say "== $name: FAILED (exit $rc, $took s)"
    failed=1
  fi
  return "$rc"
}

# ---- the machine ------------------------------------------------------------------------------
say "gpu-suite ($mode) $(date -u +%FT%TZ) on $(uname -n), kernel $(uname -r), $(nproc) cores"
gpu_ok=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  gpu_ok=1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$summary"
fi
say "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo 'not found')"
say "cmake: $(cmake --version 2>/dev/null | head -1)"

# The runtime decides whether compute-sanitizer and ncu can work (docs/gpu.md): gVisor reports
# a 4.4.0 kernel and says so in /proc/version or dmesg; Firecracker kernels are named *-fc-*.
runtime=unknown
if grep -qi gvisor /proc/version 2>/dev/null || dmesg 2>/dev/null | head -5 | grep -qi gvisor ||
   [ "$(uname -r)" = "4.4.0" ]; then
  runtime=gvisor
elif uname -r | grep -q -- '-fc-' || grep -qi firecracker /proc/cmdline 2>/dev/null ||
     (command -v systemd-detect-virt >/dev/null && systemd-detect-virt 2>/dev/null | grep -q kvm); then
  runtime=firecracker
fi
say "runtime: $runtime (compute-sanitizer and ncu: $([ "$runtime" = gvisor ] && echo 'not usable under gVisor' || echo 'expected to work'))"

# NCCL: the CUDA toolkit's (or NCCL_ROOT's), else the nvidia-nccl wheel of the image's python3,
# whose library is libnccl.so.2 with no libnccl.so link: it is linked by its full path.
nccl_inc="" nccl_lib=""
for d in ${NCCL_ROOT:-} ${CUDA_HOME:-} /usr/local/cuda /usr; do
  [ -f "$d/include/nccl.h" ] || continue
  for l in "$d"/lib64/libnccl.so "$d"/lib/libnccl.so "$d"/lib/x86_64-linux-gnu/libnccl.so "$d"/lib64/libnccl.so.2 \
           "$d"/lib/libnccl.so.2 "$d"/lib/x86_64-linux-gnu/libnccl.so.2; do
    if [ -f "$l" ]; then nccl_inc=$d/include nccl_lib=$l; break 2; fi
  done
done
if [ -z "$nccl_lib" ] && command -v python3 >/dev/null; then
  wheel=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)
  if [ -n "$wheel" ] && [ -f "$wheel/include/nccl.h" ] && [ -f "$wheel/lib/libnccl.so.2" ]; then
    nccl_inc=$wheel/include nccl_lib=$wheel/lib/libnccl.so.2
  fi
fi
say "nccl: ${nccl_lib:-not found}"

if [ "$mode" != build-only ]; then
  [ "$gpu_ok" = 1 ] || { say "gpu-suite: FAILED: no GPU (nvidia-smi -L lists none): nothing here can be tested"; exit 2; }
  [ -n "$nccl_lib" ] || { say "gpu-suite: FAILED: no NCCL (neither the CUDA toolkit's nor python3's nvidia-nccl wheel)"; exit 2; }
fi
[ -f "$bundle/googletest/CMakeLists.txt" ] ||
  { say "gpu-suite: FAILED: no bundle at $bundle (run scripts/gpu-bundle.sh here first and carry it)"; exit 2; }

# ---- build --------------------------------------------------------------------------------------
# Only what the GPU checks need: no command line, no examples (their libraries are not on the
# image); the bundle's GoogleTest is built along with the tests, its headers come first.
# CMAKE_POLICY_VERSION_MINIMUM: the bundled GoogleTest asks for an old CMake policy level that
# CMake 4 refuses otherwise. -lineinfo: compute-sanitizer reports name source lines.
cfg=(-S "$root" -B "$build" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" -DSHARDOPT_CUDA=ON
     -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_CUDA_FLAGS=-lineinfo
     -DSHARDOPT_BUILD_CLI=OFF -DSHARDOPT_BUILD_EXAMPLES=OFF -DSHARDOPT_BUILD_GPT_EXAMPLE=ON -DSHARDOPT_MPI=OFF
     -DSHARDOPT_GTEST_SOURCE_DIR="$bundle/googletest" -DCMAKE_PREFIX_PATH="$bundle"
     -DCMAKE_POLICY_VERSION_MINIMUM=3.5)
[ -n "${SUITE_CXX_FLAGS:-}" ] && cfg+=(-DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$SUITE_CXX_FLAGS")
command -v ninja >/dev/null && cfg+=(-G Ninja)
command -v ccache >/dev/null && cfg+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
if [ -n "$nccl_lib" ]; then
  cfg+=(-DSHARDOPT_NCCL=ON -DNCCL_INCLUDE_DIR="$nccl_inc" -DNCCL_LIBRARY="$nccl_lib")
fi
# --build-only is CI's check that the bundle is complete: the system's copies of what the bundle
# brings (and of what the GPU image lacks) are hidden from CMake's searches.
# ("/" too: /lib is /usr/lib on merged-/usr systems, and CMake derives prefixes from PATH.)
[ "$mode" = build-only ] && cfg+=(-DCMAKE_IGNORE_PREFIX_PATH="/usr;/usr/local;/" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
targets=(test_cuda_backend test_engine_cuda test_compressed_state_cuda bench_gpu_update bench_gpu_step)
# The GPT example's CUDA ops and trainer (its CPU ops, the reference, use plain loops here: the
# image has no BLAS): built in a step of their own, so that a failure there stops nothing else.
gpt_targets=(test_gpt_cuda bench_gpt_cuda)

step configure build.log 90 cmake "${cfg[@]}" || { say "gpu-suite: configure failed, nothing else runs"; exit 1; }
step build build.log 300 cmake --build "$build" -j"$jobs" --target "${targets[@]}" ||
  { say "gpu-suite: build failed, nothing else runs"; exit 1; }
if [ "$mode" = build-only ]; then
  say "== built in $((SECONDS - suite_start)) s (failed=$failed)"
  exit "$failed"
fi

step build-gpt build.log 200 cmake --build "$build" -j"$jobs" --target "${gpt_targets[@]}"

# ---- the GPU tests ------------------------------------------------------------------------------
export SHARDOPT_REQUIRE_GPU=1
# The gpu label's binaries run directly (ctest would pass --gtest_brief=1 and a step cut by its
# cap would then leave no trace of what passed): the backend's kernels first (fast, and what
# everything else stands on), then the engine's own GPU tests (bits against the CPU, CUDA-graph
# capture), then the oracle matrix on the GPU, each capped on its own. A gpu-labelled test that
# is neither binary runs through ctest after them.
gpu_tests=$(ctest --test-dir "$build" -N -L gpu | sed -n 's/^ *Test *#[0-9]*: //p')
step test-cuda-backend ctest-gpu.log 120 "$build/tests/test_cuda_backend"
step test-engine-cuda ctest-gpu.log 150 "$build/tests/test_engine_cuda" --gtest_filter='-*CudaOracle*'
step test-engine-oracle ctest-gpu.log 200 "$build/tests/test_engine_cuda" --gtest_filter='*CudaOracle*'
others=$(echo "$gpu_tests" | grep -v -x -e test_cuda_backend -e test_engine_cuda | paste -sd'|' || true)
if [ -n "$others" ]; then
  step ctest-gpu-others ctest-gpu.log 120 ctest --test-dir "$build" -L gpu -R "^($others)\$" --output-on-failure
fi
# gtest's own totals per run, and the name of every failed or skipped test (only the NCCL ranks
# that need more GPUs than this machine has may skip).
awk '{ line = $0; sub(/ \([0-9]+ ms\)$/, "", line); sub(/, where GetParam\(\) = .*/, "", line) }
     line ~ /^\[==========\] .* ran\./ || line ~ /^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ tests?[.,]/ {
       print "   " line; next }
     line ~ /^\[  (SKIPPED|FAILED) +\] / && !seen[line]++ { if (++names <= 40) print "   " line; else more++ }
     END { if (more) print "   ... and " more " more failed or skipped tests (ctest-gpu.log)" }' "$results/ctest-gpu.log" |
  tee -a "$summary"

# ---- benchmarks ---------------------------------------------------------------------------------
step bench-gpu-update bench.log 90 "$build/bench/bench_gpu_update" --params "$params"
ms_per_1b=$(sed -n 's/^RESULT params=.*ms_per_1B=\([0-9.]*\).*/\1/p' "$results/bench.log" | tail -1)
grep -E '^(RESULT|fused|floor|update time|copy|AdamW)' "$results/bench.log" | sed 's/^/   /' | tee -a "$summary"
if [ "$mode" = quick ]; then
  say "== quick suite done in $((SECONDS - suite_start)) s (failed=$failed); logs in $results"
  exit "$failed"
fi
torch_args=(--params "$params")
[ -n "$ms_per_1b" ] && torch_args+=(--shardopt-ms-per-1b "$ms_per_1b")
step bench-torch-adamw bench.log 90 python3 "$root/scripts/bench_torch_adamw.py" "${torch_args[@]}"
grep -E '^(torch|shardopt /)' "$results/bench.log" | sed 's/^/   /' | tee -a "$summary"
for st in 0 3; do
  step bench-gpu-step bench.log 60 "$build/bench/bench_gpu_step" --stage "$st"
done
grep -E '^(eager|captured)|^RESULT stage' "$results/bench.log" | sed 's/^/   /' | tee -a "$summary"
# The GPT trainer on the GPU: GPT-2 small (124M), seq 1024, bf16, stage 1, one rank.
if [ -x "$build/bench/bench_gpt_cuda" ]; then
  step bench-gpt-cuda bench.log 90 "$build/bench/bench_gpt_cuda" --preset small --seq 1024 --batch 8 --steps 8
  step bench-gpt-cuda bench.log 90 "$build/bench/bench_gpt_cuda" --preset small --seq 1024 --batch 8 --steps 8 --stage 3
  # GPT-2 XL (1.56B) at stage 3 with optimizer and parameter offload: the device memory measured
  # against the engine's report and the trainer's activations.
  step bench-gpt-cuda bench.log 120 "$build/bench/bench_gpt_cuda" --preset xl --seq 1024 --batch 4 --steps 4 --stage 3 \
    --offload host --offload-params --recompute
  grep -E '^RESULT gpt_cuda' "$results/bench.log" | sed 's/^/   /' | tee -a "$summary"
else
  say "== bench-gpt-cuda: not run (bench_gpt_cuda was not built, build.log says why)"
  failed=1
fi

# ---- sanitizers and counters (Firecracker only) -------------------------------------------------
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ "$runtime" = gvisor ]; then
  say "== memcheck, racecheck, ncu: not run (gVisor runtime: compute-sanitizer and ncu do not work there)"
elif [ ! -x "$cs" ]; then
  say "== memcheck, racecheck: FAILED: compute-sanitizer not found"
  failed=1
else
  # Left out of memcheck: the deliberate out-of-memory test (the sanitizer reports the failed
  # cudaMalloc as an API error) and everything NCCL (its transport memory is outside what memcheck
  # models): the NCCL test of the backend binary and the NCCL oracle and graph tests of the engine.
  step memcheck memcheck.log 100 "$cs" --tool memcheck --leak-check full --error-exitcode 1 \
    "$build/tests/test_cuda_backend" --gtest_brief=1 --gtest_filter='-*HugeAllocation*:*Nccl*'
  step memcheck-engine memcheck.log 100 "$cs" --tool memcheck --leak-check full --error-exitcode 1 \
    "$build/tests/test_engine_cuda" --gtest_brief=1 \
    --gtest_filter='*CudaOracle*_world1_bf16_adamw:*CudaOracle*_world3_bf16_adamw:CudaEngine.SameBitsAsCpu:CudaEngine.NoDevice*'
  step racecheck racecheck.log 60 "$cs" --tool racecheck --error-exitcode 1 "$build/tests/test_cuda_backend" \
    --gtest_brief=1 --gtest_filter='*SumSquares*:*FusedUpdate*:*Unscale*:*StepTotals*'
fi
if [ "$runtime" != gvisor ] && command -v ncu >/dev/null; then
  # Occupancy and memory throughput of the fused update (a 1e8-parameter run, one launch profiled).
  step ncu ncu.log 60 ncu --clock-control none --kernel-name regex:fused_update --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats "$build/bench/bench_gpu_update" --params 1e8 --iters 2 --warmup 1
fi

say "== suite done in $((SECONDS - suite_start)) s (failed=$failed); logs in $results"
exit "$failed"
