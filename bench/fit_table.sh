#!/bin/sh
# The fit table: for each GPU size x host memory, the largest model of a shape that trains on one
# GPU (shardopt plan --largest: the engine's buffers from plan_memory, the trainer's activations,
# the CUDA context, 10 % headroom), the configuration plan picks for it, and what DeepSpeed's own
# estimator says for the same model (its published ZeRO-2/ZeRO-3 formulas, reimplemented in the
# CLI: plan --json's "deepspeed"), plus the largest model that estimator would let fit.
#
# Usage: bench/fit_table.sh [SHARDOPT] [GPUS]
#   SHARDOPT  the shardopt executable (default build/src/cli/shardopt)
#   GPUS      GPUs per machine (default 1)
# Environment: GPU_SIZES (default "24GiB 80GiB 140GiB": what an RTX 4090 / L4-class 24 GB card,
# an 80 GB H100 and a 141 GB H200 report, 24564, 81559 and 143771 MiB), HOST_SIZES (default
# "64GiB 128GiB 256GiB 1024GiB"), SHAPES (default "params gpt-xl").
# Prints markdown on stdout. Needs python3 (standard library only).
set -eu
exe=${1:-build/src/cli/shardopt}
gpus=${2:-1}
[ -x "$exe" ] || { echo "fit_table.sh: $exe is not an executable (build the shardopt_cli target)" >&2; exit 2; }
exec python3 - "$exe" "$gpus" "${GPU_SIZES:-24GiB 80GiB 140GiB}" "${HOST_SIZES:-64GiB 128GiB 256GiB 1024GiB}" \
  "${SHAPES:-params gpt-xl}" <<'PY'
import json, subprocess, sys

exe, gpus, gpu_sizes, host_sizes, shapes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5].split()
GiB = 2.0 ** 30

SHAPES = {
    # Model states only (no activations): directly comparable to DeepSpeed's estimator.
    "params": ("--params model (32 equal blocks), bf16, AdamW; no activations (model states + CUDA context)",
               ["--largest", "params", "--dtype", "bf16"]),
    # GPT-2 XL's width (hidden 1600, 25 heads, vocab 50257, 1024 positions), layers searched,
    # 1 x 1024 tokens per micro-batch, activations recomputed layer by layer.
    "gpt-xl": ("GPT at GPT-2 XL's width (hidden 1600, 25 heads, vocab 50257), layers searched, bf16, AdamW, "
               "seq 1024 x batch 1, --recompute (the trainer's activations on the GPU)",
               ["--largest", "layers", "--model", "gpt", "--hidden", "1600", "--heads", "25", "--vocab", "50257",
                "--positions", "1024", "--seq", "1024", "--batch", "1", "--dtype", "bf16", "--recompute"]),
}

def parse_size(text):
    units = {"gib": 2**30, "tib": 2**40, "mib": 2**20, "gb": 10**9, "tb": 10**12}
    t = text.lower()
    for u, f in units.items():
        if t.endswith(u):
            return float(t[: -len(u)]) * f
    return float(t)

def plan(args):
    p = subprocess.run([exe, "plan", "--gpus", str(gpus), *args, "--json"], capture_output=True, text=True)
    if p.returncode not in (0, 3):
        sys.exit(f"fit_table.sh: {exe} plan {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads([l for l in p.stdout.splitlines() if l.strip()][-1])

def gib(b):
    return f"{b / GiB:.1f}"

def count(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"

def config(c):
    s = f"stage {c['stage']}"
    if c["offload"] != "none":
        s += ", offload " + c["offload"] + (" + params" if c["offload_params"] else "")
    return s

# DeepSpeed's largest model per its own estimator: the model of this shape whose model-state
# figures (any of its options) fit the GPU and the host, found by bisection over the same size
# with the figures plan --json reports for each size.
def deepspeed_fits(ds, gpu_mem, host_mem):
    keys = ["zero2", "zero2_offload_optimizer", "zero3", "zero3_offload_optimizer", "zero3_offload_all"]
    return [k for k in keys if ds[k]["gpu_bytes"] <= gpu_mem and ds[k]["cpu_bytes"] <= host_mem]

def deepspeed_largest(base, size_flag, gpu, host, gpu_mem, host_mem, hint):
    def probe(n):
        j = plan([f for f in base if f not in ("--largest", "layers", "params")] + [size_flag, str(n), "--gpu-mem", gpu,
                 "--host-mem", host])
        return j["deepspeed"], j["params"]
    # The size flag's neighbours in base (--largest X) are dropped above; search by doubling then bisection.
    lo, hi = 0, max(1, hint)
    while deepspeed_fits(probe(hi)[0], gpu_mem, host_mem):
        lo, hi = hi, hi * 2
        if hi > 2**48:
            return None, None
    while hi - lo > 1 and (size_flag == "--layers" or hi - lo > max(1, lo // 10000)):
        mid = (lo + hi) // 2
        if deepspeed_fits(probe(mid)[0], gpu_mem, host_mem):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        return None, None
    ds, params = probe(lo)
    return params, deepspeed_fits(ds, gpu_mem, host_mem)

for shape in shapes:
    title, base = SHAPES[shape]
    size_flag = "--params" if "params" in base else "--layers"
    print(f"### {title}\n")
    print(f"{gpus} GPU(s) per machine; shardopt: `plan {' '.join(base)} --gpu-mem G --host-mem H` "
          f"(engine buffers per plan_memory + activations + 512 MiB CUDA context, 10 % headroom). "
          f"DeepSpeed: its estimator's figures for the same model with the options matching shardopt's configuration "
          f"(model states only; CPU per node), and the largest model of this shape its estimator lets fit "
          f"(its figures against the whole GPU and host memory: no headroom, no CUDA context, no activations).\n")
    print("| GPU | host | shardopt: largest | configuration | GPU need | host need | DeepSpeed estimator, same model: GPU / CPU | DeepSpeed estimator: largest that fits |")
    print("|---|---|---|---|---|---|---|---|")
    for gpu in gpu_sizes:
        for host in host_sizes:
            j = plan(base + ["--gpu-mem", gpu, "--host-mem", host])
            if not j["fits"]:
                print(f"| {gpu} | {host} | nothing fits | | | | | |")
                continue
            c = j["choice"]
            ds = j["deepspeed"][j["deepspeed_matching"]]
            size = f"{count(j['params'])}" + (f" ({j['size']} layers)" if size_flag == "--layers" else "")
            if j["at_search_limit"]:
                size += " (search limit)"
            dsl, opts = deepspeed_largest(base, size_flag, gpu, host, parse_size(gpu), parse_size(host),
                                          j["size"])
            ds_text = "nothing" if dsl is None else f"{count(dsl)} ({', '.join(o.replace('_', ' ') for o in opts[-1:])})"
            print(f"| {gpu} | {host} | {size} | {config(c)} | {gib(c['need_per_gpu'])} GiB | "
                  f"{gib(c['host_bytes_all_gpus'])} GiB | {gib(ds['gpu_bytes'])} / {gib(ds['cpu_bytes'])} GiB "
                  f"({ds['options']}) | {ds_text} |")
    print()
PY
