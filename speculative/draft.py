"""Speculative decoding with a draft model (Leviathan et al. 2023, Chen et al. 2023).

A cheap draft proposes k tokens one by one; the target checks all of them in one forward pass and keeps the
longest prefix its own decoding agrees with (greedy), or applies the exact accept/resample rule (sampling), so the
output is what the target alone would produce. The draft here is either
- a shallow draft cut from the target: some of its layers (by default the first 4 and the last 2) with its
  embedding, final norm and LM head, no second checkpoint and no training; or
- any smaller checkpoint with the same tokenizer (`--draft-model PATH_OR_HUB_ID`), as readers with real
  checkpoints use (e.g. SmolLM2-135M drafting for SmolLM2-1.7B, Llama-3.2-1B for Llama-3.1-8B); or
- the target itself with its layers in INT8 or INT4 (`--draft-model int8|int4`, the quantization chapter's
  round-to-nearest): the same size, so it pays only where its kernels read fewer bytes (a large model on a GPU).

    python -m speculative.draft --prompt "Write a Python function that reverses a string." --k 4
    python -m speculative.draft --temperature 0.8 --seed 0 --adaptive-k
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

from core.__main__ import add_model_args
from core.cpu_linear import PackedLinear, pack_linears
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt, probabilities
from core.loading import load_model
from core.model import Transformer
from speculative.common import RollbackKVCache, forward, load_target, speculative_generate


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'4' -> the first 4 layers; '0-3,28-29' or '0,1,2,3,28,29' -> those layers (of the target's num_layers)."""
    try:
        if "," not in spec and "-" not in spec:
            n = int(spec)
            if not 1 <= n <= num_layers:
                raise ValueError
            return list(range(n))
        layers: list[int] = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            layers += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--draft-layers {spec!r}: give a count (1..{num_layers}) or indices like 0-3,28-29") from None
    if not layers or sorted(set(layers)) != layers or layers[-1] >= num_layers or layers[0] < 0:
        raise UserError(f"--draft-layers {spec!r}: indices must be increasing, distinct and below {num_layers}")
    return layers


def shallow_draft(target: Transformer, layers: list[int]) -> Transformer:
    """A Transformer that shares the target's weights but runs only `layers` (no copy, no training)."""
    draft = Transformer.__new__(Transformer)
    nn.Module.__init__(draft)
    draft.config = dataclasses.replace(target.config, num_layers=len(layers))
    draft.embed_tokens, draft.norm, draft.lm_head = target.embed_tokens, target.norm, target.lm_head
    draft.layers = nn.ModuleList(target.layers[i] for i in layers)
    draft.inv_freq = target.inv_freq
    return draft


