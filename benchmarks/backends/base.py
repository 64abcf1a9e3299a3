"""The one small interface every backend implements, and the two records that cross it.

A workload is a list of `RequestSpec`s (what to send); a run returns one `RequestRecord` per spec (what happened),
in the same order. Times are seconds from `time.perf_counter()`.

Two kinds of backend:
- online (`Backend.online = True`): the load generator (benchmarks/load.py) decides when each request leaves and
  awaits `await backend.send(spec)` for each, many at once. `send` must stream, time every token, and never raise
  for a failed request: it returns a record with `success=False` and `error` set (server errors, timeouts and
  dropped streams are results, not crashes).
- offline (`Backend.online = False`): an in-process engine gets every request at once, at t=0 (request rate inf),
  through `backend.run_batch(specs)`; it fills in the same records from its own per-token timestamps.

Minimal offline backend:

    class Mine(Backend):
        name, online = "mine", False
        def run_batch(self, specs):
            t0 = time.perf_counter()
            ...generate, recording each token's perf_counter time...
            return [RequestRecord.from_token_times(s, t0, token_times, text) for s, token_times, text in ...]
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestSpec:
    """One request of a workload. prompt_len is in tokens of the model's tokenizer; output_len is what we ask for
    (max_tokens); with ignore_eos the backend must produce exactly output_len tokens."""
    prompt: str
    prompt_len: int
    output_len: int
    ignore_eos: bool = True
    prompt_ids: list[int] | None = None  # token ids to send instead of the text (random-weight runs need no tokenizer)


@dataclass
class RequestRecord:
    """What happened to one request. Field meanings follow vLLM's RequestFuncOutput.

    ttft_s: send -> first token. itl_s: every gap between consecutive tokens (output_len - 1 of them when each token
    arrives on its own; a chunk carrying several tokens gives one gap). e2el_s: send -> last token.
    start_s: perf_counter when the request was sent (or arrived, offline). output_len: tokens actually generated.
    """
    prompt_len: int
    output_len: int = 0
    success: bool = False
    error: str = ""
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2el_s: float = 0.0
    start_s: float = 0.0
    generated_text: str = ""

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first (vLLM's definition); 0 for one-token outputs."""
        return (self.e2el_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else 0.0

    @classmethod
    def from_token_times(cls, spec: RequestSpec, start_s: float, token_times_s: list[float],
                         text: str = "") -> "RequestRecord":
        """A successful record from the perf_counter time of each generated token."""
        if not token_times_s:
            return cls(spec.prompt_len, error="no token generated", start_s=start_s)
        gaps = [b - a for a, b in zip(token_times_s, token_times_s[1:])]
        return cls(spec.prompt_len, len(token_times_s), True, "", token_times_s[0] - start_s, gaps,
                   token_times_s[-1] - start_s, start_s, text)


class Backend:
    """Base class: subclasses set `name` and `online` and implement `send` (online) or `run_batch` (offline)."""
    name: str = "base"
    online: bool = True

    async def send(self, spec: RequestSpec) -> RequestRecord:
        """Send one request and stream its tokens (online backends)."""
        raise NotImplementedError(f"backend {self.name} is offline: use run_batch")

    def run_batch(self, specs: list[RequestSpec]) -> list[RequestRecord]:
        """Run every request at once in process (offline backends); records in the order of specs."""
        raise NotImplementedError(f"backend {self.name} is online: use send")

    async def start(self) -> None:
        """Open connections (online) before the clock starts; default: nothing."""

    async def aclose(self) -> None:
        """Close connections (online); default: nothing."""

    def peak_memory_mb(self) -> float | None:
        """Peak memory of the serving process: device memory on a GPU, RSS on a CPU; None if unknown."""
        return None

    def kv_cache_usage(self) -> float | None:
        """Fraction of the KV cache in use at its peak, where the backend exposes it; None if not."""
        return None

    def describe(self) -> dict:
        """Backend configuration written into the result file (model, endpoint, dtype, ...)."""
        return {"backend": self.name}
