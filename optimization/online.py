"""In-process serving at a request rate: requests arrive on a schedule and wait in a queue, as on a real server.

Two servers, the two batching policies the case study contrasts:
- `serve_static`: when idle, take up to `max_batch_size` waiting requests and run them to completion together; new
  arrivals wait for the whole batch (static batching, the baseline).
- `serve_continuous`: a continuous-batching engine (add_request / step) admits arrivals at every step.
Both return one benchmarks RequestRecord per request, timed from its scheduled arrival, so TTFT and latency include
the time spent queueing. A single Python thread runs the schedule and the model, like a one-process server loop.
"""
from __future__ import annotations

import time
from typing import Callable

from core.generate import SamplingParams

from benchmarks.backends.base import RequestRecord, RequestSpec


def _admit(arrivals: list[float], t0: float, next_i: int) -> int:
    """Index one past the last request that has arrived by now."""
    now = time.perf_counter() - t0
    while next_i < len(arrivals) and arrivals[next_i] <= now:
        next_i += 1
    return next_i


def _wait_for(arrival_s: float, t0: float) -> None:
    time.sleep(max(0.0, arrival_s - (time.perf_counter() - t0)))


def serve_static(run_batch: Callable[[list[RequestSpec]], list[RequestRecord]], specs: list[RequestSpec],
                 arrivals: list[float], max_batch_size: int) -> tuple[list[RequestRecord], float]:
    """Static batching. run_batch times its records from its own start; we shift them to each request's arrival.

    Returns (records in spec order, duration in s from the first arrival to the last token).
    """
    records: list[RequestRecord | None] = [None] * len(specs)
    queue: list[int] = []
    t0, next_i = time.perf_counter(), 0
    while next_i < len(specs) or queue:
        new_i = _admit(arrivals, t0, next_i)
        queue += range(next_i, new_i)
        next_i = new_i
        if not queue:
            _wait_for(arrivals[next_i], t0)
            continue
        batch, queue = queue[:max_batch_size], queue[max_batch_size:]
        batch_start = time.perf_counter()
        for i, rec in zip(batch, run_batch([specs[i] for i in batch])):
            sent = t0 + arrivals[i]
            waited = batch_start - sent
            rec.ttft_s += waited
            rec.e2el_s += waited
            rec.start_s = sent
            records[i] = rec
    return records, _duration(records, t0)


def serve_continuous(engine, specs: list[RequestSpec], arrivals: list[float],
                     stalls: dict | None = None) -> tuple[list[RequestRecord], float]:
    """Continuous batching over an engine with vLLM's step API (engines.ours.LLMEngine).

    `stalls`, if given, receives where a latency tail came from: "slowest_turns", the run's slowest loop turns
    (admitting arrivals, one engine step, handling its outputs; at most SLOWEST_KEPT, slowest first), each with the
    step's own time and what else happened during the turn (engines/stall_trace.py), and the run's totals of CUDA
    allocator events ("cuda_mallocs", "alloc_retries")."""
    if stalls is None:
        return _serve_continuous(engine, specs, arrivals)
    from engines.stall_trace import StallTrace, allocator_events

    mallocs, retries = allocator_events()
    turns = []
    with StallTrace().active() as trace:
        out = _serve_continuous(engine, specs, arrivals, trace, turns)
    mallocs_after, retries_after = allocator_events()
    stalls.update(slowest_turns=sorted(turns, key=lambda t: -t["ms"])[:SLOWEST_KEPT],
                  cuda_mallocs=mallocs_after - mallocs, alloc_retries=retries_after - retries)
    return out


SLOWEST_KEPT = 8


def _serve_continuous(engine, specs, arrivals, trace=None, turns: list[dict] | None = None
                      ) -> tuple[list[RequestRecord], float]:
    records: list[RequestRecord | None] = [None] * len(specs)
    index: dict[str, int] = {}
    t0, next_i = time.perf_counter(), 0
    while next_i < len(specs) or engine.has_unfinished_requests():
        if trace:  # one record per loop turn: admitting arrivals, the step, handling its outputs
            trace.take()
            t = time.perf_counter()
        new_i = _admit(arrivals, t0, next_i)
        for i in range(next_i, new_i):
            s = specs[i]
            params = SamplingParams(max_tokens=s.output_len, ignore_eos=s.ignore_eos)
            prompt = s.prompt_ids if s.prompt_ids is not None else s.prompt
            index[engine.add_request(None, prompt, params, arrival_time=t0 + arrivals[i]).request_id] = i
        next_i = new_i
        if not engine.has_unfinished_requests():
            _wait_for(arrivals[next_i], t0)
            continue
        if trace:
            t_step = time.perf_counter()
        outputs = engine.step()
        if trace:
            step_ms = (time.perf_counter() - t_step) * 1e3
        for out in outputs:
            if out.finished:
                i = index.pop(out.request_id)
                m = out.metrics
                records[i] = RequestRecord.from_token_times(specs[i], m.arrival_time, m.token_times, out.text)
        if trace:
            turns.append({"at_s": round(t - t0, 3), "ms": round((time.perf_counter() - t) * 1e3, 2),
                          "step_ms": round(step_ms, 2), "running": len(engine.scheduler.running),
                          "waiting": len(engine.scheduler.waiting), **trace.take()})
    return records, _duration(records, t0)


def _duration(records: list[RequestRecord], t0: float) -> float:
    """First scheduled arrival (t0) to the last token of any successful request."""
    ends = [r.start_s + r.e2el_s for r in records if r.success]
    return max(ends) - t0 if ends else time.perf_counter() - t0
