"""Our engine (`engines.ours.LLMEngine`) in process: continuous batching over a paged KV cache, every request at once.

All requests arrive at t=0 (request rate inf); the engine admits them as memory and `max_num_seqs` allow, mixes
prefill chunks with decodes under its token budget, and stamps each token's perf_counter time as it is produced.
`--max-batch-size` sets the engine's max_num_seqs (the most sequences in one step); `--max-model-len` its context.
"""
from __future__ import annotations

import argparse
import time

from core.generate import SamplingParams
from core.loading import load_model
from core.measure import gpu_peak_mb, peak_rss_mb

from benchmarks.backends.base import Backend, RequestRecord, RequestSpec


class OursBackend(Backend):
    name, online = "ours", False

    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None, max_batch_size: int = 256,
                 max_model_len: int = 2048, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 kv_cache_memory_gb: float | None = None):
        from engines.ours import LLMEngine
        self.loaded = load_model(model, device, dtype)
        self.engine = LLMEngine(self.loaded, max_num_seqs=max_batch_size,
                                max_model_len=min(max_model_len, self.loaded.model.config.max_position_embeddings),
                                max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching, kv_cache_memory_gb=kv_cache_memory_gb)
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.peak_kv_usage = 0.0

    def run_batch(self, specs: list[RequestSpec]) -> list[RequestRecord]:
        engine = self.engine
        t0 = time.perf_counter()
        ids, errors = [], {}
        for i, s in enumerate(specs):
            params = SamplingParams(max_tokens=s.output_len, ignore_eos=s.ignore_eos)
            try:
                ids.append(engine.add_request(None, s.prompt, params, arrival_time=t0).request_id)
            except Exception as e:  # record, don't crash the run (a prompt longer than max_model_len, ...)
                ids.append(None)
                errors[i] = f"{type(e).__name__}: {e}"
        finished = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            self.peak_kv_usage = max(self.peak_kv_usage, engine.block_manager.usage())
        records = []
        for i, (s, rid) in enumerate(zip(specs, ids)):
            if rid is None:
                records.append(RequestRecord(s.prompt_len, error=errors[i], start_s=t0))
            else:
                out = finished[rid]
                records.append(RequestRecord.from_token_times(s, t0, out.metrics.token_times, out.text))
        return records

    def peak_memory_mb(self) -> float | None:
        device = next(self.loaded.model.parameters()).device
        return gpu_peak_mb(device) if device.type == "cuda" else peak_rss_mb()

    def kv_cache_usage(self) -> float | None:
        return self.peak_kv_usage

    def describe(self) -> dict:
        bm = self.engine.block_manager
        return {"backend": self.name, "model": self.loaded.label, "batching": "continuous",
                "max_num_seqs": self.max_batch_size, "max_num_batched_tokens": self.max_num_batched_tokens,
                "num_kv_blocks": bm.num_blocks, "block_size": bm.block_size,
                "enable_prefix_caching": bm.enable_prefix_caching, "num_preemptions": self.engine.stats()[
                    "num_preemptions"]}


def from_args(args: argparse.Namespace) -> OursBackend:
    return OursBackend(args.model, args.device, args.dtype, args.max_batch_size, args.max_model_len)
