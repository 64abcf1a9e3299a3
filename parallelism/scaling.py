"""Tensor-parallel scaling: run `tensor_parallel` at several sizes and print each run next to the planner.

Each size is its own `torchrun` (a fresh process group); a size that fails or that the planner says cannot hold the
weights is reported as such and the others still run. One table at the end: decode ms/token, prefill tokens/s and
all-reduce ms/token, measured and predicted.

    python -m parallelism.scaling --tensor-parallel-sizes 1 2 3                         # CPU, default model
    NCCL_NVLS_ENABLE=0 python -m parallelism.scaling --device cuda --model llama2-70b --random-weights \\
        --tensor-parallel-sizes 2 4 8 --input-len 512 --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.loading import resolve_device, resolve_dtype
from parallelism.planner import HARDWARE, model_config, plan
from parallelism.tensor_parallel import table


def run_size(tp: int, args: argparse.Namespace, out_path: str) -> tuple[dict | None, str]:
    """One torchrun of tensor_parallel at size `tp`; returns (its JSON, the tail of its output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "-m",
           "parallelism.tensor_parallel", "--model", args.model, "--device", args.device, "--dtype", args.dtype,
           "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens), "--out", out_path]
    cmd += ["--input-len", str(args.input_len)] if args.input_len else []
    cmd += ["--random-weights"] if args.random_weights else []
    cmd += ["--hardware", args.hardware] if args.hardware else []
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {args.timeout_s} s"
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or not os.path.exists(out_path):
        return None, output[-2000:]
    with open(out_path) as f:
        return json.load(f), proc.stdout.strip()


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--input-len", type=int, help="synthetic prompt length (default: a short chat prompt)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hardware", choices=sorted(HARDWARE), help="planner preset (default on CUDA: h100-sxm)")
    parser.add_argument("--timeout-s", type=int, default=300, help="per size")
    parser.add_argument("--verbose", action="store_true", help="print each run's own output")
    parser.add_argument("--out", help="write all runs as JSON")
    args = parser.parse_args(argv)
    if min(args.tensor_parallel_sizes) < 1:
        raise UserError("--tensor-parallel-sizes must be >= 1")
    dev = resolve_device(args.device)
    if dev.type == "cuda" and max(args.tensor_parallel_sizes) > torch.cuda.device_count():
        raise UserError(f"{max(args.tensor_parallel_sizes)} ranks but {torch.cuda.device_count()} GPU(s)")
    args.device = dev.type
    args.hardware = args.hardware or ("h100-sxm" if dev.type == "cuda" else None)
    cfg = model_config(args.model)
    bytes_per_value = torch.finfo(resolve_dtype(args.dtype, dev)).bits // 8

    runs, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tensor_parallel_sizes:
            if args.hardware and not plan(cfg, tp, 1, HARDWARE[args.hardware], args.batch_size,
                                          bytes_per_value=bytes_per_value).fits:
                rows.append((tp, "does not fit (planner)", "", "", "", "", "", "", ""))
                continue
            print(f"TP={tp} ...", flush=True)
            result, output = run_size(tp, args, os.path.join(tmp, f"tp{tp}.json"))
            if args.verbose or result is None:
                print(output)
            if result is None:
                rows.append((tp, "failed", "", "", "", "", "", "", ""))
                continue
            runs.append(result)
            m, p = result["measured"], result["predicted"] or {}
            r0 = result["ranks"][0]
            rows.append((tp, f"{m['decode_ms_per_token']:.2f}", f"{p.get('decode_ms_per_token', float('nan')):.2f}",
                         f"{m['prefill_tokens_per_s']:,.0f}", f"{p.get('prefill_tokens_per_s', float('nan')):,.0f}",
                         f"{m['comm_ms_per_token']:.2f}", f"{p.get('comm_ms_per_token', float('nan')):.2f}",
                         f"{r0['decode_comm_share']:.0%}", f"{max(r['peak_mb'] for r in result['ranks']):,.0f}"))
    label = runs[0]["model"] if runs else args.model
    header = ("TP", "decode_ms/tok", "predicted", "prefill_tok/s", "predicted", "allreduce_ms/tok", "predicted",
              "comm%", "peak_MB/rank")
    if not args.hardware:  # no GPU preset, no prediction: drop the empty columns
        keep = [i for i, h in enumerate(header) if h != "predicted"]
        header, rows = tuple(header[i] for i in keep), [tuple(r[i] for i in keep) for r in rows]
    print(f"\n{label}: tensor-parallel scaling on {dev.type}, batch {args.batch_size}, "
          f"{runs[0]['input_len'] if runs else args.input_len} prompt tokens, {args.max_tokens} new tokens"
          + (f"; predicted = planner ({args.hardware}, ideal)" if args.hardware else ""))
    print(table(rows, header))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": label, "device": dev.type, "hardware": args.hardware, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
