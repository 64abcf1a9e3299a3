"""optimization/monitoring: metric parsing and window maths (against hand-computed values), the live view against a
fake exporter, the Grafana dashboard's PromQL against the server's metric names, and a real Prometheus scraping the
fake exporter (skipped when the prometheus binary is absent)."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from optimization.monitoring import demo, live
from optimization.monitoring import prometheus as prom
from optimization.monitoring.metrics import HISTOGRAMS, SERVER_METRICS, histogram_quantile, parse, window

BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0)


class FakeExporter:
    """The server's metric names on a private registry, with values the test sets; optionally served over HTTP on
    127.0.0.1 and moved by a background thread."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.hist = {n: Histogram(n, n, registry=r, buckets=BUCKETS) for n in HISTOGRAMS}
        self.gauge = {n: Gauge(n, n, registry=r) for n in ("llmip:num_requests_running", "llmip:num_requests_waiting",
                                                           "llmip:kv_cache_usage_perc")}
        self.counter = {n: Counter(n, n, registry=r) for n in ("llmip:prompt_tokens_total",
                                                               "llmip:generation_tokens_total",
                                                               "llmip:request_success_total",
                                                               "llmip:num_preemptions_total")}
        self.moving = threading.Event()
        self.server = None

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self) -> str:
        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        threading.Thread(target=self._move, daemon=True).start()
        return f"127.0.0.1:{self.server.server_port}"

    def _move(self):
        """While `moving` is set: a request finishes every 20 ms with TTFT 30 ms, TPOT 8 ms, 5 output tokens."""
        while self.server is not None:
            if self.moving.is_set():
                self.hist["llmip:time_to_first_token_seconds"].observe(0.03)
                self.hist["llmip:time_per_output_token_seconds"].observe(0.008)
                self.counter["llmip:generation_tokens_total"].inc(5)
                self.counter["llmip:request_success_total"].inc()
            time.sleep(0.02)

    def close(self):
        if self.server is not None:
            server, self.server = self.server, None
            server.shutdown()
            server.server_close()


@pytest.fixture
def exporter():
    e = FakeExporter()
    yield e
    e.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_histogram_quantile_hand_computed():
    b = [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 10)]
    assert histogram_quantile(0.1, b) == pytest.approx(0.05)          # rank 1 of 2 in [0, 0.1]
    assert histogram_quantile(0.5, b) == pytest.approx(0.1 + 0.4 * 3 / 4)  # rank 5: 3rd of 4 in (0.1, 0.5]
    assert histogram_quantile(0.8, b) == pytest.approx(1.0)           # rank 8: last of (0.5, 1]
    assert histogram_quantile(0.99, b) == 1.0                         # in +Inf: highest finite bound
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0), (math.inf, 0)]))
    assert math.isnan(histogram_quantile(0.5, [(0.1, 3)]))             # no +Inf bucket


def test_parse_and_window_hand_computed(exporter):
    ttft = exporter.hist["llmip:time_to_first_token_seconds"]
    for v in (0.02, 0.02, 0.3):  # before the window: must not count
        ttft.observe(v)
    exporter.counter["llmip:generation_tokens_total"].inc(100)
    exporter.counter["llmip:num_preemptions_total"].inc(2)
    old = parse(exporter.text(), time_s=10.0)
    assert old.buckets["llmip:time_to_first_token_seconds"] == [(0.01, 0), (0.05, 2), (0.1, 2), (0.5, 3), (1.0, 3),
                                                                (math.inf, 3)]
    for v in (0.07, 0.08, 0.09, 0.7):  # the window: 3 in (0.05, 0.1], 1 in (0.5, 1]
        ttft.observe(v)
    exporter.hist["llmip:time_per_output_token_seconds"].observe(0.004)
    exporter.counter["llmip:generation_tokens_total"].inc(60)
    exporter.counter["llmip:request_success_total"].inc(4)
    exporter.counter["llmip:num_preemptions_total"].inc(1)
    exporter.gauge["llmip:num_requests_running"].set(3)
    exporter.gauge["llmip:kv_cache_usage_perc"].set(0.25)
    s = window(old, parse(exporter.text(), time_s=12.0))
    assert s.window_s == 2.0
    assert s.median_ttft_ms == pytest.approx(1000 * (0.05 + 0.05 * 2 / 3))  # rank 2 of the 3 in (0.05, 0.1]
    assert s.p99_ttft_ms == pytest.approx(1000 * (0.5 + 0.5 * (3.96 - 3)))  # rank 3.96: 0.96 into (0.5, 1]
    assert s.median_tpot_ms == pytest.approx(1000 * 0.01 * 0.5)
    assert math.isnan(s.median_e2el_ms) and s.as_dict()["median_e2el_ms"] is None  # nothing finished in the window
    assert s.output_throughput == pytest.approx(30.0) and s.request_throughput == pytest.approx(2.0)
    assert (s.num_preemptions, s.num_preemptions_window) == (3, 1)
    assert (s.num_requests_running, s.num_requests_waiting, s.kv_cache_usage) == (3, 0, 0.25)


