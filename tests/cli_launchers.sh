#!/usr/bin/env bash
# `shardopt train` launched one rank per process, against the same number of in-process ranks:
# the param_digest (every fp32 master value after training) must be equal bit for bit.
#
#   cli_launchers.sh SHARDOPT CASE
#
# CASE: torchrun-mlp, torchrun-gpt, slurm-mlp, slurm-gpt, torchrun-kill (processes started here with the
# launcher's variables, over the TCP bootstrap and communicator; no srun exists on a test
# machine, so SLURM's variables are set by hand), mpirun-gpt (needs $MPIEXEC), ulimit (the
# address-space pre-flight). Prints what it compared; exits non-zero on the first mismatch.
set -u -o pipefail
exe=$1
case_name=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() {
  echo "FAIL: $*"
  exit 1
}

digest_of() { grep -o '"param_digest":"[^"]*"' | tail -1; }

# Starts N processes of `$exe "$@"` with STYLE's variables on a free loopback port; waits for all
# (bounded: `timeout`); prints rank 0's stdout; a failing rank fails the call and shows every
# rank's stderr.
launch() {
  local style=$1 n=$2
  shift 2
  local port pids=() r rc=0
  # A port nobody listens on now (the kernel's pick), with a random fallback.
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
         echo $((20000 + RANDOM % 30000)))
  for ((r = 0; r < n; r++)); do
    case $style in
      torchrun)
        env RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
          timeout 120 "$exe" "$@" >"$work/out.$r" 2>"$work/err.$r" &
        ;;
      slurm)
        # The rendezvous host comes from the node list (its first host), as under srun.
        env SLURM_PROCID=$r SLURM_NTASKS=$n SLURM_LOCALID=$r SLURM_STEP_NODELIST=localhost SLURM_JOB_ID=1 \
          MASTER_PORT=$port timeout 120 "$exe" "$@" >"$work/out.$r" 2>"$work/err.$r" &
        ;;
    esac
    pids+=($!)
  done
  for r in "${!pids[@]}"; do wait "${pids[$r]}" || rc=1; done
  cat "$work/out.0"
  if [ $rc != 0 ]; then
    for ((r = 0; r < n; r++)); do
      echo "--- rank $r stderr:" >&2
      cat "$work/err.$r" >&2
    done
  fi
  return $rc
}

# Hidden 128, batch 32: products large enough for OpenBLAS's thread count to change their bits.
mlp_base=(train --stage 3 --layers 2 --hidden 128 --batch 32 --dtype bf16 --json)
mlp_args=("${mlp_base[@]}" --steps 4)
gpt_data() {
  seq 1 4000 >"$work/text.txt"
  "$exe" tokenize --bytes "$work/text.txt" "$work/tokens.bin" >/dev/null || fail "tokenize"
}
gpt_args=(train --model gpt --layers 2 --hidden 64 --heads 2 --seq 32 --batch 4 --stage 3 --dtype bf16 --json)

compare() {  # compare LABEL A B
  echo "$1: in-process $2, launched $3"
  [ -n "$2" ] || fail "$1: no param_digest from the in-process run"
  [ "$2" = "$3" ] || fail "$1: the digests differ"
}

