"""Which tile shapes make triton_gemm.py's INT4 GEMM fastest, per row count: the sweep behind its TILES table.

For each Llama-2-7B projection as our engine serves it (q|k|v and gate|up fused: fused_projections.py; the 70b_
shapes are Llama-2-70B's), each row count, each kernel (`--kernels`: plain, factored) and each candidate (BLOCK_M,
BLOCK_N, BLOCK_K, warps, stages, split-K), the time of one call replayed from a CUDA graph with L2 flushed first
(core.measure.graph_replay_us, as gemm_bench.py times it), next to BF16 (cuBLAS), tinygemm (up to 16 rows) and the
table's current choice. Few rows: the kernel only reads W, so what matters is how many bytes are in flight (wide K
tiles, enough programs: split-K); many rows: how often a weight tile is unpacked (tall M tiles).
Random weights: speed only. Prints the best candidates per (shape, rows) and writes every timing as JSON.

    python -m quantization.gemm_tiles --out tiles.json        # on an H100: a few minutes (most of it compiling)
    python -m quantization.gemm_tiles --rows 1,16 --shapes qkv
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from core.errors import UserError, cli
from core.measure import graph_replay_us
from quantization.linear import Int4Linear

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),  # (N, K)
          "70b_qkv": (10240, 8192), "70b_o": (8192, 8192), "70b_gate_up": (57344, 8192), "70b_down": (8192, 28672)}
ROWS = (1, 16, 32, 64, 128, 256)


def candidates(M: int, K: int, group: int, kernels: tuple[str, ...]) -> list[dict]:
    """Few rows: one 16-row M tile, and the reading is what to tune; many rows: taller M tiles too. The factored
    kernel takes K tiles within a group, and deeper pipelines (its tiles are smaller)."""
    block_ms = (16,) if M <= 16 else (32,) if M <= 32 else (64, 128)
    splits = (1, 2, 4, 8, 16) if M <= 32 else (1, 2, 4)
    out = []
    for kernel in kernels:
        factored = kernel == "factored"
        block_ks = (64, 128) if factored else (128, 256, 512)
        for bm, bn, bk, warps, stages in itertools.product(block_ms, (32, 64, 128), block_ks, (4, 8),
                                                           (2, 4, 6) if factored else (2, 4)):
            if K % bk or (bk % group and group % bk) or (M > 32 and bk > 256) or (factored and group % bk):
                continue
            out += [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, SPLIT=split,
                         FACTORED=factored) for split in splits if split <= K // bk]
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.gemm_tiles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=3, help="best candidates printed per (shape, rows)")
    parser.add_argument("--kernels", default="plain,factored", help="which GEMM kernels' tiles to sweep")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("gemm_tiles times CUDA kernels, and no CUDA GPU is available here")
    from quantization.triton_gemm import block_config, int4_matmul
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "group_size": args.group_size,
              "note": "random weights: speed only; microseconds, median of CUDA-graph replays, L2 flushed",
              "rows": []}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        layer = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        q = Int4Linear.from_linear(layer, args.group_size)
        for M in (int(r) for r in args.rows.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = (x @ q.dequantized_weight().to(torch.bfloat16).T).float()
            bf16 = graph_replay_us(lambda: layer(x), 5, args.repeats)
            q.backend = "torch"  # PyTorch's tinygemm, the INT4 kernel to beat at one row
            tinygemm = graph_replay_us(lambda: q(x), 5, args.repeats) if M <= 16 else float("nan")
            table = block_config(M, N, K, args.group_size, x.device)
            timings = []
            for config in [table] + candidates(M, K, args.group_size, tuple(args.kernels.split(","))):
                run = lambda: int4_matmul(x, q.qweight, q.scales, q.zeros, q.group_size, config=config)  # noqa: E731
                try:
                    err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
                    us = graph_replay_us(run, 3, args.repeats) if err < 2e-2 else float("nan")
                except Exception as e:  # out of registers or shared memory: that tile does not fit
                    us, err = float("nan"), str(e).splitlines()[0][:80]
                timings.append({"config": config, "us": us, "error": err})
            best = sorted((t for t in timings[1:] if t["us"] == t["us"]), key=lambda t: t["us"])
            result["rows"].append({"shape": name, "N": N, "K": K, "M": M, "bf16_us": bf16, "tinygemm_us": tinygemm,
                                   "table_us": timings[0]["us"], "table": table, "timings": timings})
            print(f"{name:<8} M={M:<4} bf16 {bf16:6.1f} us | tinygemm {tinygemm:6.1f} us | "
                  f"table {timings[0]['us']:6.1f} us | best: "
                  + "; ".join(f"{t['us']:.1f} {t['config']}" for t in best[:args.top])
                  + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
