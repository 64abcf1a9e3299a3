"""Our server's Prometheus metrics: their names, one scrape parsed, and what two scrapes say about the time between.

A scrape of /metrics is a snapshot of running totals. Counters (tokens generated) and histograms (how many requests
had a TTFT under each bucket bound) only grow, so everything about "the last 10 seconds" comes from the difference of
two snapshots: tokens/s is the counter's increase over the elapsed time, and a latency percentile is read from the
increase of each histogram bucket, exactly as PromQL's `histogram_quantile(q, rate(x_bucket[10s]))` does it.
Gauges (requests running, KV-cache usage) are read as they are in the newest scrape.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# The contract with engines/ours/server.py: every name the server exports, and its Prometheus type.
HISTOGRAMS = ("llmip:time_to_first_token_seconds", "llmip:time_per_output_token_seconds",
              "llmip:e2e_request_latency_seconds", "llmip:request_queue_time_seconds")
GAUGES = ("llmip:num_requests_running", "llmip:num_requests_waiting", "llmip:kv_cache_usage_perc")
COUNTERS = ("llmip:prompt_tokens_total", "llmip:generation_tokens_total", "llmip:request_success_total",
            "llmip:num_preemptions_total")
SERVER_METRICS = {**{n: "histogram" for n in HISTOGRAMS}, **{n: "gauge" for n in GAUGES},
                  **{n: "counter" for n in COUNTERS}}


@dataclass
class Scrape:
    """One /metrics snapshot, summed over label sets (one engine exports one series per name).

    values: counter or gauge name -> value (kv_cache_usage_perc is the max over label sets, not the sum).
    buckets: histogram name -> [(upper bound in the metric's unit, cumulative count)], sorted, ending at +inf.
    """
    time_s: float
    values: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


# vLLM's names for the same quantities (vLLM 0.32's v1 metrics), so the live view also reads a vLLM server. Its
# per-request TPOT is `request_time_per_output_token_seconds`; other vLLM series are ignored.
VLLM_NAMES = {"vllm:request_time_per_output_token_seconds": "llmip:time_per_output_token_seconds",
              **{n.replace("llmip:", "vllm:"): n for n in SERVER_METRICS if n != "llmip:time_per_output_token_seconds"}}


def our_name(name: str) -> str:
    """Our name for a sample: also when the exporter escaped the colon to "_" (prometheus_client does so in its
    OpenMetrics output), 'llmip_generation_tokens_total' -> 'llmip:generation_tokens_total', and for vLLM's names,
    'vllm:generation_tokens_total' -> 'llmip:generation_tokens_total'."""
    if name.startswith("llmip_"):
        return "llmip:" + name[len("llmip_"):]
    base, suffix = name, ""
    for end in ("_bucket", "_sum", "_count"):
        if name.endswith(end) and name[:-len(end)] in VLLM_NAMES:
            base, suffix = name[:-len(end)], end
    return VLLM_NAMES[base] + suffix if base in VLLM_NAMES else name


def parse(text: str, time_s: float) -> Scrape:
    """Parse Prometheus text exposition (what GET /metrics returns) taken at `time_s` (monotonic seconds)."""
    values: dict[str, float] = defaultdict(float)
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            s = s._replace(name=our_name(s.name))
            if s.name.endswith("_bucket") and s.name[:-len("_bucket")] in HISTOGRAMS:
                buckets[s.name[:-len("_bucket")]][float(s.labels["le"])] += s.value
            elif s.name == "llmip:kv_cache_usage_perc":
                values[s.name] = max(values.get(s.name, 0.0), s.value)
            elif s.name in SERVER_METRICS:
                values[s.name] += s.value
    return Scrape(time_s, dict(values), {name: sorted(b.items()) for name, b in buckets.items()})


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile (0..1) of a histogram given as sorted (upper bound, cumulative count), by Prometheus' rule.

    Find the bucket holding the q*total-th observation and interpolate linearly inside it (the first bucket starts
    at 0); a rank in the +Inf bucket returns the highest finite bound. NaN when the histogram is empty.
    """
    if not buckets or buckets[-1][0] != math.inf or len(buckets) < 2:
        return math.nan
    counts = list(_monotonic(c for _, c in buckets))
    total = counts[-1]
    if total == 0:
        return math.nan
    rank = q * total
    b = bisect.bisect_left(counts, rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], counts[b]
    if b > 0:
        start, count, rank = buckets[b - 1][0], count - counts[b - 1], rank - counts[b - 1]
    return start + (end - start) * rank / count if count else math.nan


def _monotonic(counts):
    """Cumulative counts never decrease; a scrape racing an observation can break that by a little (Prometheus
    fixes it the same way)."""
    high = 0.0
    for c in counts:
        high = max(high, c)
        yield high


def _increase(new: float, old: float) -> float:
    """A counter's increase; a drop means the server restarted and counts from zero again."""
    return new - old if new >= old else new


def bucket_increase(new: list[tuple[float, float]], old: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per-bucket increase between two scrapes of one histogram (same bounds), as cumulative counts."""
    before = dict(old)
    return [(le, _increase(c, before.get(le, 0.0))) for le, c in new]


@dataclass
class WindowStats:
    """What the server did between two scrapes. Latencies in ms (NaN when no request finished that phase in the
    window), throughputs per second, gauges from the newer scrape."""
    window_s: float
    median_ttft_ms: float
    p99_ttft_ms: float
    median_tpot_ms: float
    p99_tpot_ms: float
    median_e2el_ms: float
    p99_e2el_ms: float
    median_queue_ms: float
    output_throughput: float
    prompt_throughput: float
    request_throughput: float
    num_requests_running: float
    num_requests_waiting: float
    kv_cache_usage: float
    num_preemptions: float
    num_preemptions_window: float

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def window(old: Scrape, new: Scrape) -> WindowStats:
    """Rates and percentiles over the time between `old` and `new` (new.time_s > old.time_s)."""
    dt = new.time_s - old.time_s
    if dt <= 0:
        raise ValueError("the newer scrape must come after the older one")

    def ms(q: float, name: str) -> float:
        inc = bucket_increase(new.buckets.get(name, []), old.buckets.get(name, []))
        return 1000 * histogram_quantile(q, inc)

    def rate(name: str) -> float:
        return _increase(new.values.get(name, 0.0), old.values.get(name, 0.0)) / dt

    ttft, tpot, e2el, queue = HISTOGRAMS
    return WindowStats(
        window_s=dt,
        median_ttft_ms=ms(0.5, ttft), p99_ttft_ms=ms(0.99, ttft),
        median_tpot_ms=ms(0.5, tpot), p99_tpot_ms=ms(0.99, tpot),
        median_e2el_ms=ms(0.5, e2el), p99_e2el_ms=ms(0.99, e2el),
        median_queue_ms=ms(0.5, queue),
        output_throughput=rate("llmip:generation_tokens_total"),
        prompt_throughput=rate("llmip:prompt_tokens_total"),
        request_throughput=rate("llmip:request_success_total"),
        num_requests_running=new.values.get("llmip:num_requests_running", 0.0),
        num_requests_waiting=new.values.get("llmip:num_requests_waiting", 0.0),
        kv_cache_usage=new.values.get("llmip:kv_cache_usage_perc", 0.0),
        num_preemptions=new.values.get("llmip:num_preemptions_total", 0.0),
        num_preemptions_window=rate("llmip:num_preemptions_total") * dt,
    )
