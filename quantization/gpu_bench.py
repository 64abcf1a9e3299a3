"""Batch-1 decode speed of BF16, INT8 and INT4 weights on a GPU, against the copy bandwidth (the floor).

Decoding one token at batch 1 reads every weight once, so ms/token ~ weight bytes / bandwidth: INT8 should approach
half of BF16's time and INT4 a quarter, if the kernel reads packed weights directly. Each config is
precision[:backend][:compile]: backend "torch" is PyTorch's weight-only kernels (tinygemm for INT4,
_weight_int8pack_mm for INT8), "dequant" unpacks to BF16 before a normal matmul; "compile" runs the decode step
through torch.compile (which can fuse an INT8 dequant into the matmul). Random weights of the model's shape.

    python -m quantization.gpu_bench --model llama2-7b                 # on an H100: a few minutes
    python -m quantization.gpu_bench --configs bf16,int4:torch --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from core.bench_decode import copy_bandwidth_gbs, sync
from core.errors import UserError, cli
from core.generate import SamplingParams, generate
from core.loading import load_model
from quantization.linear import Int4Linear, pick_group_size, quantize_model, set_backend, weight_bytes

DEFAULT_CONFIGS = "bf16,bf16:compile,int8:dequant,int8:torch,int8:dequant:compile,int4:dequant,int4:torch"


def build(model_name: str, device: str, precision: str, backend: str, group_size: int):
    lm = load_model(model_name, device, "bfloat16", random_weights=True)
    if precision != "bf16":
        quantize_model(lm.model, precision, pick_group_size(lm.model, group_size))
        set_backend(lm.model, backend)
        if precision == "int4" and backend == "torch":
            for m in lm.model.modules():
                if isinstance(m, Int4Linear):
                    m.use_kernel_only()  # the kernel's layout replaces ours: weight bytes counted once
        torch.cuda.empty_cache()
    return lm


def decode_ms(lm, prompt_len: int, max_tokens: int, repeats: int, cuda_graph: bool, compile: bool) -> float:
    """Median over repeats of the median time per decode step, in ms."""
    device = next(lm.model.buffers()).device
    prompt = torch.randint(0, 32000, (prompt_len,)).tolist()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    generate(lm.model, [prompt], SamplingParams(max_tokens=8, ignore_eos=True), cuda_graph=cuda_graph,
             compile=compile)  # warm-up (and compilation)
    per_token = []
    for _ in range(repeats):
        sync(device)
        result = generate(lm.model, [prompt], params, cuda_graph=cuda_graph, compile=compile)
        per_token.append(statistics.median(result.token_times_s))
    return statistics.median(per_token) * 1e3


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cuda-graph", action="store_true", help="launch every kernel from Python instead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise UserError("gpu_bench needs a CUDA GPU (--device cuda)")
    device = torch.device(args.device)
    bandwidth = copy_bandwidth_gbs(device)
    rows = []
    for config in args.configs.split(","):
        parts = config.split(":")
        precision, compile = parts[0], "compile" in parts
        backend = next((p for p in parts[1:] if p != "compile"), "dequant")
        if precision not in ("bf16", "int8", "int4"):
            raise UserError(f"unknown precision in {config!r} (bf16, int8, int4)")
        t0 = time.perf_counter()
        lm = build(args.model, args.device, precision, backend, args.group_size)
        nbytes = weight_bytes(lm.model)
        row = {"config": config, "model": lm.label, "weight_gb": nbytes / 1e9}
        try:
            ms = decode_ms(lm, args.prompt_len, args.max_tokens, args.repeats, not args.no_cuda_graph, compile)
            row.update(tpot_ms=ms, floor_ms=nbytes / (bandwidth * 1e9) * 1e3,
                       fraction_of_copy_bandwidth=nbytes / (ms / 1e3) / (bandwidth * 1e9))
        except (RuntimeError, NotImplementedError) as e:  # a kernel missing in this torch build: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {config:<24} " + (f"{row['tpot_ms']:.2f} ms/token, {row['fraction_of_copy_bandwidth']:.0%} of "
              f"copy bandwidth" if "tpot_ms" in row else row["error"]), flush=True)
        del lm
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    print(f"\n{rows[0]['model'].split(' [')[0]} [RANDOM weights], batch 1, prompt {args.prompt_len}, "
          f"{args.max_tokens} tokens, {torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth:.0f} GB/s, "
          f"CUDA graphs {'off' if args.no_cuda_graph else 'on'}, torch {torch.__version__}")
    head = f"{'config':<24}{'weights GB':>11}{'ms/token':>10}{'floor ms':>10}{'of copy BW':>12}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "tpot_ms" in r:
            print(f"{r['config']:<24}{r['weight_gb']:>11.2f}{r['tpot_ms']:>10.2f}{r['floor_ms']:>10.2f}"
                  f"{r['fraction_of_copy_bandwidth']:>12.0%}")
        else:
            print(f"{r['config']:<24}{r['weight_gb']:>11.2f}  {r['error']}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "copy_bandwidth_gbs": bandwidth,
                                        "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