def test_parse_sums_label_sets_and_counter_reset():
    text = """
# TYPE llmip:generation_tokens_total counter
llmip:generation_tokens_total{model_name="a"} 10
llmip:generation_tokens_total{model_name="b"} 5
# TYPE llmip:kv_cache_usage_perc gauge
llmip:kv_cache_usage_perc{engine="0"} 0.5
llmip:kv_cache_usage_perc{engine="1"} 0.75
# TYPE other_metric counter
other_metric_total 7
"""
    s = parse(text, 0.0)
    assert s.values == {"llmip:generation_tokens_total": 15, "llmip:kv_cache_usage_perc": 0.75}
    restarted = parse("# TYPE llmip:generation_tokens_total counter\nllmip:generation_tokens_total 4\n", 2.0)
    assert window(s, restarted).output_throughput == 2.0  # counted from zero again: 4 tokens in 2 s
    with pytest.raises(ValueError):
        window(restarted, s)


def test_parse_reads_vllm_names_and_escaped_colons():
    text = """
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{model_name="m"} 12
# TYPE vllm:request_time_per_output_token_seconds histogram
vllm:request_time_per_output_token_seconds_bucket{le="0.1",model_name="m"} 1
vllm:request_time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 2
vllm:request_time_per_output_token_seconds_count{model_name="m"} 2
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{le="+Inf",model_name="m"} 50
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.125
# TYPE llmip_num_requests_running gauge
llmip_num_requests_running 3
"""
    s = parse(text, 0.0)
    assert s.values == {"llmip:generation_tokens_total": 12, "llmip:kv_cache_usage_perc": 0.125,
                        "llmip:num_requests_running": 3}
    assert s.buckets == {"llmip:time_per_output_token_seconds": [(0.1, 1), (math.inf, 2)]}  # not inter-token


def test_window_keeps_the_last_seconds():
    w = live.Window(seconds=3)
    assert w.stats() is None
    for t in range(10):
        w.add(parse("", float(t)))
    assert [s.time_s for s in w.scrapes] == [6.0, 7.0, 8.0, 9.0]
    assert w.stats().window_s == 3.0
    assert live.kv_bar(0.3, width=10) == "[###.......]  30.0%"


def test_live_once_against_fake_exporter(exporter, tmp_path, capsys):
    target = exporter.serve()
    exporter.gauge["llmip:num_requests_waiting"].set(2)
    exporter.gauge["llmip:kv_cache_usage_perc"].set(0.5)
    exporter.moving.set()
    live.main(["--url", f"http://{target}", "--once", "--interval", "0.5", "--out", str(tmp_path / "s.json")])
    shown = capsys.readouterr().out
    assert "TTFT" in shown and "KV cache" in shown and "50.0%" in shown
    s = json.loads((tmp_path / "s.json").read_text())
    # every observation is 30 ms TTFT, in the (0.01, 0.05] bucket; the view interpolates inside it
    assert 10 < s["median_ttft_ms"] < 50 and 10 < s["p99_ttft_ms"] <= 50
    assert 0 < s["median_tpot_ms"] <= 10
    assert s["output_throughput"] > 0 and s["request_throughput"] > 0
    assert (s["num_requests_waiting"], s["kv_cache_usage"]) == (2, 0.5)


def test_live_duration_mode_redraws_until_the_end(exporter, tmp_path):
    target = exporter.serve()
    exporter.moving.set()
    t0 = time.monotonic()
    live.main(["--url", f"http://{target}", "--duration", "1.5", "--interval", "0.3", "--window", "0.6",
               "--out", str(tmp_path / "s.json")])
    assert 1.2 < time.monotonic() - t0 < 5
    s = json.loads((tmp_path / "s.json").read_text())
    assert 0.6 <= s["window_s"] < 1.2 and s["output_throughput"] > 0


