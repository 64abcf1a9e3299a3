"""Prompt lookup decoding (Saxena 2023; vLLM's `ngram` speculative method): drafts copied from the context.

No second model: find the most recent earlier occurrence of the last n tokens (n from --prompt-lookup-max down to
--prompt-lookup-min) in the prompt and the text generated so far, and propose the k tokens that followed it. It
shines when the answer repeats the prompt (editing, rewriting, summarising with quotes, code refactoring) and costs
next to nothing when it finds no match (the step is plain decoding).

    python -m speculative.prompt_lookup --prompt "Fix the grammar: me and him goes to the store yesterday."
"""
from __future__ import annotations

import argparse

import torch

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt
from core.model import Transformer
from speculative.common import SpecResult, load_target, speculative_generate


class PromptLookupProposer:
    """Proposes the continuation of the latest earlier match of the context's last n-gram (vLLM's names)."""

    def __init__(self, prompt_lookup_max: int = 3, prompt_lookup_min: int = 1):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise UserError("need 1 <= --prompt-lookup-min <= --prompt-lookup-max")
        self.max_n, self.min_n = prompt_lookup_max, prompt_lookup_min

    def __call__(self, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0:
            return [], None
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            # Search right to left: the latest match is the most likely to continue the current text.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k], None
        return [], None


def run_prompt_lookup(model: Transformer, prompt: list[int], params: SamplingParams, k: int = 8,
                      prompt_lookup_max: int = 3, prompt_lookup_min: int = 1) -> SpecResult:
    """Prompt lookup decoding of one prompt (batch 1): exact for greedy and for sampling (one-hot drafts)."""
    return speculative_generate(model, prompt, params, PromptLookupProposer(prompt_lookup_max, prompt_lookup_min), k)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default="Rewrite this sentence in the passive voice: The committee approved the "
                                            "new budget for the city library after a long debate on Tuesday.")
    parser.add_argument("--k", "--num-speculative-tokens", dest="k", type=int, default=8)
    parser.add_argument("--prompt-lookup-max", type=int, default=3)
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.k < 1:
        raise UserError("--k must be at least 1")
    lm = load_target(args)
    prompt = chat_prompt(lm.tokenizer, args.prompt)
    params = SamplingParams(args.max_tokens, args.temperature, seed=args.seed)
    plain = speculative_generate(lm.model, prompt, params)
    spec = run_prompt_lookup(lm.model, prompt, params, args.k, args.prompt_lookup_max, args.prompt_lookup_min)
    print(lm.tokenizer.decode(spec.tokens))
    s = spec.stats
    print(f"\n{lm.label}; prompt lookup k={args.k}, n-gram {args.prompt_lookup_min}..{args.prompt_lookup_max}")
    print(f"plain {plain.decode_tokens_per_s:.1f} tokens/s, prompt lookup {spec.decode_tokens_per_s:.1f} tokens/s, "
          f"{s.mean_accepted_per_step:.2f} tokens per target pass, draft acceptance {s.draft_acceptance_rate:.2f}")
    if args.temperature <= 0:
        print(f"identical to plain greedy: {spec.tokens == plain.tokens}")


if __name__ == "__main__":
    main()
