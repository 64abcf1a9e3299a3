"""Lookahead decoding, simple form (Fu et al. 2024): Jacobi iterations feed an n-gram pool, no second model.

Jacobi decoding guesses the next W tokens at once and refines all of them in every forward pass: output i of a pass
becomes guess i+1 of the next. Guesses rarely become exactly right together, but the passes leave plausible
n-grams behind. This simple form runs one chain per step,

    [pending token] + [pool n-gram starting with it, if any] + [Jacobi window of W guesses]

verifies the chain greedily like any draft (the pool n-gram first, then the window), takes the model's outputs after
the accepted point as the next window, and adds the n-grams of those outputs to the pool. The full method runs the
lookahead branch (N-1 levels of the window) and several pool candidates side by side under one special attention
mask; here one chain keeps the causal mask, so the cost per step is 1 + (N-1) + W tokens.

    python -m speculative.lookahead --prompt "Count from one to twenty in words." --window-size 4 --ngram-size 4
"""
from __future__ import annotations

import argparse

import torch

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt
from core.model import Transformer
from speculative.common import SpecResult, load_target, speculative_generate


class LookaheadProposer:
    """Proposes pool n-gram + Jacobi window; the shared loop calls `observe` with the target's outputs."""

    def __init__(self, window_size: int = 4, ngram_size: int = 4, pool_size: int = 8):
        if window_size < 1 or ngram_size < 2:
            raise UserError("lookahead needs --window-size >= 1 and --ngram-size >= 2")
        self.window_size, self.ngram_size, self.pool_size = window_size, ngram_size, pool_size
        self.pool: dict[int, list[tuple[int, ...]]] = {}  # first token -> recent continuations (N-1 tokens)
        self.window: list[int] = []

    def __call__(self, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0:
            return [], None
        if not self.window:
            # Start the Jacobi window from the prompt's tail: any guess works, real tokens converge sooner.
            self.window = (tokens[-self.window_size:] * self.window_size)[:self.window_size]
        candidates = self.pool.get(tokens[-1], [])
        chain = list(candidates[-1]) if candidates else []
        return (chain + self.window)[:k], None

    def observe(self, chain: list[int], outputs: list[int], accepted: int) -> None:
        """chain: the draft proposed; outputs: the target's argmax after the pending token and each chain token
        (len(chain)+1); accepted: how many chain tokens were kept."""
        # The next window: the model's guesses for the tokens after the new pending token outputs[accepted].
        guesses = outputs[accepted + 1:]
        self.window = (guesses + self.window[len(guesses):])[:self.window_size] if guesses else self.window
        n = self.ngram_size
        for i in range(len(outputs) - n + 1):
            gram = tuple(outputs[i:i + n])
            bucket = self.pool.setdefault(gram[0], [])
            if gram[1:] in bucket:
                bucket.remove(gram[1:])
            bucket.append(gram[1:])
            del bucket[:-self.pool_size]


def run_lookahead(model: Transformer, prompt: list[int], params: SamplingParams, window_size: int = 4,
                  ngram_size: int = 4, pool_size: int = 8) -> SpecResult:
    """Greedy lookahead decoding of one prompt (batch 1); the output equals plain greedy decoding."""
    if params.temperature > 0:
        raise UserError("this lookahead decoding is greedy only (use --temperature 0)")
    proposer = LookaheadProposer(window_size, ngram_size, pool_size)
    return speculative_generate(model, prompt, params, proposer, window_size + ngram_size - 1)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default="List the days of the week, then the months of the year.")
    parser.add_argument("--window-size", type=int, default=4, help="W: Jacobi guesses per step")
    parser.add_argument("--ngram-size", type=int, default=4, help="N: length of pool n-grams")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    lm = load_target(args)
    prompt = chat_prompt(lm.tokenizer, args.prompt)
    params = SamplingParams(args.max_tokens)
    plain = speculative_generate(lm.model, prompt, params)
    spec = run_lookahead(lm.model, prompt, params, args.window_size, args.ngram_size)
    print(lm.tokenizer.decode(spec.tokens))
    s = spec.stats
    print(f"\n{lm.label}; lookahead W={args.window_size}, N={args.ngram_size}")
    print(f"plain {plain.decode_tokens_per_s:.1f} tokens/s, lookahead {spec.decode_tokens_per_s:.1f} tokens/s, "
          f"{s.mean_accepted_per_step:.2f} tokens per target pass; identical to plain greedy: "
          f"{spec.tokens == plain.tokens}")


if __name__ == "__main__":
    main()
