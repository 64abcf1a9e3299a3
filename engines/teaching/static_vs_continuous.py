"""Static vs continuous batching on the same engine and the same ShareGPT workload: throughput and latency.

Static batching admits a batch only when the previous one has completely finished, so short replies leave their
slots idle while the longest reply of the batch runs on. Continuous batching refills a slot the step after it
frees. Same model, kernels, memory and max_num_seqs; only the admission policy differs (see drive.py).

    flock /tmp/llmip-measure.lock python -m engines.teaching.static_vs_continuous --out static_vs_continuous.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.loading import load_model
from engines.ours import LLMEngine
from engines.teaching.drive import drive

from benchmarks.metrics import summarize
from benchmarks.workloads import build_workload

FIELDS = ["output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
          "mean_e2el_ms", "p99_e2el_ms"]


def sharegpt_specs(tokenizer, num_prompts: int, seed: int, max_input_len: int, max_output_len: int):
    """ShareGPT prompts (evaluation split) with their real reply lengths, capped at max_output_len tokens."""
    specs = build_workload(tokenizer, "sharegpt", num_prompts, seed, max_input_len=max_input_len)
    for s in specs:
        s.output_len = min(s.output_len, max_output_len)
    return specs


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=4, help="batch size of both policies")
    p.add_argument("--max-input-len", type=int, default=256, help="skip longer ShareGPT prompts")
    p.add_argument("--max-output-len", type=int, default=64, help="cap on ShareGPT reply lengths")
    p.add_argument("--repeats", type=int, default=1, help="runs of each policy, interleaved; medians reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.num_prompts, args.max_num_seqs, args.repeats, args.max_output_len) < 1:
        raise UserError("--num-prompts, --max-num-seqs, --repeats and --max-output-len must be at least 1")
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    specs = sharegpt_specs(lm.tokenizer, args.num_prompts, args.seed, args.max_input_len, args.max_output_len)
    engine = LLMEngine(lm, max_num_seqs=args.max_num_seqs, max_model_len=args.max_input_len + args.max_output_len)
    runs: dict[str, list[dict]] = {"static": [], "continuous": []}
    for r in range(args.repeats):
        for policy in runs:
            print(f"repeat {r + 1}/{args.repeats}: {policy} batching of {len(specs)} requests", flush=True)
            records, duration = drive(engine, specs, args.max_num_seqs if policy == "static" else None)
            runs[policy].append(summarize(records, duration))
    table = {policy: {k: statistics.median(m[k] for m in ms) for k in FIELDS} for policy, ms in runs.items()}
    print(f"\n{len(specs)} ShareGPT requests (evaluation split, seed {args.seed}; real reply lengths capped at "
          f"{args.max_output_len}, {sum(s.output_len for s in specs)} output tokens), all at t=0, "
          f"max_num_seqs {args.max_num_seqs}; {lm.label}; median of {args.repeats}")
    print(f"{'policy':<11}{'out tok/s':>10}{'req/s':>8}{'mean TTFT ms':>14}{'p99 TTFT ms':>13}"
          f"{'mean TPOT ms':>14}{'mean E2EL ms':>14}")
    for policy, m in table.items():
        print(f"{policy:<11}{m['output_throughput']:>10.1f}{m['request_throughput']:>8.2f}{m['mean_ttft_ms']:>14,.0f}"
              f"{m['p99_ttft_ms']:>13,.0f}{m['mean_tpot_ms']:>14.1f}{m['mean_e2el_ms']:>14,.0f}")
    speedup = table["continuous"]["output_throughput"] / table["static"]["output_throughput"]
    print(f"continuous / static output throughput: {speedup:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": lm.label, "args": vars(args), "medians": table,
                                              "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
