"""PyTorch's default CPU matmul against the oneDNN-prepacked Linear our engine serves with (ours/cpu_linear.py).

On a CPU every decode step multiplies a few rows (one per running sequence) by each projection's weight. PyTorch's
`F.linear` goes to MKL, which takes slow paths on AMD CPUs; oneDNN with the weight reordered once into its blocked
layout is what vLLM's CPU build uses. This times both on the served shapes of a registered model (q|k|v and gate|up
fused, as the engine serves them, and the LM head), with random weights of that shape, for a few row counts.

    python -m engines.cpu_linear_bench --out cpu_linear.json          # SmolLM2-135M's shapes, 1 / 32 / 128 rows
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from core.errors import UserError, cli
from core.registry import REGISTRY
from engines.ours.cpu_linear import PackedLinear, can_pack


def served_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each matmul of a served layer, and of the LM head."""
    if model not in REGISTRY:
        raise UserError(f"unknown model {model!r}; registered: {', '.join(REGISTRY)}")
    c = REGISTRY[model].config
    kv = c.num_kv_heads * c.head_dim
    return {"q|k|v": (c.hidden_size, c.num_heads * c.head_dim + 2 * kv), "o": (c.num_heads * c.head_dim, c.hidden_size),
            "gate|up": (c.hidden_size, 2 * c.intermediate_size), "down": (c.intermediate_size, c.hidden_size),
            "lm_head": (c.hidden_size, c.vocab_size)}


def median_us(f, x: torch.Tensor, calls: int, repeats: int) -> float:
    for _ in range(3):
        f(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            f(x)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engines.cpu_linear_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a registered model (its shapes only)")
    p.add_argument("--rows", default="1,32,128", help="comma list of row counts (sequences in a decode step)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--calls", type=int, default=20, help="calls per timing")
    p.add_argument("--repeats", type=int, default=7, help="timings per case (the median is kept)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if min(rows) < 1 or args.calls < 1 or args.repeats < 1:
        raise UserError("--rows, --calls and --repeats must be at least 1")
    dtype = getattr(torch, args.dtype)
    shapes = served_shapes(args.model)
    if not can_pack(torch.nn.Linear(1, 1, dtype=dtype)):
        raise UserError("this PyTorch has no oneDNN: nothing to compare")
    results = []
    with torch.no_grad():
        for name, (k, n) in shapes.items():
            plain = torch.nn.Linear(k, n, bias=False, dtype=dtype)
            packed = PackedLinear(plain)
            for r in rows:
                x = torch.randn(r, k, dtype=dtype)
                results.append({"matmul": name, "in": k, "out": n, "rows": r,
                                "plain_us": median_us(plain, x, args.calls, args.repeats),
                                "packed_us": median_us(packed, x, args.calls, args.repeats)})
    print(f"\n{args.model} shapes (random weights), {args.dtype}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} x {args.calls} calls")
    print(f"{'matmul':<9}{'in x out':>14}{'rows':>6}{'F.linear us':>13}{'packed us':>11}{'speed-up':>10}")
    for r in results:
        print(f"{r['matmul']:<9}{str(r['in']) + ' x ' + str(r['out']):>14}{r['rows']:>6}{r['plain_us']:>13,.1f}"
              f"{r['packed_us']:>11,.1f}{r['plain_us'] / r['packed_us']:>9.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "dtype": args.dtype,
                                        "threads": torch.get_num_threads(), "results": results}, indent=1))
        print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
