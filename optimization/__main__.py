"""The repository's main job (README's first command): the book's case study on the model at hand.

    python -m optimization                                  # default model, this machine (CPU: a few minutes)
    python -m optimization --model llama2-7b --random-weights --device cuda   # speed-only, at scale
    python -m optimization --preset book                    # the book's Llama-2-70B / 8-GPU command (see README)
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.errors import UserError, cli
from optimization.case_study import make_workload, run_case_study, write_report
from optimization.steps import STEPS, StepConfig
from optimization.tune import parse_settings

BOOK = {"model": "llama2-70b", "num_prompts": 1000, "max_output_len": 256, "gpus": 8}
OPTIONAL = ("kv-fp8",)  # run only when named: it changes outputs, and it measured little speed so far (README)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m optimization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--steps", default=None,
                        help=f"comma list of {', '.join(STEPS)} (default: all but {', '.join(OPTIONAL)})")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    parser.add_argument("--latency-prompts", type=int, default=None,
                        help="serve only the first N requests at the finite rates (the P99 column, the curves); "
                             "rate inf (QPS, cost) serves all --num-prompts. Default: all")
    parser.add_argument("--max-output-len", type=int, default=None, help="cap on reply lengths (CPU 48, GPU 256)")
    parser.add_argument("--max-input-len", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=8, help="static batch of the baseline")
    parser.add_argument("--quant", choices=["awq", "rtn"], default=None, help="default awq (rtn for random weights)")
    parser.add_argument("--int4-backend", choices=["torch", "triton"], default=None,
                        help="INT4 kernels: torch (PyTorch's tinygemm and its CPU twin) or triton (GPU: our GEMM up to "
                             "128 rows, dequantize + cuBLAS beyond). Default: triton on a GPU, torch on a CPU")
    parser.add_argument("--float-head", action="store_true",
                        help="keep the LM head and embedding in 16/32 bits, as AWQ checkpoints do (default: INT4)")
    parser.add_argument("--tuning", default="8:512,32:1024,64:2048",
                        help="batching settings the tuned step tries, as MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS,...")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="evaluation-split tokens for perplexity")
    parser.add_argument("--gpu-hour-price", type=float, default=2.0, help="$ per machine-hour for the cost column")
    parser.add_argument("--curve", default="0.5,1,2",
                        help="latency-throughput curve points of the baseline and the final step, as multiples of "
                             "each one's own throughput at rate inf")
    parser.add_argument("--preset", choices=["book"], default=None)
    parser.add_argument("--out-dir", type=Path, default=None, help="default results/<date>/")
    parser.add_argument("--workload-file", type=Path, default=None,
                        help="save the workload here as JSON on first use, read it back after (for machines "
                             "without the ShareGPT package)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.preset == "book":
        have = torch.cuda.device_count()
        raise UserError(f"--preset book is Llama-2-70B (AWQ INT4) on {BOOK['gpus']} GPUs with tensor parallelism; "
                        f"this machine has {have} GPU(s). The command, for machines that have them, is in "
                        "optimization/README.md")
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    steps = ([s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else
             [s for s in STEPS if s not in OPTIONAL])
    unknown = [s for s in steps if s not in STEPS]
    if unknown or "baseline" not in steps:
        raise UserError(f"--steps must include baseline and only name {', '.join(STEPS)} (got {args.steps})")
    args.int4_backend = args.int4_backend or ("triton" if on_gpu else "torch")
    if args.int4_backend == "triton" and not on_gpu:
        raise UserError("--int4-backend triton runs our Triton kernels, which need a CUDA GPU")
    num_prompts = args.num_prompts or (256 if on_gpu else 32)
    if args.latency_prompts is not None and not 1 <= args.latency_prompts <= num_prompts:
        raise UserError(f"--latency-prompts must be between 1 and --num-prompts ({num_prompts}); "
                        f"got {args.latency_prompts}")
    max_out = args.max_output_len or (256 if on_gpu else 48)
    specs = make_workload(args.model, num_prompts, max_out, args.max_input_len, args.seed, args.random_weights,
                          args.workload_file)
    tuning = parse_settings(args.tuning, "--tuning")
    cfg = StepConfig(args.model, args.device, None if args.dtype == "auto" else args.dtype, args.random_weights,
                     specs, [math.inf], max_batch_size=args.max_batch_size,
                     quant=args.quant or ("rtn" if args.random_weights else "awq"), ppl_tokens=args.ppl_tokens,
                     int4_backend=args.int4_backend, int4_head=not args.float_head,
                     gpu_hour_price=args.gpu_hour_price, seed=args.seed, tuning=tuning,
                     latency_prompts=args.latency_prompts)
    out_dir = args.out_dir or Path("results") / dt.date.today().isoformat()
    report = run_case_study(cfg, steps, out_dir, [float(x) for x in args.curve.split(",")])
    print(write_report(report, out_dir))
    print(f"\nreport: {out_dir / 'report.md'}  (JSON and plots beside it)")


if __name__ == "__main__":
    main()
