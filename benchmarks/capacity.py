"""How fast can the harness itself go? Drive the instant stub server at rising request rates and report, for each,
the rate achieved and how late requests left compared with their planned Poisson arrival times.

A rate counts as sustained when the achieved request throughput is at least 95% of the target and the median send
lag is under 5 ms: past that point the client, not the server, would shape the numbers. Run on the same machine
as the benchmarks it vouches for; the stub runs in its own process.
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from benchmarks.arrivals import arrival_times
from benchmarks.backends.base import RequestSpec
from benchmarks.backends.openai_http import OpenAIBackend
from benchmarks.load import run_load
from benchmarks.results import machine_info, write_atomic
from benchmarks.server import stub_server


def measure(url: str, rate: float, num_prompts: int, tokens: int, seed: int = 0) -> dict:
    """One load point against the stub at `url`: achieved rate, send lag (ms) and failures."""
    specs = [RequestSpec("hello", 1, tokens)] * num_prompts
    arrivals = arrival_times(num_prompts, rate, 1.0, seed)
    records, duration, t0 = run_load(OpenAIBackend(url, "stub", timeout_s=60), specs, arrivals, progress=False)
    starts = np.array([r.start_s for r in records])
    lag_ms = (starts - t0 - np.array(arrivals)) * 1e3
    ok = sum(r.success for r in records)
    achieved = ok / duration
    return {"target_rate": rate, "achieved_request_rate": achieved, "duration": duration, "completed": ok,
            "failed": len(records) - ok, "median_send_lag_ms": float(np.median(lag_ms)),
            "p99_send_lag_ms": float(np.percentile(lag_ms, 99)),
            "mean_ttft_ms": float(np.mean([r.ttft_s for r in records if r.success] or [0])) * 1e3,
            "sustained": bool(math.isinf(rate) or (achieved >= 0.95 * rate and np.median(lag_ms) < 5.0))}


def capacity(args: argparse.Namespace) -> list[dict]:
    rates = [float(r) for r in args.request_rate.split(",")]
    rows = []
    with stub_server(tokens=args.tokens) as (url, _pid):
        for rate in rates:
            rows.append(measure(url, rate, args.num_prompts, args.tokens))
    print(f"{'target req/s':>12} {'achieved':>9} {'median lag ms':>14} {'p99 lag ms':>11} {'failed':>7} sustained")
    for r in rows:
        print(f"{r['target_rate']:>12g} {r['achieved_request_rate']:>9.0f} {r['median_send_lag_ms']:>14.2f} "
              f"{r['p99_send_lag_ms']:>11.2f} {r['failed']:>7} {r['sustained']}")
    finite = [r["target_rate"] for r in rows if r["sustained"] and not math.isinf(r["target_rate"])]
    best = max(finite, default=None)
    peak = max(r["achieved_request_rate"] for r in rows)
    print(f"highest sustained rate: {best} req/s; peak achieved {peak:.0f} req/s with {args.tokens} tokens per "
          f"request ({args.num_prompts} requests per point; shared machine, noisy)")
    if args.out:
        import json
        write_atomic(args.out, json.dumps({"points": rows, "highest_sustained_rate": best,
                                           "peak_achieved_rate": peak, "tokens_per_request": args.tokens,
                                           "machine": machine_info()}, indent=1))
    return rows
