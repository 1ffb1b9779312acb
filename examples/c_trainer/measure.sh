#!/usr/bin/env bash
# Peak RSS of the C trainer per stage and rank count, next to `shardopt estimate`'s figure for the
# same model (what the engine plans to allocate per rank, with the trainer's parameters and
# gradients borrowed as the trainer does) and the engine's own peak (what it did).
#   examples/c_trainer/measure.sh <c_trainer binary> <shardopt binary> [layers dim out batch steps]
# Each run is its own process, so getrusage's peak belongs to that run alone. The model is L
# blocks of W [D, D] + b [D] and a head Wout [O, D]; `estimate --params P --blocks L+1` plans P
# parameters in L+1 equal one-tensor blocks, which is the same byte count up to alignment padding.
set -euo pipefail
trainer=$1 cli=$2
L=${3:-8} D=${4:-1024} O=${5:-16} B=${6:-4} S=${7:-3}
bucket=4194304
P=$(( L * D * D + L * D + O * D ))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
own=$("$trainer" --opt own --layers "$L" --dim "$D" --out "$O" --batch "$B" --steps "$S" | tail -1)
own_rss=$(sed -n 's/.*peak_rss_kib \([0-9]*\).*/\1/p' <<<"$own")
echo "model: $P parameters (fp32 $(mib $((P * 4))) MiB per copy), L=$L D=$D O=$O, batch $B, $S steps, bucket $bucket"
echo "own AdamW, 1 rank: peak RSS $(mib $((own_rss * 1024))) MiB (params + grads + m + v = $(mib $((P * 16))) MiB, plus activations)"
printf '%-6s %-5s %14s %18s %18s %16s %26s\n' stage ranks "peak RSS MiB" "engine peak/rank" "estimate/rank" "borrowed/rank" "trainer arrays (8P x ranks)"
for ranks in 1 2; do
  for stage in 0 1 2 3; do
    out=$("$trainer" --opt shardopt --stage "$stage" --ranks "$ranks" --layers "$L" --dim "$D" --out "$O" \
          --batch "$B" --steps "$S" --bucket "$bucket" | tail -1)
    rss=$(sed -n 's/.*peak_rss_kib \([0-9]*\).*/\1/p' <<<"$out")
    eng=$(sed -n 's/.*engine_peak_bytes_per_rank \([0-9]*\).*/\1/p' <<<"$out")
    bor=$(sed -n 's/.*borrowed_bytes_per_rank \([0-9]*\).*/\1/p' <<<"$out")
    est=$("$cli" estimate --params "$P" --blocks $((L + 1)) --stage "$stage" --world "$ranks" --bucket "$bucket" \
          --borrowed params,grads --json |
          tail -1 | python3 -c 'import json, sys; print(sum(p["total"] for p in json.load(sys.stdin)["bytes"].values()))')
    printf '%-6s %-5s %14s %18s %18s %16s %26s\n' "$stage" "$ranks" "$(mib $((rss * 1024)))" "$(mib "$eng")" "$(mib "$est")" "$(mib "$bor")" "$(mib $((P * 8 * ranks)))"
  done
done
