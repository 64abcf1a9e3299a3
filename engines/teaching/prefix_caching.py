"""Prefix caching on the harness's shared-prefix workload: hit rate, prefill work saved, TTFT, and same outputs.

Requests share one of a few long prefixes (a system prompt, a document) plus their own suffix. With prefix caching
the engine finds a request's full prefix blocks by hash and skips computing them; the hit rate is the share of
prompt tokens found in the cache. Requests admitted in the same step as the first user of a prefix cannot hit
(its blocks are not computed yet), so the rate stays below prefix / prompt length.

    flock /tmp/llmip-measure.lock python -m engines.teaching.prefix_caching --out prefix_caching.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.loading import load_model
from engines.ours import LLMEngine
from engines.teaching.drive import drive

from benchmarks.metrics import summarize
from benchmarks.workloads import build_workload


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=256, help="tokens of each shared prefix")
    p.add_argument("--num-prefixes", type=int, default=2)
    p.add_argument("--input-len", type=int, default=32, help="tokens of each request's own suffix")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of a step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.num_prompts, args.prefix_len, args.num_prefixes, args.input_len, args.output_len) < 1:
        raise UserError("--num-prompts, --prefix-len, --num-prefixes, --input-len and --output-len must be >= 1")
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    specs = build_workload(lm.tokenizer, "prefix", args.num_prompts, args.seed, input_len=args.input_len,
                           output_len=args.output_len, prefix_len=args.prefix_len, num_prefixes=args.num_prefixes)
    max_len = max(s.prompt_len for s in specs) + args.output_len
    rows, texts = {}, {}
    for caching in (False, True):
        engine = LLMEngine(lm, max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                           max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=caching)
        print(f"prefix caching {'on' if caching else 'off'}: {len(specs)} requests", flush=True)
        records, duration = drive(engine, specs)
        stats = engine.stats()
        m = summarize(records, duration)
        rows["on" if caching else "off"] = {
            "hit_rate": stats["prefix_cache_hits"] / stats["prefix_cache_queries"],
            "prompt_tokens": stats["prefix_cache_queries"],
            "prompt_tokens_computed": stats["prefix_cache_queries"] - stats["prefix_cache_hits"],
            **{k: m[k] for k in ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "duration")}}
        texts[caching] = [r.generated_text for r in records]
    same = texts[False] == texts[True]
    print(f"\n{len(specs)} requests: one of {args.num_prefixes} shared prefixes of {args.prefix_len} tokens + "
          f"{args.input_len}-token suffix, {args.output_len} output tokens, all at t=0, max_num_seqs "
          f"{args.max_num_seqs}, {args.max_num_batched_tokens} tokens per step; {lm.label}")
    print(f"{'caching':<9}{'hit rate':>9}{'prompt tok computed':>21}{'out tok/s':>11}{'mean TTFT ms':>14}{'wall s':>8}")
    for name, r in rows.items():
        print(f"{name:<9}{r['hit_rate']:>9.1%}{r['prompt_tokens_computed']:>13,} / {r['prompt_tokens']:<6,}"
              f"{r['output_throughput']:>11.1f}{r['mean_ttft_ms']:>14,.0f}{r['duration']:>8.1f}")
    print(f"same generated text with and without caching: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": lm.label, "args": vars(args), "results": rows,
                                              "same_outputs": same}, indent=2))


if __name__ == "__main__":
    main()
