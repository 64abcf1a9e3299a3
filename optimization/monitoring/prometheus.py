"""A real Prometheus, started on loopback to scrape our server every second, and `query(expr)` over its HTTP API.

    python -m optimization.monitoring.prometheus --target 127.0.0.1:8000 --port 9090

writes a minimal config into a temporary folder, starts the `prometheus` binary (Debian/Ubuntu:
`apt-get install -y prometheus`; its systemd service is not used), waits until it is ready, and stops it on exit
(Ctrl-C, or after --duration seconds). Before stopping it prints the dashboard's PromQL expressions evaluated now.
Its web UI (http://127.0.0.1:9090/graph) and Grafana (grafana_dashboard.json) read the same data while it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from core.errors import UserError, cli

APT_INSTALL = "apt-get update && apt-get install -y prometheus"
DASHBOARD = Path(__file__).with_name("grafana_dashboard.json")


def find_binary() -> str:
    """The prometheus executable on PATH (or $PROMETHEUS_BIN)."""
    binary = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not binary:
        raise UserError(f"no prometheus binary on PATH; install it with: {APT_INSTALL}")
    return binary


# prometheus_client (0.26) answers Prometheus' OpenMetrics request with the colon in sample names escaped to "_", so
# "llmip:generation_tokens_total" would be stored as "llmip_generation_tokens_total" (plain-text scrapes keep it).
# This rule puts the colon back, so PromQL uses the names the server declares whichever format was negotiated.
UNESCAPE_COLON = {"source_labels": ["__name__"], "regex": "llmip_(.+)", "target_label": "__name__",
                  "replacement": "llmip:${1}"}


def write_config(folder: Path, targets: list[str], scrape_interval_s: float = 1.0) -> Path:
    """A one-job config: scrape /metrics of every host:port in `targets`. JSON is valid YAML, so no YAML writer."""
    interval = f"{int(scrape_interval_s * 1000)}ms"
    config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
              "scrape_configs": [{"job_name": "llmip", "metrics_path": "/metrics",
                                  "static_configs": [{"targets": targets}],
                                  "metric_relabel_configs": [UNESCAPE_COLON]}]}
    path = folder / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))
    return path


def query(expr: str, url: str = "http://127.0.0.1:9090", at: float | None = None) -> list[tuple[dict, float]]:
    """Evaluate a PromQL instant query; returns [(labels, value)] (one pair for a scalar, none when nothing matches).

    `at` is a Unix time in seconds (default: now). A PromQL error raises UserError with Prometheus' message.
    """
    params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # 400/422 carry Prometheus' explanation in the JSON body
        body = json.load(e)
    except OSError as e:
        raise UserError(f"Prometheus at {url} did not answer: {e}") from e
    if body.get("status") != "success":
        raise UserError(f"PromQL {expr!r}: {body.get('error', body)}")
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [({}, float(data["result"][1]))]
    if data["resultType"] == "vector":
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]
    raise UserError(f"PromQL {expr!r} returned a {data['resultType']}; use an instant vector expression")


def value(expr: str, url: str = "http://127.0.0.1:9090") -> float:
    """A PromQL expression that yields one number (NaN when it yields nothing, e.g. before the first scrape)."""
    result = query(expr, url)
    return result[0][1] if result else math.nan


def wait_for_scrape(url: str, timeout_s: float = 30.0, after: float | None = None) -> None:
    """Block until every target has been scraped successfully (`up == 1`), later than Unix time `after` if given."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        up = query("up", url)
        scraped = query("timestamp(up)", url)
        if up and all(v == 1 for _, v in up) and (after is None or min(v for _, v in scraped) > after):
            return
        time.sleep(0.25)
    raise UserError(f"Prometheus at {url} did not scrape its targets within {timeout_s:.0f} s (is the server up?)")