class DraftModelProposer:
    """Proposes k tokens with a draft model and its own rollback cache (kept in step with the target's tokens).

    Greedy drafts are argmax tokens; sampled drafts are drawn from the draft's distribution q (after the same
    temperature/top-k/top-p as the target), which is returned for the acceptance rule.
    """

    def __init__(self, draft: Transformer, params: SamplingParams, max_len: int,
                 generator: torch.Generator | None = None):
        self.draft, self.params, self.generator = draft, params, generator
        self.cache = RollbackKVCache.for_model(draft, 1, max_len)
        self.fed: list[int] = []  # tokens whose keys/values are in the draft's cache

    @torch.inference_mode()
    def __call__(self, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0:
            return [], None
        # Keep the cached prefix that still agrees with the sequence, forget the rest (rejected drafts).
        n = 0
        limit = min(len(self.fed), len(tokens) - 1)
        while n < limit and self.fed[n] == tokens[n]:
            n += 1
        self.cache.truncate(n)
        self.fed = tokens[:n]
        draft, dists = [], []
        logits = self._feed(tokens[n:])
        for i in range(k):
            if self.params.temperature <= 0:
                token = int(logits.argmax())
            else:
                q = probabilities(logits[None], self.params)[0]
                token = int(torch.multinomial(q, 1, generator=self.generator))
                dists.append(q)
            draft.append(token)
            if i < k - 1:
                logits = self._feed([token])
        return draft, (torch.stack(dists) if dists else None)

    def _feed(self, ids: list[int]) -> torch.Tensor:
        logits = forward(self.draft, self.cache, ids, len(self.fed))[-1]
        self.fed += ids
        return logits


QUANTIZED_DRAFTS = ("int8", "int4")


def quantized_draft(target_lm, method: str, device: str, dtype: str) -> tuple[Transformer, str]:
    """A second copy of the target with every decoder-layer projection rounded to nearest by the quantization
    chapter (INT8 per channel, INT4 group-wise): a draft that agrees with the target most of the time. On a GPU its
    layers run from the packed weights (PyTorch's int8/int4 kernels), a quarter or an eighth of the bytes, which is
    what pays for a large model; on a CPU they are dequantized on every call, so it only shows acceptance."""
    from quantization.linear import pick_group_size, quantize_model, set_backend

    lm = load_model(target_lm.name, device, dtype, target_lm.random_weights)
    quantize_model(lm.model, method, pick_group_size(lm.model, 0))
    if next(lm.model.parameters()).is_cuda:
        set_backend(lm.model, "torch")
    return lm.model, f"the target with its layers in {method.upper()} (round to nearest): {lm.label}"


def load_draft(target_lm, draft_model: str | None, draft_layers: str, device: str, dtype: str):
    """(draft Transformer, label) from --draft-model (a checkpoint, or int8/int4: the target quantized) or, without
    it, a shallow draft of the target."""
    if draft_model in QUANTIZED_DRAFTS:
        return quantized_draft(target_lm, draft_model, device, dtype)
    if draft_model:
        dm = load_model(draft_model, device, dtype)
        if dm.tokenizer.get_vocab() != target_lm.tokenizer.get_vocab():
            raise UserError(f"draft model {draft_model!r} has a different tokenizer from the target; "
                            "speculative decoding needs the same vocabulary")
        if isinstance(target_lm.model.lm_head, PackedLinear):  # packed like the target (common.load_target)
            pack_linears(dm.model)
        return dm.model, dm.label
    layers = parse_layers(draft_layers, target_lm.model.config.num_layers)
    return shallow_draft(target_lm.model, layers), f"shallow draft: target layers {layers}"


def run_draft(target: Transformer, draft: Transformer, prompt: list[int], params: SamplingParams, k: int,
              adaptive: bool = False):
    """Speculative decoding of one prompt with a draft model (batch 1)."""
    device = next(target.parameters()).device
    gen = torch.Generator(device=device).manual_seed(params.seed + 1) if params.seed is not None else None
    proposer = DraftModelProposer(draft, params, len(prompt) + params.max_tokens + k + 2, gen)
    return speculative_generate(target, prompt, params, proposer, k, adaptive)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--draft-model", default=None,
                        help="a smaller checkpoint with the same tokenizer, or int8 / int4: the target quantized")
    parser.add_argument("--draft-layers", default="0-3,28-29",
                        help="without --draft-model: target layers the shallow draft runs (count or list)")
    parser.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    parser.add_argument("--k", "--num-speculative-tokens", dest="k", type=int, default=4)
    parser.add_argument("--adaptive-k", action="store_true", help="grow k after full acceptance, shrink after misses")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.k < 1:
        raise UserError("--k must be at least 1")
    lm = load_target(args)
    draft, draft_label = load_draft(lm, args.draft_model, args.draft_layers, args.device, args.dtype)
    prompt = chat_prompt(lm.tokenizer, args.prompt)
    params = SamplingParams(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    plain = speculative_generate(lm.model, prompt, params)
    t1 = time.perf_counter()
    spec = run_draft(lm.model, draft, prompt, params, args.k, args.adaptive_k)
    t2 = time.perf_counter()
    print(lm.tokenizer.decode(spec.tokens))
    s = spec.stats
    print(f"\n{lm.label}; {draft_label}; k={args.k}{' (adaptive)' if args.adaptive_k else ''}, "
          f"temperature {args.temperature}")
    print(f"{'method':<12}{'tokens':>8}{'tokens/s':>10}{'accepted/step':>15}")
    print(f"{'plain':<12}{len(plain.tokens):>8}{len(plain.tokens) / (t1 - t0):>10.1f}{1.0:>15.2f}")
    print(f"{'draft':<12}{len(spec.tokens):>8}{len(spec.tokens) / (t2 - t1):>10.1f}{s.mean_accepted_per_step:>15.2f}")
    print("acceptance rate per position: " + " ".join(f"{a:.2f}" for a in s.acceptance_rate_per_pos))
    if args.temperature <= 0:
        print(f"identical to plain greedy: {spec.tokens == plain.tokens}")


if __name__ == "__main__":
    main()
