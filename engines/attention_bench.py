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
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def make_inputs(batch: int, seq_len: str, heads: int, kv_heads: int, dim: int, block_size: int = 16,
                layout: str = "token", pool_blocks: int = 0, layers: int = 1, tables: str = "random",
                kv_dtype: str = "bf16"):
    """seq_len: keys per sequence, "N" or "LO-HI" (each sequence's length drawn uniformly, as in a running batch).
    layout "token": pools [num_blocks, block_size, Hkv, D] (a block holds each token's heads side by side); "head":
    stored [num_blocks, Hkv, block_size, D] (each head's keys of a block together) and passed as a transposed view, so
    the kernel only sees other strides. pool_blocks: spread the tables over a pool this big (a full engine's pool).
    layers: one pool pair per layer, all attended in turn, as a model's decode step does (the pools of 32 layers of a
    full engine span most of the GPU's memory, each call another range of it). tables "random": each sequence's
    blocks scattered over the pool, as after a while of serving; "sequential": sequence i holds blocks i*n..i*n+n-1,
    as when a batch of requests is admitted into a fresh pool. kv_dtype "fp8": pools in float8 e4m3 (the engine's
    kv_cache_dtype="fp8"), half the bytes per key."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lo, _, hi = seq_len.partition("-")
    lens = torch.randint(int(lo), int(hi or lo) + 1, (batch,), device="cuda", generator=g)
    blocks_per_seq = -(-int(lens.max()) // block_size)
    num_blocks = max(batch * blocks_per_seq, pool_blocks)
    stored = (num_blocks, block_size, kv_heads, dim) if layout == "token" else (num_blocks, kv_heads, block_size, dim)
    pool_dtype = KV_DTYPES[kv_dtype]
    pools = [torch.randn(stored, device="cuda", dtype=torch.bfloat16, generator=g).to(pool_dtype)
             for _ in range(2 * layers)]
    if layout == "head":
        pools = [pool.transpose(1, 2) for pool in pools]
    order = torch.randperm(num_blocks, device="cuda", generator=g) if tables == "random" else torch.arange(
        num_blocks, device="cuda")
    tables = order[:batch * blocks_per_seq].view(batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    kv_bytes = 2 * int(lens.sum()) * kv_heads * dim * pools[0].element_size() * layers
    return q, pools[::2], pools[1::2], tables, lens.to(torch.int32), kv_bytes


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.attention_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="llama2-7b:256:256,llama2-7b:64:256,llama2-7b:256:512,smollm2-135m:256:256",
                        help="comma list of shape:batch:keys per sequence (N, or LO-HI for mixed lengths)")
    parser.add_argument("--layouts", default="token", help="K/V pool layouts to compare: token, head (see make_inputs)")
    parser.add_argument("--pool-blocks", type=int, default=0, help="blocks in the pool (default: just enough)")
    parser.add_argument("--layers", type=int, default=1, help="pools attended in turn per timed call (see make_inputs)")
    parser.add_argument("--tables", default="random", help="block orders to compare: random, sequential")
    parser.add_argument("--kv-dtypes", default="bf16", help="K/V pool dtypes to compare: bf16, fp8")
    parser.add_argument("--dot", default="0", help="values to sweep (1: tl.dot on tensor cores, 0: CUDA cores)")
    parser.add_argument("--tiles", default="32,64,128")
    parser.add_argument("--warps", default="2,4,8")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--splits", default="0", help="num_splits values to sweep (0: the kernel's own choice)")
    parser.add_argument("--dot-dtypes", default="default",
                        help="types the tensor-core products take: default (the kernel's choice), bf16, fp16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs a CUDA GPU")
    from engines.ours.triton_attention import paged_decode_attention

    dot_dtypes = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if unknown := set(args.dot_dtypes.split(",")) - set(dot_dtypes):
        raise UserError(f"unknown --dot-dtypes {sorted(unknown)}; choose from {sorted(dot_dtypes)}")
    numbers = [map(int, x.split(",")) for x in (args.tiles, args.warps, args.stages, args.splits, args.dot)]
    configs = [dict(tile=t, num_warps=w, num_stages=s, num_splits=n or None, dot=bool(f), dot_dtype=dot_dtypes[x])
               for t, w, s, n, f, x in itertools.product(*numbers, args.dot_dtypes.split(","))]
    results = []
    kv_dtypes = args.kv_dtypes.split(",")
    if unknown := set(kv_dtypes) - set(KV_DTYPES):
        raise UserError(f"unknown --kv-dtypes {sorted(unknown)}; choose from {sorted(KV_DTYPES)}")
    for case, layout, order, kv_dtype in itertools.product(args.cases.split(","), args.layouts.split(","),
                                                           args.tables.split(","), kv_dtypes):
        shape, batch, seq_len = case.split(":")
        q, k_pools, v_pools, tables, lens, kv_bytes = make_inputs(
            int(batch), seq_len, *SHAPES[shape], layout=layout, pool_blocks=args.pool_blocks, layers=args.layers,
            tables=order, kv_dtype=kv_dtype)
        case = f"{case} {layout} {order} {kv_dtype}" + (f" x{args.layers} layers" if args.layers > 1 else "")

        def attend_all(**config):
            return [paged_decode_attention(q, k, v, tables, lens, **config) for k, v in zip(k_pools, v_pools)][-1]
        reference = attend_all()
        rows = []
        for config in [{}] + configs:
            try:
                err = (attend_all(**config).float() - reference.float()).abs().max().item()
                us = graph_replay_us(lambda: attend_all(**config), 3, args.repeats)
            except Exception as e:  # a configuration Triton cannot build (too many registers, shared memory)
                print(f"{case} {config}: {type(e).__name__}: {str(e)[:100]}")
                continue
            named = {key: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                     for key, v in config.items()}
            rows.append({"case": case, "config": named or "default", "us": us, "gbs": kv_bytes / us / 1e3,
                         "max_err": err})
        best = max(rows, key=lambda r: r["gbs"])
        default = rows[0]
        print(f"{case}: default {default['us']:.1f} us = {default['gbs']:.0f} GB/s; best {best['config']} "
              f"{best['us']:.1f} us = {best['gbs']:.0f} GB/s (max |diff| {best['max_err']:.1e})")
        for r in sorted(rows, key=lambda r: -r["gbs"])[:5]:
            print(f"    {r['gbs']:7.0f} GB/s  {r['us']:8.1f} us  {r['config']}")
        results += rows
        del k_pools, v_pools  # before the next case's pools: a full engine's pools take most of the GPU
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=1))
        print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
