"""Prometheus metrics of our server, named like vLLM's (`vllm:` -> `llmip:`) so the same dashboards read both.

Latencies are observed once per request when it finishes, from the engine's perf_counter stamps:
  TTFT = first token - arrival, queue time = first scheduled - arrival, E2E = finished - arrival,
  TPOT = (E2E - TTFT) / (output tokens - 1), the harness's definition (requests with one token have none).
Gauges are set by the engine loop after every step, so a scrape reads them without touching the engine.
Each server gets its own registry: several servers in one process (tests) never share counters.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engines.ours.outputs import RequestOutput

# Seconds. vLLM's TTFT buckets, reaching from a cached short prompt on a GPU to a long queue on a CPU.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("llmip:time_to_first_token_seconds", "Time to first token (arrival to first token).",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llmip:time_per_output_token_seconds", "Mean time per output token after the first, "
                              "per request.", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("llmip:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("llmip:request_queue_time_seconds", "Arrival to first scheduled step.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("llmip:num_requests_running", "Requests holding KV blocks in the running batch.",
                             registry=r)
        self.waiting = Gauge("llmip:num_requests_waiting", "Requests queued (new or preempted).", registry=r)
        self.kv_usage = Gauge("llmip:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                              registry=r)
        # prometheus_client appends _total to counter names: these export llmip:prompt_tokens_total and so on.
        self.prompt_tokens = Counter("llmip:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("llmip:generation_tokens", "Generated tokens.", registry=r)
        self.success = Counter("llmip:request_success", "Requests finished by stop or length.", registry=r)
        self.preemptions = Counter("llmip:num_preemptions", "Sequences preempted for lack of blocks.", registry=r)
        self._preemptions_seen = 0

    def record_step(self, outputs: list[RequestOutput], stats: dict) -> None:
        """After an engine step: count tokens, observe finished requests, refresh gauges from `engine.stats()`."""
        self.generation_tokens.inc(len(outputs))  # every output of a step carries exactly one new token
        for out in outputs:
            if out.finished:
                self.record_finished(out)
        self.record_stats(stats)

    def record_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        if out.finish_reason in ("stop", "length"):
            self.success.inc()
        if m.first_token_time is None or m.finished_time is None:
            return
        ttft = m.first_token_time - m.arrival_time
        e2e = m.finished_time - m.arrival_time
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)
        if len(out.token_ids) > 1:
            self.tpot.observe((e2e - ttft) / (len(out.token_ids) - 1))

    def record_stats(self, stats: dict) -> None:
        self.running.set(stats["num_requests_running"])
        self.waiting.set(stats["num_requests_waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.preemptions.inc(stats["num_preemptions"] - self._preemptions_seen)
        self._preemptions_seen = stats["num_preemptions"]

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)
