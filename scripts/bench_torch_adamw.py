#!/usr/bin/env python3
"""Times torch.optim.AdamW(fused=True) on the GPU for comparison with bench_gpu_update.

Parameters are fp32 with fp32 gradients (torch's fused AdamW keeps its moments in the parameter
dtype, so fp32 parameters are the closest match to shardopt's fp32 master weights and moments).
Per parameter it reads p, g, m, v and writes p, m, v: 28 bytes, the same traffic as shardopt's
bf16-in/bf16-out update, so ms per 1B parameters compare directly.

  bench_torch_adamw.py [--params N] [--iters K] [--warmup W] [--tensors T] [--shardopt-ms-per-1b X]

With --shardopt-ms-per-1b (bench_gpu_update's RESULT ms_per_1B) it prints shardopt's time over
torch's (below 1.0: shardopt is faster). Exits 0 with a message when torch or a GPU is missing.
"""
import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tensors", type=int, default=64, help="split the parameters into this many tensors")
    ap.add_argument("--shardopt-ms-per-1b", type=float, default=None)
    args = ap.parse_args()

    try:
        import torch
    except ImportError:
        print("bench_torch_adamw: torch is not installed, nothing to compare")
        return 0
    if not torch.cuda.is_available():
        print("bench_torch_adamw: no CUDA device visible to torch, nothing to compare")
        return 0

    n = int(args.params)
    while True:
        try:
            per = (n + args.tensors - 1) // args.tensors
            sizes = [min(per, n - i * per) for i in range(args.tensors) if n - i * per > 0]
            params = [torch.nn.Parameter(torch.full((s,), 0.5, device="cuda", dtype=torch.float32)) for s in sizes]
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
            opt.step()  # allocates the moments
            torch.cuda.synchronize()
            break
        except torch.cuda.OutOfMemoryError:
            params = opt = None
            torch.cuda.empty_cache()
            if n < (1 << 20):
                raise
            print(f"{n} parameters do not fit; trying {n // 2}")
            n //= 2

    for _ in range(args.warmup):
        opt.step()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.iters):
        opt.step()
    stop.record()
    stop.synchronize()
    ms = start.elapsed_time(stop) / args.iters
    per_b = ms * 1e9 / n
    gbps = 28.0 * n / (ms * 1e-3) / 1e9
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {n} parameters in {len(params)} tensors")
    print(f"torch.optim.AdamW(fused=True), fp32: {ms:9.3f} ms/step  {per_b:9.3f} ms per 1B params  {gbps:7.1f} GB/s (28 B/param)")
    if args.shardopt_ms_per_1b is not None:
        print(f"shardopt / torch time per 1B params: {args.shardopt_ms_per_1b / per_b:.3f} (below 1.0: shardopt faster)")
    print(f"RESULT torch_params={n} torch_ms={ms:.4f} torch_ms_per_1B={per_b:.4f} torch_gbps={gbps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
