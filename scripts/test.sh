#!/usr/bin/env bash
# Installs what is missing, builds everything, and runs the whole test suite:
#   1. the main build (CUDA code compiled when a toolkit is found; GPU tests skip without a GPU),
#   2. with nvcc: the GPU targets built as the GPU machine builds them, from the GPU bundle with the
#      system's packages hidden (scripts/gpu-bundle.sh, scripts/gpu-suite.sh --build-only),
#   3. a consumer project built against the *installed* package (find_package(shardopt)),
#   4. ThreadSanitizer and AddressSanitizer+UBSan builds running the CPU tests (set
#      SHARDOPT_SANITIZERS=0 to skip both),
#   5. a short libFuzzer run over the checkpoint manifest parser (scripts/fuzz.sh),
#   6. the whole suite of the main build (labels cpu, gpu — skipped without a device — and mpi).
# Exits non-zero if anything fails.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
jobs=${JOBS:-2}
build=${BUILD_DIR:-$root/build}

"$root/scripts/install-deps.sh"

# The main tree: -O2 with line tables (-g1; full -g costs a quarter more compile time and a test
# failure's backtrace needs only lines), device code for sm_90 with -lineinfo, as the GPU suite
# builds it. With ccache (install-deps.sh installs it) and CCACHE_NOHASHDIR, the GPU-bundle tree
# below then compiles only what differs from this one (the bundle's headers, GoogleTest).
main_flags="-O2 -g1 -DNDEBUG"
launcher=()
if command -v ccache >/dev/null; then
  export CCACHE_NOHASHDIR=1
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
echo "== build ($build)"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "${launcher[@]}" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$main_flags" -DCMAKE_C_FLAGS_RELWITHDEBINFO="$main_flags" \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS=-lineinfo
cmake --build "$build" -j"$jobs"

# The GPU machine has no package registry: its build uses the bundle alone. Build the GPU targets
# here the way the GPU suite does, from the bundle, with the system's copies of what it brings
# hidden, so a dependency the bundle lacks breaks CI instead of the next GPU lease (docs/gpu.md).
if command -v nvcc >/dev/null; then
  echo "== GPU targets from the GPU bundle (system packages hidden)"
  "$root/scripts/gpu-bundle.sh" "$root/.gpu-bundle"
  BUILD_DIR="$build-gpu-bundle" JOBS="$jobs" CAP_SCALE=6 SUITE_BUDGET=2400 SUITE_CXX_FLAGS="$main_flags" \
    "$root/scripts/gpu-suite.sh" --build-only "$build-gpu-bundle/suite"
fi

echo "== installed package + consumer"
rm -rf "$build/install" "$build/consumer"
cmake --install "$build" --prefix "$build/install" >/dev/null
# The components this installation has (one export file each), asked for by name: the consumer
# links shardopt::cuda / shardopt::mpi and calls into each.
cfgdir=$(dirname "$(find "$build/install" -name shardoptConfig.cmake | head -1)")
comps=$(cd "$cfgdir" && ls shardopt_*Targets.cmake 2>/dev/null | sed 's/^shardopt_\(.*\)Targets.cmake$/\1/' | paste -sd';' -)
echo "components installed: ${comps:-none}"
cmake -S "$root/examples/consumer" -B "$build/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$build/install" \
  "-DSHARDOPT_CONSUMER_COMPONENTS=$comps"
cmake --build "$build/consumer" -j"$jobs"
"$build/consumer/shardopt_consumer"
[ -z "$comps" ] || "$build/consumer/shardopt_components"
# A CPU-only consumer asks for no component: with CUDA, MPI and pkg-config hidden from CMake it
# must configure and link, against a copy of the package moved elsewhere (relocatable), and its
# binary must need none of libcudart, libnccl, libmpi, liburing.
rm -rf "$build/install-moved" "$build/consumer-cpu"
cp -a "$build/install" "$build/install-moved"
cmake -S "$root/examples/consumer" -B "$build/consumer-cpu" -G Ninja -DCMAKE_PREFIX_PATH="$build/install-moved" \
  -DSHARDOPT_CONSUMER_COMPONENTS= -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON -DCMAKE_DISABLE_FIND_PACKAGE_CUDA=ON \
  -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON >/dev/null
cmake --build "$build/consumer-cpu" -j"$jobs" >/dev/null
if readelf -d "$build/consumer-cpu/shardopt_consumer" | grep NEEDED | grep -Ei 'cudart|nccl|libmpi|uring'; then
  echo "FAIL: the CPU-only consumer needs a CUDA, NCCL, MPI or liburing library (above)"; exit 1
