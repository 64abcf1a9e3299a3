"""Perplexity of each precision and method on the ShareGPT evaluation split: the quality side of quantization.

Rows: FP32 (the reference; for SmolLM2 these are the weights dequantized from its Q4_1 GGUF, the best "full
precision" there is), FP16 and BF16 weights, INT8 RTN per channel, INT4 RTN, GPTQ and AWQ (group-wise, asymmetric).
GPTQ and AWQ calibrate on the calibration split, which is disjoint from the evaluation split.
On a CPU every row computes in float32 from its (de)quantized weights: the numbers measure what the stored weights
lose, not the arithmetic of a GPU kernel.

    python -m quantization.evaluate                          # default model, 8192 evaluation tokens (minutes)
    python -m quantization.evaluate --eval-tokens 65536 --methods fp32,int4-rtn,gptq,awq
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.data import plain_text
from core.errors import UserError, cli
from core.loading import load_model
from core.perplexity import perplexity
from quantization.awq import awq_model
from quantization.gptq import gptq_model
from quantization.layerwise import calibration_ids
from quantization.linear import pick_group_size, quantize_model, weight_bytes

METHODS = ("fp32", "fp16", "bf16", "int8-rtn", "int4-rtn", "gptq", "awq")


def build(method: str, args):
    """Load the model and apply `method`; return (LoadedModel, INT4 group size, wall and CPU seconds quantizing).

    CPU seconds (all threads of this process) are reported next to wall seconds because on a shared machine the
    wall time mostly measures the other jobs.
    """
    lm = load_model(args.model, args.device, "float32", args.random_weights)
    group_size = pick_group_size(lm.model, args.group_size)
    t0, c0 = time.perf_counter(), time.process_time()
    if method in ("fp16", "bf16"):
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        with torch.no_grad():
            for p in lm.model.parameters():
                p.copy_(p.to(dtype).float())  # stored in 16 bit, computed in float32
    elif method == "int8-rtn":
        quantize_model(lm.model, "int8")
    elif method == "int4-rtn":
        quantize_model(lm.model, "int4", group_size)
    elif method in ("gptq", "awq"):
        ids = calibration_ids(lm.tokenizer, args.num_calibration_samples, args.max_seq_length)
        if method == "gptq":
            gptq_model(lm.model, ids, group_size, act_order=args.act_order)
        else:
            awq_model(lm.model, ids, group_size, search_samples=args.search_samples)
    return lm, group_size, time.perf_counter() - t0, time.process_time() - c0


def stored_bytes(method: str, lm) -> int:
    b = weight_bytes(lm.model)
    return b // 2 if method in ("fp16", "bf16") else b


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens of the evaluation split scored")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=1024, help="< window gives later tokens more context (slower)")
    parser.add_argument("--group-size", type=int, default=0, help="INT4 group size (0: 128, or 64 for SmolLM2)")
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--search-samples", type=int, default=8, help="AWQ grid-search samples (0: all)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ with act-order")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown methods {unknown} (choose from {', '.join(METHODS)})")

    rows, label, gs, tokens = [], None, None, None
    for method in methods:
        lm, gs, quantize_s, quantize_cpu_s = build(method, args)
        if tokens is None:
            text = plain_text("evaluation", max_chars=args.eval_tokens * 8)
            tokens = lm.tokenizer(text, return_tensors="pt").input_ids[0][: args.eval_tokens]
            label = lm.label
        t0 = time.perf_counter()
        ppl = perplexity(lm.model, tokens, args.window, args.stride)
        rows.append({"method": method, "perplexity": ppl, "weight_mb": stored_bytes(method, lm) / 2**20,
                     "quantize_s": quantize_s, "quantize_cpu_s": quantize_cpu_s, "eval_s": time.perf_counter() - t0})
        print(f"  {method:<9} perplexity {ppl:8.3f}  ({rows[-1]['eval_s']:.0f} s)", flush=True)
        del lm

    ref = next((r["perplexity"] for r in rows if r["method"] == "fp32"), None)
    print(f"\n{label}: perplexity on {len(tokens)} tokens of the ShareGPT evaluation split (window {args.window}, "
          f"stride {args.stride}); INT4 group size {gs}, asymmetric; GPTQ/AWQ calibrated on "
          f"{args.num_calibration_samples} x {args.max_seq_length} tokens of the calibration split")
    head = f"{'method':<10}{'perplexity':>11}{'vs FP32':>9}{'weights MB':>12}{'quantize s':>12}{'CPU s':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        delta = f"{(r['perplexity'] / ref - 1):+.2%}" if ref else "-"
        r["vs_fp32"] = None if ref is None else r["perplexity"] / ref - 1
        print(f"{r['method']:<10}{r['perplexity']:>11.3f}{delta:>9}{r['weight_mb']:>12.1f}{r['quantize_s']:>12.1f}{r['quantize_cpu_s']:>8.1f}")
    if args.out:
        args.out.write_text(json.dumps({"model": label, "eval_tokens": len(tokens), "split": "evaluation",
                                        "group_size": gs, "window": args.window, "stride": args.stride,
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
