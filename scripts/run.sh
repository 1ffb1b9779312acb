#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job: a short ZeRO stage-3 training run of the
# example model over 4 in-process ranks (`shardopt train`), with a progress line, the loss and rank
# 0's memory table. Arguments: [stage] [steps] [more shardopt train flags], e.g. `run.sh 1 100`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build}
stage=${1:-3}
steps=${2:-60}
shift $(($# < 2 ? $# : 2))
"$root/scripts/install-deps.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target shardopt_cli
"$build/src/cli/shardopt" train --ranks 4 --stage "$stage" --steps "$steps" "$@"