def test_live_unreachable_server_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        live.main(["--url", f"http://127.0.0.1:{free_port()}", "--once"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: cannot read")
    with pytest.raises(SystemExit):
        live.main(["--window", "0"])


def dashboard_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers with our prefix, histogram series mapped to their family."""
    names = set(re.findall(r"llmip:[a-zA-Z0-9_:]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(r"_(bucket|sum|count)$", "", n) in HISTOGRAMS else n
            for n in names}


def test_dashboard_names_only_exported_metrics():
    dash = json.loads(prom.DASHBOARD.read_text())
    assert dash["panels"] and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            names = dashboard_metric_names(t["expr"])
            assert names and names <= set(SERVER_METRICS), (panel["title"], t["expr"])
            # a histogram is only read through its buckets or sum/count, never by its bare family name
            assert not re.search(r"llmip:\w+_seconds(?![_\w])", t["expr"]), t["expr"]
            used |= names
    assert used == set(SERVER_METRICS)  # every exported metric has a panel
    assert dashboard_metric_names("rate(llmip:nope_total[1m])") - set(SERVER_METRICS)  # the check can fail


def test_prometheus_cli_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        prom.main(["--target", "localhost"])
    assert e.value.code == 2 and "host:port" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason=f"no prometheus binary; install it with: {prom.APT_INSTALL}")
def test_real_prometheus_scrapes_fake_exporter(exporter, tmp_path):
    target = exporter.serve()
    exporter.moving.set()
    with prom.prometheus([target], port=free_port(), scrape_interval_s=0.5) as url:
        prom.wait_for_scrape(url)
        first = prom.value("sum(llmip:generation_tokens_total)", url)
        prom.wait_for_scrape(url, after=time.time() + 0.5)
        assert prom.value("sum(llmip:generation_tokens_total)", url) > first
        p50 = prom.value("histogram_quantile(0.5, sum by (le) "
                         "(rate(llmip:time_to_first_token_seconds_bucket[5s])))", url)
        assert 0.01 < p50 <= 0.05  # every TTFT is 30 ms
        for name, expr in prom.dashboard_queries("5s"):  # every panel's PromQL is valid and names live series
            assert prom.query(expr, url) is not None, name
        assert not math.isnan(prom.value(dict(prom.dashboard_queries("5s"))["Token throughput: output tokens/s"],
                                         url))
        # Reference check of our quantile arithmetic: freeze the exporter, let Prometheus scrape the frozen
        # buckets, and compare its histogram_quantile with ours on the same cumulative counts.
        exporter.moving.clear()
        time.sleep(0.1)
        exporter.hist["llmip:time_to_first_token_seconds"].observe(0.7)  # a second bucket, to make it non-trivial
        ours = parse(exporter.text(), 0.0).buckets["llmip:time_to_first_token_seconds"]
        prom.wait_for_scrape(url, after=time.time() + 0.1)
        for q in (0.1, 0.5, 0.99, 0.999):
            theirs = prom.value(f"histogram_quantile({q}, sum by (le) (llmip:time_to_first_token_seconds_bucket))",
                                url)
            assert theirs == pytest.approx(histogram_quantile(q, ours)), q
        with pytest.raises(prom.UserError, match="PromQL"):
            prom.query("rate(llmip:generation_tokens_total)", url)  # a range function without a range


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason=f"no prometheus binary; install it with: {prom.APT_INSTALL}")
def test_prometheus_cli_runs_and_reports(exporter, tmp_path, capsys):
    target = exporter.serve()
    exporter.moving.set()
    prom.main(["--target", target, "--port", str(free_port()), "--duration", "3", "--scrape-interval", "0.5",
               "--rate-window", "2s",
               "--out", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert "Prometheus ready" in out and "Prometheus stopped." in out
    values = json.loads((tmp_path / "d.json").read_text())
    assert values["Token throughput: output tokens/s"] > 0


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason=f"no prometheus binary; install it with: {prom.APT_INSTALL}")
@pytest.mark.skipif(importlib.util.find_spec("engines.ours.server") is None, reason="engines/ours/server.py absent")
def test_demo_server_metrics_agree_with_the_harness(tmp_path):
    """Our real server under the harness's load, scraped by Prometheus: the server's own account (PromQL) must match
    what the client measured: counts exactly, mean latencies up to the HTTP time between client and engine."""
    demo.main(["--num-prompts", "4", "--output-len", "8", "--request-rate", "4", "--out", str(tmp_path / "d.json")])
    d = json.loads((tmp_path / "d.json").read_text())
    client, server = d["client"], d["server"]
    assert client["failed"] == 0 and client["completed"] == server["completed"] == 4
    for key in ("total_output_tokens", "total_input_tokens"):
        assert server[key] == client[key], key
    for key in ("mean_ttft_ms", "mean_e2el_ms"):
        assert server[key] == pytest.approx(client[key], rel=0.2, abs=50), key
    assert server["num_preemptions"] == 0
