"""python -m core models | prepare | generate --model NAME --prompt TEXT [--max-tokens N] [--temperature T] ..."""
from __future__ import annotations

import argparse
import time

from core.errors import cli
from core.registry import DEFAULT_MODEL, models_table


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options every script uses to pick a model (vLLM's names where the concept is the same)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, local HF folder or hub id")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--random-weights", action="store_true", help="random init of the model's shape (speed only)")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list registered models")
    sub.add_parser("prepare", help="convert the default model to a Hugging Face folder once (set-up step)")
    g = sub.add_parser("generate", help="chat with a model")
    add_model_args(g)
    g.add_argument("--prompt", default="What is the capital of France?")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    if args.command == "models":
        print(models_table())
        print("\nAny local Hugging Face Llama-family folder or hub id works too.")
        return
    from core.generate import SamplingParams, chat_prompt, generate
    from core.loading import default_model_dir, load_model

    if args.command == "prepare":
        print(f"default model ready in {default_model_dir()}")
        return

    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    ids = chat_prompt(lm.tokenizer, args.prompt)
    params = SamplingParams(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    result = generate(lm.model, [ids], params, on_token=lambda _r, t: print(lm.tokenizer.decode([t]), end="", flush=True))
    elapsed = time.perf_counter() - t0
    n = len(result.tokens[0])
    print(f"\n\n{lm.label}: {n} tokens in {elapsed:.2f} s, TTFT {result.ttft_s * 1e3:.0f} ms, "
          f"decode {result.decode_tokens_per_s:.1f} tokens/s")


if __name__ == "__main__":
    main()
