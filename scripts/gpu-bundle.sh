#!/usr/bin/env bash
# Collects, on a machine with the distribution's packages (the CI machine), everything the GPU
# build needs that a bare CUDA image lacks, into one ignored folder that travels with the working
# tree to the GPU machine (docs/gpu.md):
#   googletest/   GoogleTest + GoogleMock *sources* (built there by the GPU build itself, with the
#                 GPU image's own compiler and C library: nothing compiled here travels)
#   include/      header-only libraries the library itself includes: xxhash.h (checkpoint
#                 checksums, used with XXH_INLINE_ALL) and nlohmann/json.hpp (checkpoint manifest)
#   MANIFEST.txt  where each piece came from (package and version) and the bundle's size
# Google Benchmark is not bundled: bench_gpu_update is a plain program, and the benchmarks that
# need the library are skipped when it is missing. The command line and the examples (CLI11,
# OpenBLAS) and MPI, liburing are not built on the GPU machine.
#
# Each piece comes from the installed Debian package when there is one (scripts/install-deps.sh
# installs them), else from `apt-get download` of that package unpacked with `dpkg -x`.
# Usage: scripts/gpu-bundle.sh [DIR]   (default: .gpu-bundle at the repository root)
# Prints, last, the paths that must be named in the device call's `carry`, one per line after a
# line "carry:". Exits non-zero if a piece is missing or the bundle is over its size cap.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle=${1:-$root/.gpu-bundle}
cap_mib=${GPU_BUNDLE_CAP_MIB:-40}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$bundle"
mkdir -p "$bundle/include"
manifest="$bundle/MANIFEST.txt"
echo "# gpu bundle made $(date -u +%FT%TZ) on $(uname -n) by scripts/gpu-bundle.sh" >"$manifest"

# package_root <package>: prints a directory whose usr/ holds the package's files: / when it is
# installed, else a folder where `apt-get download` + `dpkg -x` unpacked it.
package_root() {
  local pkg=$1
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    echo "$pkg $(dpkg-query -W -f='${Version}' "$pkg") (installed)" >>"$manifest"
    echo /
    return
  fi
  (cd "$tmp" && apt-get download -qq "$pkg" >&2) || {
    echo "gpu-bundle: $pkg is neither installed nor downloadable (apt-get download $pkg)" >&2
    return 1
  }
  local deb
  deb=$(ls "$tmp"/"${pkg}"_*.deb | head -1)
  mkdir -p "$tmp/x-$pkg"
  dpkg -x "$deb" "$tmp/x-$pkg"
  echo "$pkg $(dpkg-deb -f "$deb" Version) (apt-get download)" >>"$manifest"
  echo "$tmp/x-$pkg"
}

# GoogleTest and GoogleMock sources (Debian: package googletest, /usr/src/googletest). Their own
# tests, docs and samples are left out.
r=$(package_root googletest)
src="$r/usr/src/googletest"
[ -f "$src/CMakeLists.txt" ] || { echo "gpu-bundle: no GoogleTest sources under $src" >&2; exit 1; }
mkdir -p "$bundle/googletest"
cp -a "$src/CMakeLists.txt" "$bundle/googletest/"
for part in googletest googlemock; do
  mkdir -p "$bundle/googletest/$part"
  for d in CMakeLists.txt cmake include src; do
    cp -a "$src/$part/$d" "$bundle/googletest/$part/"
  done
done

# xxHash (header-only use: XXH_INLINE_ALL).
r=$(package_root libxxhash-dev)
cp -a "$r/usr/include/xxhash.h" "$bundle/include/"
[ -f "$r/usr/include/xxh3.h" ] && cp -a "$r/usr/include/xxh3.h" "$bundle/include/"

# nlohmann-json (header-only).
r=$(package_root nlohmann-json3-dev)
cp -a "$r/usr/include/nlohmann" "$bundle/include/"

kib=$(du -sk "$bundle" | cut -f1)
echo "size: $kib KiB" >>"$manifest"
echo "gpu-bundle: $bundle ($kib KiB; cap $cap_mib MiB)"
if [ "$kib" -gt $((cap_mib * 1024)) ]; then
  echo "gpu-bundle: over the $cap_mib MiB cap" >&2
  exit 1
fi
# The bundle must be ignored by git (so it travels only when carried, and never gets committed).
if ! git -C "$root" check-ignore -q "$bundle" 2>/dev/null; then
  echo "gpu-bundle: warning: $bundle is not ignored by git" >&2
fi
echo "carry:"
realpath --relative-to="$root" "$bundle"
