"""Prompt compression, LLMLingua-style: a small LM scores each token of a long prompt by its self-information
-log p(token | earlier tokens); the most predictable tokens carry the least information and are dropped until the
prompt is `ratio` of its length. A shorter prompt means a smaller KV cache and a shorter prefill.

Quality: log-likelihood of the reference answer given the (compressed) prompt, on long first turns of the ShareGPT
evaluation split with their real replies as references. Reference points: the uncompressed prompt, and dropping
the same number of tokens at random. The scorer here is the served model itself (the only small LM we ship); with a
large served model the scoring pass costs a fraction of the prefill it saves.

    python -m kvcache.prompt_compression
    python -m kvcache.prompt_compression --num-prompts 20 --ratios 0.7,0.5,0.33
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.__main__ import add_model_args
from core.data import conversations
from core.errors import UserError, cli
from core.generate import chat_prompt
from core.loading import load_model


@torch.inference_mode()
def self_information(model, ids: list[int]) -> torch.Tensor:
    """Self-information (nats) of each token [N]; the first token, which has no context, gets +inf (always kept)."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logp = model(x)[0, :-1].float().log_softmax(-1)
    info = -logp.gather(-1, x[0, 1:, None])[:, 0]
    return torch.cat([torch.tensor([math.inf], device=info.device), info]).cpu()


def compress(model, ids: list[int], ratio: float) -> list[int]:
    """Keep the ceil(ratio * N) most informative tokens of `ids`, in their original order."""
    keep = max(1, math.ceil(ratio * len(ids)))
    idx = self_information(model, ids).topk(keep).indices.sort().values
    return [ids[i] for i in idx]


def random_drop(ids: list[int], ratio: float, generator: torch.Generator) -> list[int]:
    keep = max(1, math.ceil(ratio * len(ids)))
    idx = torch.randperm(len(ids), generator=generator)[:keep].sort().values
    return [ids[i] for i in idx]


@torch.inference_mode()
def answer_nll(model, prompt: list[int], answer: list[int]) -> float:
    """Mean NLL (nats per token) of `answer` following `prompt`."""
    x = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    logits = model(x)[0, len(prompt) - 1:-1].float()
    return F.cross_entropy(logits, x[0, len(prompt):]).item()


@torch.inference_mode()
def prefill_s(model, prompt: list[int]) -> float:
    x = torch.tensor([prompt], device=next(model.parameters()).device)
    t0 = time.perf_counter()
    model(x, last_only=True)
    return time.perf_counter() - t0


def long_prompts(tokenizer, n: int, min_tokens: int, max_tokens: int, answer_tokens: int):
    """(context ids, answer ids) from first turns of the evaluation split whose prompt is min..max tokens long."""
    out = []
    for conv in conversations("evaluation"):
        turns = conv["turns"]
        if len(turns) < 2 or not turns[0][1].strip() or not turns[1][1].strip():
            continue
        ctx = tokenizer(turns[0][1]).input_ids
        ans = tokenizer(turns[1][1]).input_ids[:answer_tokens]
        if min_tokens <= len(ctx) <= max_tokens and len(ans) >= 8:
            out.append((ctx, ans))
        if len(out) == n:
            return out
    raise UserError(f"only {len(out)} evaluation prompts of {min_tokens}-{max_tokens} tokens, {n} asked for")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--ratios", default="0.5,0.33", help="kept fraction of the prompt's tokens")
    parser.add_argument("--min-prompt-len", type=int, default=400)
    parser.add_argument("--max-prompt-len", type=int, default=1500)
    parser.add_argument("--answer-len", type=int, default=64, help="reference answer tokens scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args(argv)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise UserError(f"--ratios must be comma-separated numbers, not {args.ratios!r}") from None
    if not all(0 < r <= 1 for r in ratios):
        raise UserError("every ratio must be in (0, 1]")

    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    model, tok = lm.model, lm.tokenizer
    gen = torch.Generator().manual_seed(args.seed)
    rows = {("none", 1.0): []} | {(m, r): [] for r in ratios for m in ("llmlingua", "random")}
    for ctx, ans in tqdm(long_prompts(tok, args.num_prompts, args.min_prompt_len, args.max_prompt_len,
                                      args.answer_len), desc="prompts"):
        for method, ratio in rows:
            t0 = time.perf_counter()
            kept = ctx if method == "none" else compress(model, ctx, ratio) if method == "llmlingua" \
                else random_drop(ctx, ratio, gen)
            compress_s = time.perf_counter() - t0 if method == "llmlingua" else 0.0
            prompt = chat_prompt(tok, tok.decode(kept))
            rows[(method, ratio)].append({"prompt_tokens": len(prompt), "answer_nll": answer_nll(model, prompt, ans),
                                          "prefill_s": prefill_s(model, prompt), "compress_s": compress_s})

    base = statistics.mean(r["answer_nll"] for r in rows[("none", 1.0)])
    results = []
    print(f"\n{lm.label}; {args.num_prompts} long first turns of the ShareGPT evaluation split, reference = the real "
          f"reply's first {args.answer_len} tokens; times: median over prompts")
    print(f"{'method':<10} {'ratio':>5} {'prompt tok':>10} {'answer NLL':>10} {'dNLL':>7} {'prefill ms':>10} "
          f"{'scoring ms':>10}")
    for (method, ratio), rs in rows.items():
        r = {"method": method, "ratio": ratio,
             "mean_prompt_tokens": statistics.mean(x["prompt_tokens"] for x in rs),
             "mean_answer_nll": statistics.mean(x["answer_nll"] for x in rs),
             "median_prefill_ms": 1e3 * statistics.median(x["prefill_s"] for x in rs),
             "median_compress_ms": 1e3 * statistics.median(x["compress_s"] for x in rs)}
        r["answer_nll_change"] = r["mean_answer_nll"] - base
        results.append(r)
        print(f"{method:<10} {ratio:>5.2f} {r['mean_prompt_tokens']:>10.0f} {r['mean_answer_nll']:>10.3f} "
              f"{r['answer_nll_change']:>+7.3f} {r['median_prefill_ms']:>10.0f} {r['median_compress_ms']:>10.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": lm.label, "config": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
