"""Our model in process, as a static-batch offline backend over `core.generate.generate`.

Placeholder until the engines chapter replaces this body with `engines.ours.LLM` (continuous batching): requests
run in batches of --max-batch-size in workload order, all arriving at t=0, so a request's TTFT includes the
batches before it. Token times come from generate's on_token callback.
"""
from __future__ import annotations

import argparse
import time

from core.generate import SamplingParams, generate
from core.loading import load_model
from core.measure import gpu_peak_mb, peak_rss_mb

from benchmarks.backends.base import Backend, RequestRecord, RequestSpec


class OursBackend(Backend):
    name, online = "ours", False

    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None, max_batch_size: int = 8):
        self.loaded = load_model(model, device, dtype)
        self.max_batch_size = max_batch_size

    def run_batch(self, specs: list[RequestSpec]) -> list[RequestRecord]:
        tok = self.loaded.tokenizer
        t0 = time.perf_counter()
        records: list[RequestRecord] = []
        for i in range(0, len(specs), self.max_batch_size):
            batch = specs[i:i + self.max_batch_size]
            times: list[list[float]] = [[] for _ in batch]
            tokens: list[list[int]] = [[] for _ in batch]

            def on_token(row: int, token: int) -> None:
                if len(tokens[row]) < batch[row].output_len:
                    times[row].append(time.perf_counter())
                    tokens[row].append(token)

            params = SamplingParams(max_tokens=max(s.output_len for s in batch),
                                    ignore_eos=all(s.ignore_eos for s in batch))
            try:
                generate(self.loaded.model, [tok(s.prompt).input_ids for s in batch], params, on_token)
            except Exception as e:  # record, don't crash the run
                records += [RequestRecord(s.prompt_len, error=f"{type(e).__name__}: {e}", start_s=t0) for s in batch]
                continue
            records += [RequestRecord.from_token_times(s, t0, ts, tok.decode(ids))
                        for s, ts, ids in zip(batch, times, tokens)]
        return records

    def peak_memory_mb(self) -> float | None:
        device = next(self.loaded.model.parameters()).device
        return gpu_peak_mb(device) if device.type == "cuda" else peak_rss_mb()

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.loaded.label, "max_batch_size": self.max_batch_size,
                "batching": "static"}


def from_args(args: argparse.Namespace) -> OursBackend:
    return OursBackend(args.model, args.device, args.dtype, args.max_batch_size)
