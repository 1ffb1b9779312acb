#!/usr/bin/env bash
# Installs what shardopt needs to build and test, from the distribution's packages (Debian/Ubuntu).
# Installs only what is missing; safe to run again. The CUDA toolkit is not installed here: the
# CUDA backend is built when nvcc is found (SHARDOPT_CUDA=AUTO) and skipped otherwise.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  ccache                             # scripts/test.sh: the GPU-bundle tree reuses the main tree's objects
  libgtest-dev libgmock-dev          # tests
  libbenchmark-dev                   # benchmarks
  libopenblas-dev                    # the example trainer's GEMMs
  libcli11-dev nlohmann-json3-dev    # the shardopt command line
  libopenmpi-dev openmpi-bin         # multi-process: MPI communicator, bootstrap, mpirun tests
  liburing-dev                       # NVMe offload (io_uring)
  libxxhash-dev                      # checkpoint checksums (xxHash64)
  clang-16 libfuzzer-16-dev libclang-rt-16-dev  # scripts/fuzz.sh (libFuzzer)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
