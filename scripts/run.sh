#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job: a small GPT (GPT-2's architecture,
# `--preset tiny`, byte-level) trained on the shipped corpus (data/corpus.txt) at ZeRO stage 3
# over 4 in-process ranks (`shardopt train --model gpt`), with a live line (loss, tokens/s, MFU,
# memory per rank), rank 0's memory table, then a sample from the trained model
# (`shardopt generate`). Arguments: [stage] [steps] [more shardopt train flags], e.g.
# `run.sh 1 100`. MODEL=mlp runs the minimal example (residual MLP blocks) instead.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build}
stage=${1:-3}
steps=${2:-150}
shift $(($# < 2 ? $# : 2))
"$root/scripts/install-deps.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target shardopt_cli
shardopt="$build/src/cli/shardopt"
if [ "${MODEL:-gpt}" = mlp ]; then
  exec "$shardopt" train --ranks 4 --stage "$stage" --steps "$steps" "$@"
fi
data="$build/corpus.bin"
[ "$data" -nt "$root/data/corpus.txt" ] || "$shardopt" tokenize --bytes "$root/data/corpus.txt" "$data"
"$shardopt" train --model gpt --preset tiny --data "$data" --seq 64 --batch 4 --ranks 4 --stage "$stage" \
  --steps "$steps" --clip 1 --save "$build/gpt-demo" "$@"
echo "--- a sample from the trained model (shardopt generate):"
"$shardopt" generate --checkpoint "$build/gpt-demo" --prompt "In the morning, " --tokens 160 --temperature 0.7
