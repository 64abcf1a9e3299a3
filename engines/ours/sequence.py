"""One request inside the engine: its tokens, how many of them have K/V in the cache, and its block table."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from core.generate import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and waiting to be recomputed
    RUNNING = "running"    # holds blocks; prefilling in chunks or decoding one token per step
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """time.perf_counter() stamps, so a harness can compute TTFT, TPOT and ITL from offline runs."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one stamp per output token, first token included
    finished_time: float | None = None
    num_preemptions: int = 0


_ids = itertools.count()

# A sampled token still on its way from the GPU (async scheduling, llm_engine.py). It holds the token's place in
# `token_ids`, so every count (num_tokens, blocks needed, what to run next) is already right; an embedding of -1 fails
# loudly if one ever reached the model instead of being replaced by the real token on the device.
PLACEHOLDER = -1


class Sequence:
    """Prompt plus generated tokens. `num_computed_tokens` of them already have K/V in the paged cache.

    The block table maps the sequence's logical blocks (token i lives in logical block i // block_size) to physical
    blocks of the pool; it grows as the sequence grows and is emptied when the sequence is preempted or finishes.
    """

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 arrival_time: float | None = None, prompt: str | None = None):
        self.request_id = request_id if request_id is not None else str(next(_ids))
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + output: what the model has seen or will see
        self.params = params
        self.generator: torch.Generator | None = None  # per-request RNG when params.seed is set
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # full blocks already registered in the prefix cache
        self.finish_reason: str | None = None
        # Per output token (when params.logprobs is set): (its log-probability, [(token id, log-probability)] of the
        # params.logprobs most likely tokens), from the model's distribution before temperature, top-k and top-p.
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] | None = [] if params.logprobs is not None else None
        self.awaiting_last_token = False  # its final token (max_tokens or max_model_len) is on its way: run no more
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.perf_counter())

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: the prompt (in chunks) during prefill, 1 while decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
