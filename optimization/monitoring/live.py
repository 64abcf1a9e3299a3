"""A terminal live view of a running server: scrape its /metrics every second and show the last window.

    python -m optimization.monitoring.live --url http://127.0.0.1:8000            # until Ctrl-C
    python -m optimization.monitoring.live --url http://127.0.0.1:8000 --once     # one frame, for scripts

TTFT and TPOT percentiles come from the increase of the histogram buckets over the last --window seconds (the same
arithmetic as PromQL's histogram_quantile over rate(), see metrics.py), so they describe recent requests, not the
whole life of the server; they are only as fine as the server's bucket bounds. No Prometheus needed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from core.errors import UserError, cli
from optimization.monitoring.metrics import Scrape, WindowStats, parse, window


def scrape(url: str, timeout_s: float = 5.0) -> Scrape:
    """GET `url`/metrics and parse it, stamped with the monotonic time of the answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError as e:
        raise UserError(f"cannot read {url}/metrics: {e}") from e
    return parse(text, time.monotonic())


class Window:
    """The scrapes of the last `seconds`; stats() compares the oldest with the newest."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.scrapes: deque[Scrape] = deque()

    def add(self, s: Scrape) -> None:
        self.scrapes.append(s)
        # Keep one scrape at or before the window's start, so the window spans the full `seconds`.
        while len(self.scrapes) > 2 and s.time_s - self.scrapes[1].time_s >= self.seconds:
            self.scrapes.popleft()

    def stats(self) -> WindowStats | None:
        return window(self.scrapes[0], self.scrapes[-1]) if len(self.scrapes) >= 2 else None


def kv_bar(usage: float, width: int = 30) -> str:
    """A text bar of the KV-cache usage (0..1), e.g. '[#########.....................]  30.0%'."""
    filled = round(min(max(usage, 0.0), 1.0) * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * usage:5.1f}%"


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def render(stats: WindowStats | None, url: str) -> Group:
    """One frame: latency table, throughput and engine-state table, KV-cache bar."""
    if stats is None:
        return Group(Text(f"{url}: waiting for a second scrape ..."))
    head = Text(f"{url}: the last {stats.window_s:.1f} s", style="bold")
    lat = Table()
    for col in ("ms", "p50", "p99"):
        lat.add_column(col, justify="right")
    lat.add_row("TTFT", _ms(stats.median_ttft_ms), _ms(stats.p99_ttft_ms))
    lat.add_row("TPOT", _ms(stats.median_tpot_ms), _ms(stats.p99_tpot_ms))
    lat.add_row("E2E latency", _ms(stats.median_e2el_ms), _ms(stats.p99_e2el_ms))
    state = Table.grid(padding=(0, 2))
    state.add_row("output tokens/s", f"{stats.output_throughput:.1f}", "prompt tokens/s",
                  f"{stats.prompt_throughput:.1f}")
    state.add_row("requests running", f"{stats.num_requests_running:.0f}", "waiting",
                  f"{stats.num_requests_waiting:.0f}")
    state.add_row("finished requests/s", f"{stats.request_throughput:.2f}", "preemptions (window / total)",
                  f"{stats.num_preemptions_window:.0f} / {stats.num_preemptions:.0f}")
    style = "red" if stats.kv_cache_usage >= 0.95 else "yellow" if stats.kv_cache_usage >= 0.8 else "green"
    return Group(head, lat, state, Text("KV cache " + kv_bar(stats.kv_cache_usage), style=style))


def watch(url: str, until: Callable[[], bool], interval_s: float = 1.0, window_s: float = 10.0,
          console: Console | None = None) -> Window:
    """Scrape `url` every `interval_s` and redraw the view until `until()` is true or Ctrl-C; returns the window."""
    win = Window(window_s)
    win.add(scrape(url))  # fails fast with one line if the server is not there
    with contextlib.suppress(KeyboardInterrupt):
        with Live(render(None, url), console=console or Console(), refresh_per_second=4) as view:
            while not until():
                time.sleep(interval_s)
                win.add(scrape(url))
                view.update(render(win.stats(), url))
    return win


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root; /metrics is appended")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--window", type=float, default=10.0, help="seconds the percentiles and rates cover")
    p.add_argument("--once", action="store_true", help="two scrapes --interval apart, print one frame, exit")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: at Ctrl-C)")
    p.add_argument("--out", help="write the last window's stats as JSON")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.window <= 0 or args.duration < 0:
        raise UserError("--interval and --window must be > 0, --duration >= 0")
    if args.once:
        win = Window(args.window)
        win.add(scrape(args.url))
        time.sleep(args.interval)
        win.add(scrape(args.url))
        Console().print(render(win.stats(), args.url))
    else:
        end = time.monotonic() + (args.duration or math.inf)
        win = watch(args.url, lambda: time.monotonic() + args.interval > end, args.interval, args.window)
    if args.out and win.stats() is not None:
        Path(args.out).write_text(json.dumps(win.stats().as_dict(), indent=2))


if __name__ == "__main__":
    main()
