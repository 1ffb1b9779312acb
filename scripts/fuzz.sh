#!/usr/bin/env bash
# Builds the libFuzzer target for the checkpoint manifest parser with clang (16 or newer: the code
# needs std::source_location from libstdc++, which older clang cannot compile) and runs it for a
# short time (default 20 s; first argument overrides), seeded with tests/fuzz_corpus/.
# Only the parser's translation units are compiled, so this takes seconds, not a second full build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-20}
out=${BUILD_DIR:-$root/build}/fuzz
cxx=""
for c in clang++-19 clang++-18 clang++-17 clang++-16; do
  if command -v "$c" >/dev/null; then cxx=$c; break; fi
done
if [ -z "$cxx" ]; then
  echo "fuzz: no clang++ >= 16 found (scripts/install-deps.sh installs clang-16)" >&2
  exit 1
fi
mkdir -p "$out/corpus"
cp "$root"/tests/fuzz_corpus/* "$out/corpus/"
"$cxx" -std=c++20 -O1 -gline-tables-only -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root/include" -I"$root/src" \
  "$root/tests/fuzz_checkpoint_manifest.cpp" "$root/src/checkpoint/format.cpp" "$root/src/checkpoint/field_codec.cpp" "$root/src/core/error.cpp" \
  "$root/src/core/config.cpp" "$root/src/core/config_fields.cpp" "$root/src/core/dtype.cpp" \
  "$root/src/core/posix_io.cpp" "$root/src/core/state_precision.cpp" -o "$out/fuzz_checkpoint_manifest"
"$out/fuzz_checkpoint_manifest" -max_total_time="$seconds" -print_final_stats=1 "$out/corpus" 2>&1 | tail -n 12
