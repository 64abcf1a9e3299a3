"""The decode loop: prefill the prompt into a static KV cache, then one token per step, greedy or sampled."""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from core.errors import UserError
from core.kv_cache import EMPTY, PositionalKVCache, StaticKVCache
from core.model import Transformer


@dataclass
class SamplingParams:
    """temperature 0 is greedy. Names follow vLLM's SamplingParams."""
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # serving engines: log-probabilities of each chosen token and of this many top ones


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if p.temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, p), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from after temperature, top-k and top-p (for speculative acceptance tests)."""
    logits = logits.float() / max(p.temperature, 1e-5)
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (EOS included when it stopped on it)
    ttft_s: float  # time to first token (prefill + first sample)
    token_times_s: list[float]  # wall time of each decode step after the first token

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.token_times_s)
        return steps * len(self.tokens) / sum(self.token_times_s) if steps else 0.0


def left_pad(prompts: list[list[int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and positions [b, width], left-padded with position EMPTY (masked out of attention)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.full((len(prompts), width), EMPTY, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        pos[i, width - len(p):] = torch.arange(len(p))
    return ids.to(device), pos.to(device)


@contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph, **kwargs):
    """torch.cuda.graph(graph, **kwargs) with the garbage collector off. A collection during a capture may free an
    earlier graph, a CUDA call that a capture forbids: the capture is invalidated (seen on an H100 when our engine
    was built right after another one had been dropped)."""
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, **kwargs):
            yield
    finally:
        gc.enable()


class GraphedDecodeStep:
    """One decode step captured in a CUDA graph: a single replay launches every kernel of the step.

    Eager decoding of a small model is bound by kernel launches (hundreds per token); replaying a graph removes that
    cost. Needs fixed shapes, hence the PositionalKVCache; inputs are copied into the captured tensors each step.
    """

    def __init__(self, model: Callable, cache: PositionalKVCache, tokens: torch.Tensor, positions: torch.Tensor):
        self.tokens, self.positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (it writes the slot the next real step overwrites)
            for _ in range(2):
                model(self.tokens, self.positions, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with graph_capture(self.graph):
            self.logits = model(self.tokens, self.positions, cache)[:, -1]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams,
             on_token: Callable[[int, int], None] | None = None, cuda_graph: bool = False,
             compile: bool = False) -> GenerationResult:
    """Generate for a batch of token-id prompts (left-padded, static batch). Stops per row on EOS or max_tokens.

    on_token(row, token) is called for every new token as it is produced (streaming). cuda_graph=True replays the
    decode step from a CUDA graph (GPU only; same tokens, far fewer kernel launches). compile=True runs the decode
    step through torch.compile, which fuses the many small elementwise kernels (norms, RoPE, masks) of each layer.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    cfg = model.config
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    if longest + params.max_tokens > cfg.max_position_embeddings:
        raise UserError(f"prompt of {longest} tokens + {params.max_tokens} new tokens exceeds the model's context "
                        f"of {cfg.max_position_embeddings}")
    stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(cfg.eos_ids))
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    if cuda_graph and device.type != "cuda":
        raise UserError("CUDA graphs need a CUDA device")
    static_shapes = cuda_graph or compile
    cache = (PositionalKVCache if static_shapes else StaticKVCache).for_model(
        model, len(prompts), longest + params.max_tokens)
    step_model = torch.compile(model, dynamic=False) if compile else model
    decode_step = None
    ids, pos = left_pad(prompts, device)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    next_pos = pos[:, -1:] + 1

    start = time.perf_counter()
    logits = model(ids, pos, cache, last_only=True)[:, -1]
    step_times: list[float] = []
    ttft = 0.0
    for step in range(params.max_tokens):
        tokens = sample(logits, params, gen)
        now = time.perf_counter()
        if step == 0:
            ttft = now - start
        else:
            step_times.append(now - start)
        start = now
        for row, t in enumerate(tokens.tolist()):
            if not done[row]:
                out[row].append(t)
                if on_token:
                    on_token(row, t)
                done[row] = t in stop
        if all(done) or step == params.max_tokens - 1:
            break
        if cuda_graph:
            decode_step = decode_step or GraphedDecodeStep(step_model, cache, tokens[:, None], next_pos)
            logits = decode_step(tokens[:, None], next_pos)
        else:
            logits = step_model(tokens[:, None], next_pos, cache)[:, -1]
        next_pos = next_pos + 1
    return GenerationResult(out, ttft, step_times)


def chat_prompt(tokenizer, user_message: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat, through the tokenizer's own chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
