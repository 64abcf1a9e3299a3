"""A reduced draft vocabulary (FR-Spec, Zhao et al. 2025; EAGLE-3's draft-to-target token map): the Medusa heads
score only the N tokens most frequent in ShareGPT's answers, not all 49,152 of SmolLM2's vocabulary.

A head only proposes; the target verifies every proposal against its full vocabulary, so greedy output stays exact
whatever N is. What N changes is cost and reach: scoring the heads' few rows against the whole LM head reads its
113 MB (float32) once more per step, about a tenth of a CPU decode step, and a head can never propose a token
outside the N. The ranking counts the tokens of the assistant turns of ShareGPT's training split; the file also
records the share of the evaluation split's assistant tokens each N covers (16,384 tokens: about 96%).

    python -m speculative.draft_vocab          # writes speculative/heads/<model>.draft-vocab.json
    python -m speculative.medusa --draft-vocab 16384
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from torch import nn

from core.cpu_linear import PackedLinear, packed
from core.errors import UserError, cli
from core.loading import DEFAULT_MODEL, load_model

SIZES = (2048, 4096, 8192, 16384, 32768)
CPU_SIZE = 16384  # the heads' vocabulary on a CPU: 96% of ShareGPT's answer tokens, a third of the LM head's rows


def vocab_path(model_name: str) -> Path:
    from speculative.medusa import HEADS_DIR  # beside the heads (medusa.py imports this module: no cycle at import)

    return HEADS_DIR / f"{Path(model_name).name}.draft-vocab.json"


def answer_token_counts(tokenizer, split: str) -> collections.Counter:
    """How often each token id occurs in the assistant turns of a ShareGPT split."""
    from core.data import conversations

    counts: collections.Counter = collections.Counter()
    for conv in conversations(split):
        for speaker, text in conv["turns"]:
            if speaker == "gpt":
                counts.update(tokenizer.encode(text))
    return counts


class DraftVocab:
    """The N most frequent token ids and an LM head over just those rows (packed for oneDNN where the model is):
    heads score `lm_head(z)` [.., N]; `ids[i]` is the token of column i."""

    def __init__(self, ids: list[int], lm_head: nn.Module):
        weight = lm_head.weight.detach()
        self.ids = torch.tensor(ids, device=weight.device)
        sub = nn.Linear(weight.shape[1], len(ids), bias=False, device=weight.device, dtype=weight.dtype)
        sub.weight = nn.Parameter(weight[self.ids].clone(), requires_grad=False)
        self.lm_head = packed(sub) if isinstance(lm_head, PackedLinear) else sub

    def __len__(self) -> int:
        return len(self.ids)


def default_size(model_name: str, on_gpu: bool) -> int:
    """CPU_SIZE on a CPU where the model has a committed ranking; otherwise 0 (all tokens). On a GPU the heads'
    product with the whole LM head costs little next to a step's kernel launches."""
    return CPU_SIZE if not on_gpu and vocab_path(model_name).exists() else 0


def load_draft_vocab(model_name: str, lm_head: nn.Module, size: int) -> DraftVocab | None:
    """The `size` most frequent tokens of the model's committed ranking; None for size 0 (the full vocabulary)."""
    if size <= 0:
        return None
    path = vocab_path(model_name)
    if not path.exists():
        raise UserError(f"no draft vocabulary for {model_name} at {path}: make one with python -m "
                        f"speculative.draft_vocab --model {model_name}, or pass --draft-vocab 0")
    ranked = json.loads(path.read_text())["ranked_ids"]
    if size > len(ranked):
        raise UserError(f"--draft-vocab {size}: {path.name} ranks only {len(ranked)} tokens")
    return DraftVocab(ranked[:size], lm_head)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speculative.draft_vocab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer (registry name, folder or hub id)")
    parser.add_argument("--keep", type=int, default=32768, help="how many ranked ids the file keeps")
    parser.add_argument("--out", type=Path, default=None, help="default: speculative/heads/<model>.draft-vocab.json")
    args = parser.parse_args(argv)
    lm = load_model(args.model, "cpu", "float32")
    train, evaluation = (answer_token_counts(lm.tokenizer, split) for split in ("training", "evaluation"))
    ranked = [token for token, _ in train.most_common(args.keep)]
    total = sum(evaluation.values())
    coverage = {}
    for n in (n for n in SIZES if n <= len(ranked)):
        kept = set(ranked[:n])
        coverage[str(n)] = sum(c for token, c in evaluation.items() if token in kept) / total
    out = args.out or vocab_path(lm.name)
    out.write_text(json.dumps({
        "model": lm.name, "vocab_size": lm.model.config.vocab_size,
        "source": "token counts of the assistant turns of ShareGPT's training split, most frequent first",
        "training_tokens": sum(train.values()), "evaluation_tokens": total,
        "evaluation_coverage": coverage, "command": f"python -m speculative.draft_vocab --model {args.model}",
        "ranked_ids": ranked}, separators=(",", ":")) + "\n")
    print(f"{lm.name}: {sum(train.values()):,} training-split answer tokens, {len(train):,} distinct; wrote the "
          f"{len(ranked):,} most frequent to {out}")
    print(f"{'draft vocab':>12}  share of evaluation-split answer tokens")
    for n, share in coverage.items():
        print(f"{int(n):>12}  {share:.1%}")


if __name__ == "__main__":
    main()
