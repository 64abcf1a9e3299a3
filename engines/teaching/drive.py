"""Drive our engine over a harness workload offline (every request at t=0) and return the harness's records.

`static_batch_size` switches the scheduling policy to static batching on the same engine, kernels and memory: a
batch of that many requests is admitted only when the previous batch has completely finished, so the batch
shrinks as its members finish and nobody takes their places. Without it the engine batches continuously.
"""
from __future__ import annotations

import time
from typing import Callable

from core.generate import SamplingParams
from engines.ours import LLMEngine

from benchmarks.backends.base import RequestRecord, RequestSpec


def drive(engine: LLMEngine, specs: list[RequestSpec], static_batch_size: int | None = None,
          on_step: Callable[[LLMEngine], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Run every spec to completion; returns one record per spec (in order) and the wall time in seconds.

    on_step(engine) is called after every step (to sample memory use, say)."""
    t0 = time.perf_counter()
    pending = list(enumerate(specs))
    ids: dict[int, str] = {}
    done = {}
    while pending or engine.has_unfinished_requests():
        if pending and (static_batch_size is None or not engine.has_unfinished_requests()):
            n = len(pending) if static_batch_size is None else static_batch_size
            for i, s in pending[:n]:
                params = SamplingParams(max_tokens=s.output_len, ignore_eos=s.ignore_eos)
                ids[i] = engine.add_request(None, s.prompt, params, arrival_time=t0).request_id
            pending = pending[n:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if on_step:
            on_step(engine)
    duration = time.perf_counter() - t0
    records = [RequestRecord.from_token_times(s, t0, done[ids[i]].metrics.token_times, done[ids[i]].text)
               for i, s in enumerate(specs)]
    return records, duration
