"""What every speculative method shares: a KV cache that can forget rejected tokens, the exact acceptance rule,
and one draft-then-verify loop (batch 1) that plain decoding also runs, with no draft, so speed-ups are fair.

A step feeds the target [pending token, draft_1 .. draft_k] in one forward pass, keeps the longest accepted prefix
of the draft plus one token of the target's own ("bonus"), and rolls the cache back past the rejected drafts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from core.cpu_linear import can_pack, pack_linears
from core.errors import UserError
from core.generate import SamplingParams, probabilities
from core.kv_cache import EMPTY, StaticKVCache
from core.loading import LoadedModel, load_model
from core.model import Transformer


def load_target(args, packed: bool = True) -> LoadedModel:
    """The target model from the --model/--device/--dtype/--random-weights arguments; on a CPU with every Linear
    prepacked for oneDNN (core/cpu_linear.py) unless `packed` is False: PyTorch's default CPU GEMM makes a pass of a
    few tokens cost 1.5-2x a one-token step on our AMD CPU, oneDNN about one (verify_cost.py). Plain decoding runs
    on the same model, so speed-ups compare like with like."""
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    if packed and can_pack(lm.model.lm_head):
        pack_linears(lm.model)
    return lm


class RollbackKVCache(StaticKVCache):
    """A static cache that can drop its tail (rejected draft tokens) or keep a chosen set of slots (a tree path)."""

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "RollbackKVCache":
        p = next(model.parameters())
        cfg = model.config
        # A draft built from some of the target's layers keeps their original layer indices: size by the largest.
        num_layers = max(layer.self_attn.layer_idx for layer in model.layers) + 1
        return cls(num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, p.dtype, p.device)

    def truncate(self, n: int) -> None:
        """Forget every token from slot n on."""
        self.lengths = [min(length, n) for length in self.lengths]
        self.key_pos[:, n:] = EMPTY

    def keep(self, start: int, slots: torch.Tensor) -> None:
        """Move the tokens in `slots` (indices >= start, in order) to start, start+1, ... and forget the rest."""
        dest = torch.arange(start, start + len(slots), device=slots.device)
        for layer in range(len(self.keys)):
            if self.lengths[layer] == 0:
                continue
            self.keys[layer][:, :, dest] = self.keys[layer][:, :, slots]
            self.values[layer][:, :, dest] = self.values[layer][:, :, slots]
        self.key_pos[:, dest] = self.key_pos[:, slots]
        self.truncate(start + len(slots))


def speculative_sample(draft: list[int], q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """The exact rule of Leviathan et al. / Chen et al.: the emitted tokens are distributed as the target's.

    draft: k proposed tokens; q [k, V]: the distributions they were drawn from (one-hot for a deterministic
    proposer); p [k+1, V]: the target's distributions at the pending token and after each draft token.
    Draft token i is accepted with probability min(1, p_i(x) / q_i(x)); the first rejection is replaced by a draw
    from the residual max(0, p_i - q_i) (renormalised); if all k pass, a bonus token is drawn from p_k.
    Returns (emitted tokens, number of draft tokens accepted).
    """
    out: list[int] = []
    for i, x in enumerate(draft):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, x] <= p[i, x]:  # u < p/q without dividing by a zero q
            out.append(x)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = residual.sum()
        # The residual is zero only where p == q on the support, in which case rejection cannot happen; guard anyway.
        dist = residual / total if total > 0 else p[i]
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out, i
    out.append(int(torch.multinomial(p[len(draft)], 1, generator=generator)))
    return out, len(draft)


def greedy_accept(draft: list[int], target_tokens: list[int]) -> tuple[list[int], int]:
    """Greedy verification: keep draft tokens while they equal the target's argmax, then add the target's token.

    target_tokens: argmax of the target at the pending token and after each draft token (k+1 ids).
    """
    n = 0
    while n < len(draft) and draft[n] == target_tokens[n]:
        n += 1
    return draft[:n] + [target_tokens[n]], n


@dataclass
class SpecStats:
    """Counters vLLM's speculative metrics also report (num_drafts, num_draft_tokens, num_accepted_tokens)."""
    steps: int = 0  # target forward passes after the prefill
    num_drafts: int = 0  # steps that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted_per_pos[i]: drafts whose token i was kept
    k_history: list[int] = field(default_factory=list)  # draft length asked for at each step (adaptive k)

    def record(self, k: int, accepted: int) -> None:
        self.steps += 1
        self.k_history.append(k)
        if k == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += k
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < k:
            self.accepted_per_pos += [0] * (k - len(self.accepted_per_pos))
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    def merge(self, other: "SpecStats") -> None:
        self.steps += other.steps
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        self.accepted_per_pos = [a + b for a, b in zip(self.accepted_per_pos + [0] * (n - len(self.accepted_per_pos)),
                                                       other.accepted_per_pos + [0] * (n - len(other.accepted_per_pos)))]
        self.k_history += other.k_history

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens emitted per target forward pass (accepted drafts + the bonus token); 1.0 for plain decoding."""
        return (self.num_accepted_tokens + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """Fraction of drafts whose token i was accepted (vLLM's per-position acceptance rate)."""
        return [a / self.num_drafts for a in self.accepted_per_pos] if self.num_drafts else []

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class SpecResult:
    tokens: list[int]  # new tokens (EOS included when it stopped on it)
    ttft_s: float  # prefill + first token
    decode_s: float  # wall time after the first token
    stats: SpecStats

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else 0.0


class Proposer(Protocol):
    """Proposes up to k tokens to follow `tokens` (prompt + emitted so far, the last one not yet in the target's
    cache). Returns the draft and the distributions it was drawn from ([len(draft), V]), or None when the draft was
    chosen deterministically (prompt lookup, lookahead: a one-hot q). A proposer may also have
    `observe(draft, target_argmax, accepted)`, called after each greedy verification."""

    def __call__(self, tokens: list[int], k: int) -> tuple[list[int], torch.Tensor | None]: ...


def no_draft(tokens: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
    """Plain decoding as a proposer that never proposes: one target pass per token, same loop and cache."""
    return [], None


def adaptive_k(k: int, proposed: int, accepted: int, k_max: int) -> int:
    """Hugging Face's assisted-generation heuristic: +2 after a fully accepted draft, -1 after a rejection."""
    if proposed == 0:
        return k
    return min(k + 2, k_max) if accepted == proposed else max(1, k - 1)


def check_prompt(model: Transformer, prompt: list[int], params: SamplingParams, extra: int = 0) -> int:
    """Validate and return the cache length a run needs (prompt + new tokens + the largest draft `extra`)."""
    if not prompt:
        raise UserError("the prompt needs at least one token")
    need = len(prompt) + params.max_tokens + extra + 1
    if need > model.config.max_position_embeddings:
        raise UserError(f"prompt of {len(prompt)} tokens + {params.max_tokens} new tokens exceeds the model's "
                        f"context of {model.config.max_position_embeddings}")
    return need


def stop_ids(model: Transformer, params: SamplingParams) -> set[int]:
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.config.eos_ids))


