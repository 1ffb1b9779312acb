#!/usr/bin/env python3
"""Loss of an exported GPT checkpoint on the same tokens: Hugging Face transformers against shardopt.

    shardopt checkpoint export CKPT --out HF_DIR          # model.safetensors + config.json
    scripts/compare_gpt_hf.py HF_DIR DATA.bin [--seq 64 --batch 4 --ranks 2 --shardopt build/src/cli/shardopt]

1. Loads HF_DIR with transformers.GPT2LMHeadModel.from_pretrained (fp32, eval mode) and fails if
   transformers reports any missing, unexpected or mismatched key.
2. Computes the mean next-token cross-entropy on the first global batch of DATA.bin exactly as
   `shardopt train --model gpt` reads it (ranks * batch rows of seq tokens, row b = tokens
   [b*seq, b*seq + seq), targets shifted by one).
3. Runs `shardopt train --model gpt --init-from HF_DIR --steps 1 --json` on the same data and
   shape; the loss of its first step is computed before any update.
4. Prints both losses and their relative difference; exits 1 if it exceeds --tolerance.

Needs torch, transformers and safetensors (PyPI); not needed by the build or CI.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def read_tokens(path, count):
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != 20240520 or header[1] != 1:
        sys.exit(f"{path}: not a token file (magic {header[0]}, version {header[1]})")
    if header[2] < count:
        sys.exit(f"{path}: {header[2]} tokens, need {count}")
    return np.fromfile(path, dtype="<u2", count=count, offset=1024).astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir")
    ap.add_argument("data")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--shardopt", default=str(Path(__file__).resolve().parent.parent / "build/src/cli/shardopt"))
    ap.add_argument("--tolerance", type=float, default=1e-5)
    args = ap.parse_args()

    import torch
    import transformers

    model, info = transformers.GPT2LMHeadModel.from_pretrained(
        args.hf_dir, output_loading_info=True, torch_dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: loading info {info}")
    if problems:
        sys.exit(f"from_pretrained reported {problems}")
    model.eval()
    cfg = model.config

    rows, seq = args.ranks * args.batch, args.seq
    tokens = read_tokens(args.data, rows * seq + 1)
    x = torch.tensor(tokens[: rows * seq].reshape(rows, seq))
    y = torch.tensor(tokens[1: rows * seq + 1].reshape(rows, seq))
    with torch.no_grad():
        logits = model(input_ids=x).logits.double()
        hf = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()

    cmd = [args.shardopt, "train", "--model", "gpt", "--layers", str(cfg.n_layer), "--heads", str(cfg.n_head),
           "--hidden", str(cfg.n_embd), "--vocab", str(cfg.vocab_size), "--positions", str(cfg.n_positions),
           "--seq", str(seq), "--batch", str(args.batch), "--ranks", str(args.ranks), "--stage", str(args.stage),
           "--data", args.data, "--init-from", args.hf_dir, "--steps", "1", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])["loss_first"]
    rel = abs(ours - hf) / abs(hf)
    print(f"tokens: {rows} x {seq} from {args.data}")
    print(f"loss transformers {hf:.9f}  shardopt {ours:.9f}  relative difference {rel:.3e} (goal <= {args.tolerance:g})")
    return 0 if rel <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