fi
if ldd "$build/consumer-cpu/shardopt_consumer" | grep -Ei 'cudart|nccl|libmpi|uring'; then
  echo "FAIL: the CPU-only consumer loads a CUDA, NCCL, MPI or liburing library (above)"; exit 1
fi
"$build/consumer-cpu/shardopt_consumer" | tail -1
# Asking for a component that does not exist fails at configure time, naming it.
if cmake -S "$root/examples/consumer" -B "$build/consumer-bad" -G Ninja -DCMAKE_PREFIX_PATH="$build/install" \
     -DSHARDOPT_CONSUMER_COMPONENTS=nosuch >"$build/consumer-bad.log" 2>&1 ||
   ! grep -q "no component 'nosuch'" "$build/consumer-bad.log"; then
  echo "FAIL: find_package(shardopt COMPONENTS nosuch) did not fail with a message naming it"; exit 1
fi
# A C trainer built the Makefile way: the C interface through pkg-config, no CMake.
pc="$build/install/lib/pkgconfig"
[ -d "$pc" ] || pc=$(dirname "$(find "$build/install" -name shardopt_c.pc | head -1)")
cc -std=c99 -O1 -o "$build/consumer/c_consumer" "$root/tests/capi/test_capi.c" \
  $(PKG_CONFIG_PATH="$pc" pkg-config --cflags --libs shardopt_c) -lpthread -lm
LD_LIBRARY_PATH="$(PKG_CONFIG_PATH="$pc" pkg-config --variable=libdir shardopt_c)" "$build/consumer/c_consumer" | tail -1
# libshardopt_c is the core alone: neither it nor the C program needs CUDA, NCCL, MPI or liburing.
for f in "$build/consumer/c_consumer" "$(PKG_CONFIG_PATH="$pc" pkg-config --variable=libdir shardopt_c)/libshardopt_c.so"; do
  if readelf -d "$f" | grep NEEDED | grep -Ei 'cudart|nccl|libmpi|uring'; then
    echo "FAIL: $f needs a CUDA, NCCL, MPI or liburing library (above)"; exit 1
  fi
done

if [ "${SHARDOPT_SANITIZERS:-1}" != "0" ]; then
  # -O1, the level the sanitizer documentation suggests, and -g1: line tables, all a sanitizer's
  # stack trace needs. Full debug info (-g) doubles the instrumented compile here (format.cpp under
  # ASan+UBSan: 69 s at -O1 -g, 34 s at -O1 -g1) and these two trees were most of CI's time.
  san_flags="-O1 -g1 -DNDEBUG"
  echo "== ThreadSanitizer build (CPU tests)"
  tsan="$build-tsan"
  cmake -S "$root" -B "$tsan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHARDOPT_CUDA=OFF "${launcher[@]}" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$san_flags" -DCMAKE_C_FLAGS_RELWITHDEBINFO="$san_flags" \
    -DSHARDOPT_SANITIZE=thread -DSHARDOPT_BUILD_BENCHMARKS=OFF -DSHARDOPT_BUILD_EXAMPLES=OFF -DSHARDOPT_BUILD_CLI=OFF
  cmake --build "$tsan" -j"$jobs"
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" ctest --test-dir "$tsan" -L cpu --output-on-failure -j"$jobs"

  echo "== AddressSanitizer + UndefinedBehaviorSanitizer build (CPU tests)"
  asan="$build-asan"
  cmake -S "$root" -B "$asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHARDOPT_CUDA=OFF "${launcher[@]}" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$san_flags" -DCMAKE_C_FLAGS_RELWITHDEBINFO="$san_flags" \
    -DSHARDOPT_SANITIZE="address;undefined" -DSHARDOPT_BUILD_BENCHMARKS=OFF -DSHARDOPT_BUILD_EXAMPLES=OFF \
    -DSHARDOPT_BUILD_CLI=OFF
  cmake --build "$asan" -j"$jobs"
  ASAN_OPTIONS="detect_leaks=1" UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1" \
    ctest --test-dir "$asan" -L cpu --output-on-failure -j"$jobs"
fi

echo "== fuzzing the checkpoint manifest parser (${SHARDOPT_FUZZ_SECONDS:-20} s)"
"$root/scripts/fuzz.sh" "${SHARDOPT_FUZZ_SECONDS:-20}"

echo "== test suite"
ctest --test-dir "$build" --output-on-failure -j"$jobs"
