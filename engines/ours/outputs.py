"""What the engine hands back for a request (the fields of vLLM's RequestOutput that a reader meets first)."""
from __future__ import annotations

from dataclasses import dataclass

from engines.ours.sequence import RequestMetrics


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]        # generated tokens so far (all of them, not a delta)
    text: str                   # decoded output; filled in when the request finishes (the server streams its own)
    finished: bool
    finish_reason: str | None   # "stop" (EOS or a stop token), "length" (max_tokens or max_model_len), "abort"
    metrics: RequestMetrics
    # One (chosen token's log-probability, [(token id, log-probability)] of the top ones) per token of token_ids,
    # when the request asked for logprobs (SamplingParams.logprobs); None otherwise.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
