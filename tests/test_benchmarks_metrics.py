"""The metric maths on a synthetic trace whose answers are worked out by hand below."""
import math

import numpy as np
import pytest

from benchmarks.arrivals import arrival_times
from benchmarks.backends.base import RequestRecord, RequestSpec
from benchmarks.metrics import parse_goodput, summarize
from core.errors import UserError


def trace() -> list[RequestRecord]:
    # A: sent at 0, tokens at 0.10, 0.15, 0.25, 0.30 -> TTFT 100 ms, ITL 50/100/50, E2EL 300, TPOT 200/3 ms
    a = RequestRecord.from_token_times(RequestSpec("a", 10, 4), 0.0, [0.10, 0.15, 0.25, 0.30])
    # B: sent at 0.5, tokens at 0.7, 0.8 -> TTFT 200 ms, ITL 100, E2EL 300, TPOT 100 ms
    b = RequestRecord.from_token_times(RequestSpec("b", 20, 2), 0.5, [0.7, 0.8])
    # C: failed: counted as failed, in nothing else
    c = RequestRecord(30, error="HTTP 500", start_s=1.0)
    return [a, b, c]


def test_record_from_token_times():
    a = trace()[0]
    assert a.success and a.output_len == 4
    assert a.ttft_s == pytest.approx(0.10) and a.e2el_s == pytest.approx(0.30)
    assert a.itl_s == pytest.approx([0.05, 0.10, 0.05])
    assert a.tpot_s == pytest.approx(0.2 / 3)
    assert RequestRecord.from_token_times(RequestSpec("x", 1, 1), 0.0, []).success is False


def test_summary_on_hand_computed_trace():
    m = summarize(trace(), duration_s=2.0, goodput_ms={"ttft": 150, "tpot": 80})
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)  # the failed request's 30 not counted
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["input_throughput"] == pytest.approx(15.0)
    assert m["total_token_throughput"] == pytest.approx(18.0)
    # TTFT {100, 200}: mean = median 150, population std 50, linear percentiles p90 = 190, p99 = 199
    assert m["mean_ttft_ms"] == pytest.approx(150) and m["median_ttft_ms"] == pytest.approx(150)
    assert m["std_ttft_ms"] == pytest.approx(50)
    assert m["p90_ttft_ms"] == pytest.approx(190) and m["p99_ttft_ms"] == pytest.approx(199)
    # TPOT {66.67, 100}
    assert m["mean_tpot_ms"] == pytest.approx((200 / 3 + 100) / 2)
    # ITL pooled over requests {50, 100, 50, 100}: mean = median 75, std 25, p90 = p99 = 100
    assert m["mean_itl_ms"] == pytest.approx(75) and m["median_itl_ms"] == pytest.approx(75)
    assert m["std_itl_ms"] == pytest.approx(25) and m["p99_itl_ms"] == pytest.approx(100)
    assert m["mean_e2el_ms"] == pytest.approx(300) and m["std_e2el_ms"] == pytest.approx(0, abs=1e-9)
    # goodput: A meets TTFT <= 150 and TPOT <= 80; B misses TTFT -> 1 good request / 2 s
    assert m["request_goodput"] == pytest.approx(0.5)
    # the book's default SLOs (TTFT 100, TPOT 50): A misses TPOT (66.7) -> 0
    assert summarize(trace(), 2.0, parse_goodput(None))["request_goodput"] == 0


def test_cost_per_million_output_tokens():
    # 2 GPUs at $2/h for 2 s = $0.00222 for 6 tokens -> $370.37 per million
    m = summarize(trace(), 2.0, gpu_hour_price=2.0, num_gpus=2)
    assert m["cost_per_million_output_tokens"] == pytest.approx(2 * 2 * 2 / 3600 / 6 * 1e6)
    assert summarize(trace(), 2.0)["cost_per_million_output_tokens"] is None


def test_all_failed_gives_no_fake_latencies():
    m = summarize([RequestRecord(5, error="timeout")], 1.0)
    assert (m["completed"], m["failed"]) == (0, 1)
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None


def test_parse_goodput():
    assert parse_goodput(["ttft:100", "tpot:50"]) == {"ttft": 100.0, "tpot": 50.0}
    assert parse_goodput(None) == {"ttft": 100.0, "tpot": 50.0}
    for bad in (["itl:5"], ["ttft=5"], ["ttft:-1"], ["ttft:abc"]):
        with pytest.raises(UserError):
            parse_goodput(bad)


def test_arrivals_poisson_and_gamma():
    t = arrival_times(2000, 10.0, 1.0, seed=1)
    assert t == arrival_times(2000, 10.0, 1.0, seed=1)  # seeded
    assert all(b >= a for a, b in zip(t, t[1:]))
    assert t[-1] == pytest.approx(200.0)  # rescaled to end at n / rate, as vLLM does
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.1, rel=0.01)
    assert np.std(gaps) / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: CV 1
    bursty = np.diff(arrival_times(2000, 10.0, 0.25, seed=1))
    assert np.std(bursty) / bursty.mean() == pytest.approx(2.0, abs=0.25)  # gamma shape k: CV 1/sqrt(k)
    assert arrival_times(5, math.inf) == [0.0] * 5
    with pytest.raises(UserError):
        arrival_times(5, 0.0)
    with pytest.raises(UserError):
        arrival_times(5, 1.0, burstiness=0)