case $case_name in
  torchrun-mlp | slurm-mlp)
    style=${case_name%-mlp}
    a=$("$exe" "${mlp_args[@]}" --ranks 3 | digest_of)
    b=$(launch "$style" 3 "${mlp_args[@]}" | digest_of) || fail "$style: a rank failed"
    compare "$style mlp, 3 ranks" "$a" "$b"
    # Stage 0: all-reduce of fp16 gradients, with dynamic loss scaling (the overflow agreement).
    a=$("$exe" train --stage 0 --steps 3 --layers 2 --hidden 16 --batch 4 --dtype fp16 --json --ranks 2 | digest_of)
    b=$(launch "$style" 2 train --stage 0 --steps 3 --layers 2 --hidden 16 --batch 4 --dtype fp16 --json |
        digest_of) || fail "$style: a rank failed"
    compare "$style mlp stage 0 fp16, 2 ranks" "$a" "$b"
    # 2 steps with background checkpoints and a save, then 2 resumed steps: the same as 4 steps.
    a=$("$exe" "${mlp_args[@]}" --ranks 2 | digest_of)
    launch "$style" 2 "${mlp_base[@]}" --steps 2 --save "$work/ck" --save-every 1 >/dev/null ||
      fail "$style: the first half failed"
    [ -f "$work/ck/step-000001/manifest.json" ] || fail "$style: no step checkpoint step-000001"
    b=$(launch "$style" 2 "${mlp_base[@]}" --steps 2 --save "$work/ck" --resume auto | digest_of) ||
      fail "$style: the resumed half failed"
    compare "$style mlp, 2 + resumed 2 steps" "$a" "$b"
    # --ranks names the launcher's world as the one that decides.
    launch "$style" 2 train --ranks 2 --steps 1 >/dev/null 2>&1 && fail "$style: --ranks under a launcher ran"
    grep -q -- "--ranks: this process was started by" "$work/err.0" ||
      fail "$style: --ranks under a launcher was not refused by name"
    if [ "$style" = slurm ]; then
      # Without a node list or MASTER_ADDR there is no rendezvous address: the error says what to set.
      out=$(env SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0 SLURM_JOB_ID=1 "$exe" train --steps 1 2>&1)
      echo "$out" | grep -q "set MASTER_ADDR" || { echo "$out"; fail "slurm: no address, and the error does not say to set MASTER_ADDR"; }
    fi
    ;;
  torchrun-gpt | slurm-gpt)
    style=${case_name%-gpt}
    gpt_data
    a=$("$exe" "${gpt_args[@]}" --steps 3 --data "$work/tokens.bin" --ranks 2 | digest_of)
    b=$(launch "$style" 2 "${gpt_args[@]}" --steps 3 --data "$work/tokens.bin" | digest_of) ||
      fail "$style: a rank failed"
    compare "$style gpt, 2 ranks" "$a" "$b"
    ;;
  mpirun-gpt)
    mpi=("$MPIEXEC" -np 2 --oversubscribe --allow-run-as-root --mca btl self,vader --bind-to none)
    # The MLP at a size where OpenBLAS's thread count changes the products' bits.
    a=$("$exe" "${mlp_args[@]}" --ranks 2 | digest_of)
    b=$("${mpi[@]}" "$exe" "${mlp_args[@]}" | digest_of)
    compare "mpirun mlp hidden 128, 2 ranks" "$a" "$b"
    gpt_data
    a=$("$exe" "${gpt_args[@]}" --steps 4 --data "$work/tokens.bin" --ranks 2 | digest_of)
    b=$("${mpi[@]}" "$exe" "${gpt_args[@]}" --steps 4 --data "$work/tokens.bin" | digest_of)
    compare "mpirun gpt, 2 ranks, 4 steps" "$a" "$b"
    # 2 steps with --save-every 1 and a save, then 2 resumed steps (--resume auto): the same as 4.
    "${mpi[@]}" "$exe" "${gpt_args[@]}" --steps 2 --data "$work/tokens.bin" --save "$work/ck" --save-every 1 \
      >/dev/null || fail "mpirun gpt: the first half failed"
    [ -f "$work/ck/step-000001/model_config.json" ] || fail "mpirun gpt: no step checkpoint step-000001"
    c=$("${mpi[@]}" "$exe" "${gpt_args[@]}" --steps 2 --data "$work/tokens.bin" --save "$work/ck" --resume auto |
        digest_of)
    compare "mpirun gpt, 2 + resumed 2 steps" "$a" "$c"
    out=$("${mpi[@]}" "$exe" "${gpt_args[@]}" --ranks 2 --steps 1 --data "$work/tokens.bin" 2>&1)
    echo "$out" | grep -q -- "--ranks: this process was started by mpirun" || fail "mpirun gpt: --ranks was not refused"
    ;;
  torchrun-kill)
    # A rank SIGKILLed mid-run: the other one fails within seconds with an error naming it (its
    # TCP connection closes), for either rank killed. exec: the pid is shardopt's own.
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
           echo $((20000 + RANDOM % 30000)))
    for victim in 1 0; do
      pids=()
      rm -f "$work/metrics.0"
      for r in 0 1; do
        (export RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port
         exec "$exe" train --stage 2 --steps 1000000 --layers 2 --hidden 32 --metrics "$work/metrics.$r" \
           >"$work/out.$r" 2>"$work/err.$r") &
        pids+=($!)
      done
      # Kill once training runs (rank 0 logged its first step), or after 20 s.
      for _ in $(seq 200); do [ -s "$work/metrics.0" ] && break; sleep 0.1; done
      kill -9 "${pids[$victim]}"
      survivor=$((1 - victim))
      start=$(date +%s)
      for _ in $(seq 300); do kill -0 "${pids[$survivor]}" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "${pids[$survivor]}" 2>/dev/null; then
        kill -9 "${pids[$survivor]}"
        fail "rank $survivor still runs 30 s after rank $victim was killed"
      fi
      wait "${pids[$survivor]}"
      rc=$?
      wait "${pids[$victim]}" 2>/dev/null
      echo "rank $victim killed: rank $survivor exited $rc after $(($(date +%s) - start)) s: $(tail -c 300 "$work/err.$survivor")"
      [ $rc != 0 ] || fail "rank $survivor exited 0"
      grep -q "rank $victim" "$work/err.$survivor" || fail "rank $survivor's error does not name rank $victim"
      port=$((port + 1 > 65000 ? 20000 : port + 1))
    done
    ;;
  ulimit)
    # Under an address-space limit a run either trains or fails at once naming the limit; it must
    # never hang (OpenBLAS retries a refused 128 MiB mapping forever).
    for v in 1500000 2000000 2800000; do
      start=$(date +%s)
      out=$(bash -c "ulimit -v $v && exec timeout 60 \"\$0\" train --ranks 4 --steps 5 --layers 2 --hidden 64" "$exe" 2>&1)
      rc=$?
      took=$(($(date +%s) - start))
      echo "ulimit -v $v: exit $rc after $took s"
      [ $rc != 124 ] || fail "ulimit -v $v: hung (killed by timeout)"
      if [ $rc != 0 ]; then
        echo "$out" | grep -q "ulimit -v" || { echo "$out"; fail "ulimit -v $v: failed without naming the limit"; }
        [ $took -le 10 ] || fail "ulimit -v $v: the error came after $took s"
      fi
    done
    # Nine threads that can be inside a product (8 ranks + OpenBLAS's worker) need more than is
    # left under 1.4 GiB: the pre-flight must say so before training.
    out=$(bash -c "ulimit -v 1500000 && exec timeout 60 \"\$0\" train --ranks 8 --steps 5" "$exe" 2>&1)
    rc=$?
    echo "ulimit -v 1500000, 8 ranks: exit $rc"
    [ $rc != 0 ] && [ $rc != 124 ] || { echo "$out"; fail "8 ranks under 1.4 GiB did not fail at once"; }
    echo "$out" | grep -q "the address-space limit (ulimit -v" || { echo "$out"; fail "the error does not name the limit"; }
    echo "$out" | grep "address-space" | head -1
    ;;
  *)
    fail "unknown case '$case_name'"
    ;;
esac
echo PASS
