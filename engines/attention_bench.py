"""The paged decode attention kernel (ours/triton_attention.py) alone: GB/s of K/V read, over launch configurations.

Decoding a full batch of a 7B model spends most of its GPU time in this kernel (engines/profile_kernels.py on an H100:
75% of a 256-sequence step), and the kernel only reads: each sequence's keys and values once per layer. So its speed
is its bandwidth, K/V bytes over time, against the ~3 TB/s an H100 copies at. This times one layer's call, replayed
from a CUDA graph with L2 flushed (core.measure.graph_replay_us), for the default launch configuration and a sweep of
keys per loop step (tile), warps, pipeline stages and (`--splits`) the number of programs each sequence's keys are
split over; every configuration's output is checked against the default's.
Block tables are a random permutation of the pool, as after a while of serving.

    python -m engines.attention_bench --out attention.json        # on a GPU: a minute or two
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from core.errors import UserError, cli
from core.measure import graph_replay_us

# name: (query heads, KV heads, head dim)
SHAPES = {"llama2-7b": (32, 32, 128), "smollm2-135m": (9, 3, 64)}


def make_inputs(batch: int, seq_len: int, heads: int, kv_heads: int, dim: int, block_size: int = 16):
    g = torch.Generator(device="cuda").manual_seed(0)
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = batch * blocks_per_seq
    k_pool, v_pool = (torch.randn(num_blocks, block_size, kv_heads, dim, device="cuda", dtype=torch.bfloat16,
                                  generator=g) for _ in range(2))
    tables = torch.randperm(num_blocks, device="cuda", generator=g).view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), seq_len, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    kv_bytes = 2 * batch * seq_len * kv_heads * dim * 2
    return (q, k_pool, v_pool, tables, seq_lens), kv_bytes


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.attention_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="llama2-7b:256:256,llama2-7b:64:256,llama2-7b:256:512,smollm2-135m:256:256",
                        help="comma list of shape:batch:keys per sequence")
    parser.add_argument("--tiles", default="32,64,128")
    parser.add_argument("--warps", default="2,4,8")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--splits", default="0", help="num_splits values to sweep (0: the kernel's own choice)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs a CUDA GPU")
    from engines.ours.triton_attention import paged_decode_attention

    configs = [dict(tile=t, num_warps=w, num_stages=s, num_splits=n or None) for t, w, s, n in itertools.product(
        *(map(int, x.split(",")) for x in (args.tiles, args.warps, args.stages, args.splits)))]
    results = []
    for case in args.cases.split(","):
        shape, batch, seq_len = case.split(":")
        inputs, kv_bytes = make_inputs(int(batch), int(seq_len), *SHAPES[shape])
        reference = paged_decode_attention(*inputs)
        rows = []
        for config in [{}] + configs:
            try:
                err = (paged_decode_attention(*inputs, **config).float() - reference.float()).abs().max().item()
                us = graph_replay_us(lambda: paged_decode_attention(*inputs, **config), 3, args.repeats)
            except Exception as e:  # a configuration Triton cannot build (too many registers, shared memory)
                print(f"{case} {config}: {type(e).__name__}: {str(e)[:100]}")
                continue
            rows.append({"case": case, "config": config or "default", "us": us, "gbs": kv_bytes / us / 1e3,
                         "max_err": err})
        best = max(rows, key=lambda r: r["gbs"])
        default = rows[0]
        print(f"{case}: default {default['us']:.1f} us = {default['gbs']:.0f} GB/s; best {best['config']} "
              f"{best['us']:.1f} us = {best['gbs']:.0f} GB/s (max |diff| {best['max_err']:.1e})")
        for r in sorted(rows, key=lambda r: -r["gbs"])[:5]:
            print(f"    {r['gbs']:7.0f} GB/s  {r['us']:8.1f} us  {r['config']}")
        results += rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=1))
        print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