def finish(new: list[int], emitted: list[int], stop: set[int], max_tokens: int) -> bool:
    """Append `emitted` to `new`, cutting at a stop token or max_tokens. Returns True when generation is over."""
    for t in emitted:
        new.append(t)
        if t in stop or len(new) >= max_tokens:
            return True
    return False


def forward(model: Transformer, cache: RollbackKVCache, ids: list[int], start: int) -> torch.Tensor:
    """Run `ids` at positions start, start+1, ... through the model with its cache; logits [len(ids), V] float32."""
    device = cache.key_pos.device
    x = torch.tensor([ids], device=device)
    pos = torch.arange(start, start + len(ids), device=device)[None]
    return model(x, pos, cache)[0].float()


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V] (argmax when greedy)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits[None], params)[0], 1, generator=generator))


@torch.inference_mode()
def speculative_generate(model: Transformer, prompt: list[int], params: SamplingParams,
                         propose: Proposer = no_draft, k: int = 4, adaptive: bool = False,
                         on_step: Callable[[list[int]], None] | None = None) -> SpecResult:
    """Draft-then-verify decoding of one prompt (batch 1). With `no_draft` this is plain decoding.

    Greedy (temperature 0): the output equals plain greedy decoding token for token. Sampling: the exact rule
    (`speculative_sample`) keeps the target's distribution. adaptive: k moves between 1 and the given k.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    cache = RollbackKVCache.for_model(model, 1, check_prompt(model, prompt, params, k))
    stop = stop_ids(model, params)
    stats, new = SpecStats(), []
    k_max, k_now = k, (min(2, k) if adaptive else k)

    t0 = time.perf_counter()
    logits = forward(model, cache, prompt, 0)[-1]
    done = finish(new, [pick(logits, params, gen)], stop, params.max_tokens)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    while not done:
        tokens = prompt + new
        # Never draft past max_tokens: those tokens would be thrown away anyway.
        draft, q = propose(tokens, min(k_now, params.max_tokens - len(new) - 1))
        cached = len(tokens) - 1
        logits = forward(model, cache, [tokens[-1]] + draft, cached)
        if params.temperature <= 0:
            outputs = logits.argmax(-1).tolist()
            emitted, accepted = greedy_accept(draft, outputs)
            if hasattr(propose, "observe"):  # lookahead learns n-grams from every verification pass
                propose.observe(draft, outputs, accepted)
        else:
            p = probabilities(logits, params)
            if q is None:
                q = torch.nn.functional.one_hot(torch.tensor(draft, dtype=torch.long, device=device), p.shape[-1]).float()
            emitted, accepted = speculative_sample(draft, q, p, gen)
        cache.truncate(cached + 1 + accepted)
        stats.record(len(draft), accepted)
        if adaptive:
            k_now = adaptive_k(k_now, len(draft), accepted, k_max)
        done = finish(new, emitted, stop, params.max_tokens)
        if on_step:
            on_step(emitted)
    return SpecResult(new, ttft, time.perf_counter() - t0, stats)
