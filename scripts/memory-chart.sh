#!/usr/bin/env bash
# Memory per rank per ZeRO stage for one model: what `shardopt estimate` predicts next to what
# `shardopt train` measured (rank 0's peak engine bytes), with the ZeRO paper's formula for
# reference, rendered with gnuplot into bench/memory_per_stage.svg (and the numbers into
# bench/memory_per_stage.dat).
#
#   scripts/memory-chart.sh [extra flags for both estimate and train]
#
# Environment: BUILD_DIR (default build), LAYERS (8), HIDDEN (256), RANKS (4), DTYPE (bf16),
# STEPS (10). Needs gnuplot (Debian: gnuplot-nox) and python3; CI does not run this script.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build}
layers=${LAYERS:-8} hidden=${HIDDEN:-256} ranks=${RANKS:-4} dtype=${DTYPE:-bf16} steps=${STEPS:-10}
command -v gnuplot >/dev/null || { echo "memory-chart: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "memory-chart: python3 not found" >&2; exit 1; }

if [ ! -x "$build/src/cli/shardopt" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$build" -j"${JOBS:-2}" --target shardopt_cli
fi
shardopt="$build/src/cli/shardopt"
model=(--layers "$layers" --hidden "$hidden" --dtype "$dtype" "$@")
dat="$root/bench/memory_per_stage.dat"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for stage in 0 1 2 3; do
  "$shardopt" estimate "${model[@]}" --world "$ranks" --stage "$stage" --json | tail -1 >"$tmp/estimate$stage.json"
  "$shardopt" train "${model[@]}" --ranks "$ranks" --stage "$stage" --steps "$steps" --json 2>/dev/null |
    tail -1 >"$tmp/train$stage.json"
done

python3 - "$tmp" "$dat" <<'PY'
import json, sys
tmp, dat = sys.argv[1], sys.argv[2]
mib = 1024.0 * 1024.0
with open(dat, "w") as out:
    first = json.load(open(f"{tmp}/train0.json"))
    out.write(f"# {first['params']} params ({first['layers']} blocks, hidden {first['hidden']}), "
              f"{first['ranks']} ranks, {first['dtype']}, {first['optimizer']}, bucket {first['bucket_bytes']} B\n")
    out.write("# stage  predicted_MiB  measured_MiB  zero_formula_MiB  (device bytes per rank)\n")
    for s in range(4):
        e = json.load(open(f"{tmp}/estimate{s}.json"))
        t = json.load(open(f"{tmp}/train{s}.json"))
        pred = e["bytes"]["device"]["total"] / mib
        meas = t["peak_bytes"][0]["device"]["total"] / mib
        out.write(f"{s} {pred:.4f} {meas:.4f} {e['zero_formula_bytes'] / mib:.4f}\n")
PY
cat "$dat"

title=$(sed -n '1s/^# //p' "$dat")
gnuplot <<GP
set terminal svg size 760,440 dynamic font "sans,12" background rgb "white"
set output "$root/bench/memory_per_stage.svg"
set title "Engine memory per rank by ZeRO stage\n{/*0.8 $title}"
set ylabel "MiB per rank (device)"
set xlabel "ZeRO stage"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key top right
set grid ytics
set yrange [0:*]
plot "$dat" using 2:xtic(1) title "predicted (shardopt estimate)" lc rgb "#4e79a7", \
     "" using 3 title "measured (shardopt train, rank 0 peak)" lc rgb "#f28e2b", \
     "" using 4 title "ZeRO formula" lc rgb "#bab0ac"
GP
echo "memory-chart: wrote $root/bench/memory_per_stage.svg"
