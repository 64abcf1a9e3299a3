"""The load generator: sends a workload to a backend at the planned arrival times, under a concurrency cap.

Online backends: one asyncio task per request, started at its arrival time; a semaphore holds at most
--max-concurrency in flight (later arrivals wait for a slot, and that wait counts in their TTFT, as in vLLM).
Offline backends get every request at once (rate inf). Warm-up requests run first and are not recorded.
"""
from __future__ import annotations

import asyncio
import gc
import time

from tqdm import tqdm

from benchmarks.backends.base import Backend, RequestRecord, RequestSpec


async def _run_online(backend: Backend, specs: list[RequestSpec], arrivals_s: list[float],
                      max_concurrency: int | None, warmup: list[RequestSpec], progress: bool
                      ) -> tuple[list[RequestRecord], float, float]:
    await backend.start()
    try:
        if warmup:
            await asyncio.gather(*(backend.send(s) for s in warmup))
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(specs), desc=f"{backend.name}", disable=not progress, leave=False)

        async def one(spec: RequestSpec, at_s: float) -> RequestRecord:
            delay = t0 + at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                record = await backend.send(spec)
            else:
                async with limit:
                    record = await backend.send(spec)
            bar.update(1)
            return record

        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(s, a) for s, a in zip(specs, arrivals_s)))
        duration = time.perf_counter() - t0
        bar.close()
        return list(records), duration, t0
    finally:
        await backend.aclose()


def run_load(backend: Backend, specs: list[RequestSpec], arrivals_s: list[float],
             max_concurrency: int | None = None, warmup: list[RequestSpec] = (), progress: bool = True
             ) -> tuple[list[RequestRecord], float, float]:
    """Run the workload; returns (one record per spec in order, benchmark duration in seconds, perf_counter at
    the start: request i was planned to leave at t0 + arrivals_s[i]).

    warmup: requests sent first, all at once, untimed and unrecorded.
    """
    warm = list(warmup)
    if backend.online:
        # As vLLM's client does: move everything alive now out of the collector's sight, so garbage collection
        # pauses in this process (a loaded model, a tokenizer) do not show up as server latency.
        gc.collect()
        gc.freeze()
        try:
            return asyncio.run(_run_online(backend, specs, arrivals_s, max_concurrency, warm, progress))
        finally:
            gc.unfreeze()
    if warm:
        backend.run_batch(warm)
    t0 = time.perf_counter()
    records = backend.run_batch(specs)
    return records, time.perf_counter() - t0, t0
