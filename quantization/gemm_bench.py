"""One projection y = layer(x) on a GPU: BF16 against our INT4 backends (and INT8's), from 1 to 1024 rows.

A served INT4 model is only faster than BF16 if each projection is, at the row counts continuous batching produces
(16-256 per decode step, thousands in a prefill). For the Llama-2-7B shapes (and, with --shapes, 70B's) this times,
in bfloat16:
- bf16: nn.Linear (cuBLAS), reading 2 bytes per weight;
- torch: Int4Linear g128 with PyTorch's tinygemm (`_weight_int4pack_mm`);
- triton: Int4Linear's "triton" backend (our matrix-vector kernel for one row, our tensor-core GEMM, triton_gemm.py,
  up to DEQUANT_MIN_ROWS rows, tdequant beyond);
- gemm: that GEMM at every row count;
- tdequant: our one-pass Triton kernel writes a BF16 copy of W, then cuBLAS;
- dequant: the portable backend: unpack to a BF16 copy of W in PyTorch ops, then cuBLAS;
- int8: Int8Linear's "triton" backend (our INT8 matrix-vector kernel up to MATVEC_MAX_ROWS rows, dequant beyond);
- half2: triton_gemv_half2.py's INT4 matrix-vector kernel (f16x2 arithmetic; one row or a few), timed without
  preparing x (pairs_of, once per input, shared by the projections that read it), which is timed as half2-prep.
Each time is the median of CUDA-event timings of single calls replayed from a CUDA graph (no Python launch cost, as
in a serving engine), with L2 flushed before each (the weights come from HBM, as in a model whose layers stream
through). GB/s is weight bytes (packed codes + scales + zeros for INT4) over time; TFLOP/s is 2MNK
over time. Random weights: speed only. Once per shape, each INT4 backend's max error against the BF16 matmul with
the dequantized weight is printed (a layout bug shows as ~1, bfloat16 rounding as ~1e-2).

    python -m quantization.gemm_bench --out gemm.json          # on an H100: about a minute
    python -m quantization.gemm_bench --rows 16,64,256 --shapes down
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from core.errors import UserError, cli
from core.measure import graph_replay_us, worst_error
from quantization.linear import MATVEC_MAX_ROWS, Int4Linear, Int8Linear, set_backend

# name: (N, K); q|k|v and gate|up fused, as our engine and gpu_bench's "fused" configs serve them
SHAPES_7B = {"q/o proj": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008), "qkv": (12288, 4096),
             "gate|up": (22016, 4096)}
SHAPES = {**SHAPES_7B, "70b_qkv": (10240, 8192), "70b_o": (8192, 8192), "70b_gate|up": (57344, 8192),
          "70b_down": (8192, 28672)}  # Llama-2-70B's (grouped-query attention: 8 key-value heads)
ROWS = (1, 8, 16, 32, 64, 128, 256, 512, 1024)
BACKENDS = ("bf16", "torch", "triton", "gemm", "tdequant", "dequant", "int8", "half2", "half2-prep")




def forward(layer: torch.nn.Linear, q: Int4Linear, backend: str, x: torch.Tensor, q8: Int8Linear,
            pairs: torch.Tensor | None = None) -> torch.Tensor:
    if backend == "bf16":
        return layer(x)
    if backend in ("half2", "half2-prep"):
        from quantization.triton_gemv_half2 import int4_matvec_half2, pairs_of
        if backend == "half2-prep":
            return pairs_of(x, q.group_size)
        counters = q.split_counters if len(x) <= MATVEC_MAX_ROWS else None  # (None: made for this call)
        return int4_matvec_half2(x, q.qweight, q.scales, q.zeros, q.group_size, counters, pairs=pairs)
    if backend == "int8":
        q8.backend = "triton"
        return q8(x)
    if backend == "gemm":
        from quantization.triton_gemm import int4_matmul  # Triton only once a GPU is there
        return int4_matmul(x, q.qweight, q.scales, q.zeros, q.group_size)
    if backend == "tdequant":
        from quantization.triton_gemm import int4_dequantize
        return torch.nn.functional.linear(x, int4_dequantize(q.qweight, q.scales, q.zeros, q.group_size, x.dtype))
    q.backend = backend
    return q(x)


def quantized_bytes(q: Int4Linear, backend: str, q8: Int8Linear) -> int:
    if backend == "torch":
        tensors = q._kernel
    elif backend == "int8":
        tensors = (q8.qweight, q8.scales)
    else:
        tensors = (q.qweight, q.scales, q.zeros)
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def max_errors(layer: torch.nn.Linear, q: Int4Linear, q8: Int8Linear) -> dict[str, float]:
    """Per quantized backend, max |y - x @ W_deq^T| / max |x @ W_deq^T| over 1 row (the matrix-vector kernels), 4 and
    64 rows (the GEMM paths)."""
    errors = {}
    for backend in [b for b in BACKENDS[1:] if b != "half2-prep"]:  # half2-prep computes no product
        try:
            row_errors = []
            for rows in (1, 4, 64):
                x = torch.randn(rows, layer.in_features, device="cuda", dtype=torch.bfloat16)
                w = (q8 if backend == "int8" else q).dequantized_weight()
                ref = (x @ w.to(torch.bfloat16).T).float()
                y = forward(layer, q, backend, x, q8).float()
                row_errors.append((y - ref).abs().max() / ref.abs().max())
            worst = worst_error(row_errors)
        except Exception:  # the timing below reports what failed
            worst = float("nan")
        errors[backend] = worst
    return errors


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.gemm_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts M")
    parser.add_argument("--shapes", default=",".join(SHAPES_7B), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("gemm_bench times CUDA kernels, and no CUDA GPU is available here")
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        raise UserError(f"unknown shapes {sorted(unknown)} (choose from {', '.join(SHAPES)})")
    backends = args.backends.split(",")
    if set(backends) - set(BACKENDS):
        raise UserError(f"unknown backends {sorted(set(backends) - set(BACKENDS))} (choose from {', '.join(BACKENDS)})")
    rows_list = [int(r) for r in args.rows.split(",")]
    import triton

    from quantization import triton_gemv, triton_gemv_half2
    device_name = torch.cuda.get_device_name()
    result = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
              "group_size": args.group_size, "note": "random weights: speed only", "errors": {}, "rows": []}
    torch.manual_seed(0)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        layer = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        torch.nn.init.normal_(layer.weight, 0.0, 0.02)
        q, q8 = Int4Linear.from_linear(layer, args.group_size), Int8Linear.from_linear(layer)
        set_backend(q, "triton")  # their split-K counters, as a model gets them; forward() then picks the backend
        set_backend(q8, "triton")
        result["errors"][name] = errors = max_errors(layer, q, q8)
        print(f"{name} (N={N}, K={K}) max error vs BF16 x @ W_deq^T: "
              + ", ".join(f"{b} {e:.1e}" for b, e in errors.items()), flush=True)
        for M in rows_list:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            pairs = triton_gemv_half2.pairs_of(x, q.group_size) if "half2" in backends else None
            for backend in backends:
                row = {"shape": name, "N": N, "K": K, "M": M, "backend": backend}
                try:
                    us = graph_replay_us(lambda: forward(layer, q, backend, x, q8, pairs), args.warmup, args.repeats)
                    nbytes = layer.weight.nbytes if backend == "bf16" else quantized_bytes(q, backend, q8)
                    row["us"] = us
                    if backend != "half2-prep":  # it reads x, not the weights
                        row.update(tflops=2 * M * N * K / us / 1e6, weight_gbs=nbytes / us / 1e3)
                except Exception as e:  # a kernel missing in this torch build, a compiler failure: say so, go on
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                result["rows"].append(row)
            result["matvec_tuned_configs"] = {**triton_gemv.tuned_configs(), **triton_gemv_half2.tuned_configs()}
            if args.out:  # after every row count: a run cut short still leaves what it measured
                args.out.write_text(json.dumps(result, indent=2))
        torch.cuda.empty_cache()

    print(f"\nLlama-2 projections [RANDOM weights, speed only], bfloat16, INT4 group {args.group_size}, "
          f"{device_name}, torch {torch.__version__}, triton {triton.__version__}; per backend: "
          "us / TFLOP/s / weight GB/s")
    head = f"{'shape':<10}{'M':>6}" + "".join(f"{b:>26}" for b in backends)
    print(head + "\n" + "-" * len(head))
    cells = {(r["shape"], r["M"], r["backend"]): r for r in result["rows"]}
    for name in args.shapes.split(","):
        for M in rows_list:
            line = f"{name:<10}{M:>6}"
            for b in backends:
                r = cells[name, M, b]
                line += (f"{r['us']:>10.1f}{r['tflops']:>7.1f}{r['weight_gbs']:>9.0f}" if "tflops" in r
                         else f"{r['us']:>10.1f}{'':>16}" if "us" in r else f"{r['error'][:24]:>26}")
            print(line)


if __name__ == "__main__":
    main()
