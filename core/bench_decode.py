"""Batch-1 decode speed of the core model against its memory-bandwidth floor.

Decoding one token reads every weight once, so (weight bytes) / (copy bandwidth) is the floor no implementation
beats. This measures the device's copy bandwidth, then our decode loop, and prints ms/token and the fraction of the
floor reached.  python -m core.bench_decode --model llama2-7b --device cuda --random-weights
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.errors import cli
from core.generate import SamplingParams, generate
from core.loading import load_model


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (how the device notes quote it)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m core.bench_decode", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graph", action="store_true", help="replay each decode step from a CUDA graph")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    device = next(lm.model.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    bandwidth = copy_bandwidth_gbs(device) if device.type == "cuda" else float("nan")
    prompt = torch.randint(0, min(lm.model.config.vocab_size, 32000), (args.prompt_len,)).tolist()
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    generate(lm.model, [prompt], SamplingParams(max_tokens=8, ignore_eos=True), cuda_graph=args.cuda_graph, compile=args.compile)  # warm-up
    per_token = []
    for _ in range(args.repeats):
        sync(device)
        result = generate(lm.model, [prompt], params, cuda_graph=args.cuda_graph, compile=args.compile)
        per_token.append(statistics.median(result.token_times_s))
    ms = statistics.median(per_token) * 1e3
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    row = {"model": lm.label, "cuda_graph": args.cuda_graph, "compile": args.compile, "weight_gb": weight_bytes / 1e9, "copy_bandwidth_gbs": bandwidth,
           "decode_ms_per_token": ms, "floor_ms_per_token": floor_ms, "fraction_of_floor": floor_ms / ms,
           "prompt_len": args.prompt_len, "max_tokens": args.max_tokens}
    mode = " + ".join(m for m, on in [("torch.compile", args.compile), ("CUDA graphs", args.cuda_graph)] if on)
    print(f"{lm.label}, {mode or 'eager'}\n  weights {row['weight_gb']:.2f} GB, copy bandwidth {bandwidth:.0f} GB/s -> floor "
          f"{floor_ms:.2f} ms/token\n  batch-1 decode (median of {args.repeats} runs of {args.max_tokens} tokens): "
          f"{ms:.2f} ms/token = {row['fraction_of_floor']:.0%} of the bandwidth floor")
    if args.out:
        args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