def wait_for_targets(url: str, timeout_s: float = 30.0) -> list[dict]:
    """Block until Prometheus has tried to scrape every target once (it syncs new targets after ~5 s); returns its
    active targets (`scrapeUrl`, `health` "up"/"down", `lastError`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/v1/targets?state=active", timeout=10) as r:
            active = json.load(r)["data"]["activeTargets"]
        if active and all(t["health"] != "unknown" for t in active):
            return active
        time.sleep(0.25)
    raise UserError(f"Prometheus at {url} did not scrape its targets within {timeout_s:.0f} s")


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise UserError(f"prometheus exited with status {proc.returncode}: {' | '.join(tail)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise UserError(f"prometheus was not ready at {url} within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM lets Prometheus close its TSDB cleanly; SIGKILL only if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def prometheus(targets: list[str], port: int = 9090, scrape_interval_s: float = 1.0,
               timeout_s: float = 30.0) -> Iterator[str]:
    """Run Prometheus on 127.0.0.1:`port` scraping `targets` ("host:port"); yields its URL; always stops it and
    removes its temporary config and data."""
    binary = find_binary()
    with tempfile.TemporaryDirectory(prefix="llmip-prometheus-") as tmp:
        folder = Path(tmp)
        config = write_config(folder, targets, scrape_interval_s)
        log = folder / "prometheus.log"
        cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"]
        with open(log, "w") as out:
            # Its own session: Ctrl-C reaches only us, and we stop it after printing the final table.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, proc, log, timeout_s)
            yield url
        finally:
            _stop(proc)


def dashboard_queries(rate_window: str = "30s") -> list[tuple[str, str]]:
    """(panel title and legend, PromQL) for every target of grafana_dashboard.json, with Grafana's
    $__rate_interval replaced by `rate_window` so plain Prometheus can evaluate them."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            name = f"{panel['title']}: {target.get('legendFormat', '')}".rstrip(": ")
            out.append((name, target["expr"].replace("$__rate_interval", rate_window)))
    return out


def print_dashboard(url: str, rate_window: str = "30s") -> dict[str, float]:
    """Evaluate every dashboard query now, print them as a table, and return {panel: value}."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Dashboard queries at {time.strftime('%H:%M:%S')} (windows of {rate_window})")
    table.add_column("panel")
    table.add_column("PromQL", overflow="fold")
    table.add_column("value", justify="right")
    values = {}
    for name, expr in dashboard_queries(rate_window):
        values[name] = value(expr, url)
        table.add_row(name, expr, "-" if math.isnan(values[name]) else f"{values[name]:.4g}")
    Console().print(table)
    return values


def _interrupt(_signum, _frame) -> None:
    """SIGTERM ends the run like Ctrl-C, so Prometheus is still stopped cleanly."""
    raise KeyboardInterrupt


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", help="host:port whose /metrics to scrape (repeatable; "
                   "default 127.0.0.1:8000)")
    p.add_argument("--port", type=int, default=9090, help="Prometheus listens on 127.0.0.1:PORT")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: at Ctrl-C)")
    p.add_argument("--rate-window", default="30s", help="range of rate() in the final table")
    p.add_argument("--out", help="write the final dashboard values as JSON")
    args = p.parse_args(argv)
    targets = args.target or ["127.0.0.1:8000"]
    for t in targets:
        host, _, port = t.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--target {t!r} is not host:port")
    if args.scrape_interval <= 0 or args.duration < 0:
        raise UserError("--scrape-interval must be > 0 and --duration >= 0")
    with prometheus(targets, args.port, args.scrape_interval) as url:
        for t in wait_for_targets(url):
            print(f"target {t['scrapeUrl']}: {t['health']} {t['lastError']}".rstrip(), flush=True)
        print(f"Prometheus ready at {url} scraping every {args.scrape_interval:g} s; "
              f"try {url}/graph?g0.expr=llmip:generation_tokens_total  (Ctrl-C stops it)", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            if args.duration:
                time.sleep(args.duration)
            else:
                signal.pause()
        values = print_dashboard(url, args.rate_window)
    if args.out:
        Path(args.out).write_text(json.dumps({k: None if math.isnan(v) else v for k, v in values.items()}, indent=2))
    print("Prometheus stopped.")


if __name__ == "__main__":
    main()
