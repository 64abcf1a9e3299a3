"""Monitoring end to end: our server under the harness's load, scraped by Prometheus, watched live.

    python -m optimization.monitoring.demo                        # smollm2-135m on this CPU, about a minute
    python -m optimization.monitoring.demo --request-rate 8 --num-prompts 64

Starts `python -m engines.ours.server` on a free loopback port, a real Prometheus scraping it every second, and
the harness (`python -m benchmarks run --backend openai`) sending ShareGPT requests (workload split) at
--request-rate; shows the live view while the load runs. At the end it sets what the server says about itself
(its /metrics through PromQL) beside what the harness measured at the client, request by request. They should
agree: counts exactly, mean TTFT up to the HTTP and tokenization time between client and engine, percentiles up to
the width of the server's histogram buckets (a server-side p99 is an interpolation inside one bucket).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.server import free_port, stop, wait_healthy
from core.errors import UserError, cli
from optimization.monitoring import live
from optimization.monitoring.prometheus import prometheus, value, wait_for_scrape

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def our_server(model: str, port: int, log: Path, extra: list[str] = (), timeout_s: float = 300.0):
    """engines/ours/server.py in its own process group on 127.0.0.1:`port` (plus `extra` options); yields its URL,
    always stops it."""
    cmd = [sys.executable, "-m", "engines.ours.server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout_s)
        yield url
    except UserError as e:
        raise UserError(f"{e}; its log: {log.read_text(errors='replace').strip()[-400:]}") from None
    finally:
        stop(proc)


def server_side(prom_url: str) -> dict[str, float]:
    """The server's own account of everything since it started, through PromQL (cumulative series, no rate())."""
    def q(p: float, name: str) -> float:
        return 1000 * value(f"histogram_quantile({p}, sum by (le) (llmip:{name}_seconds_bucket))", prom_url)

    def mean(name: str) -> float:
        return 1000 * value(f"sum(llmip:{name}_seconds_sum) / sum(llmip:{name}_seconds_count)", prom_url)

    return {"completed": value("sum(llmip:request_success_total)", prom_url),
            "total_output_tokens": value("sum(llmip:generation_tokens_total)", prom_url),
            "total_input_tokens": value("sum(llmip:prompt_tokens_total)", prom_url),
            "mean_ttft_ms": mean("time_to_first_token"), "median_ttft_ms": q(0.5, "time_to_first_token"),
            "p99_ttft_ms": q(0.99, "time_to_first_token"),
            "mean_tpot_ms": mean("time_per_output_token"), "median_tpot_ms": q(0.5, "time_per_output_token"),
            "p99_tpot_ms": q(0.99, "time_per_output_token"),
            "mean_e2el_ms": mean("e2e_request_latency"), "median_e2el_ms": q(0.5, "e2e_request_latency"),
            "p99_e2el_ms": q(0.99, "e2e_request_latency"),
            "num_preemptions": value("sum(llmip:num_preemptions_total)", prom_url)}


def comparison_table(client: dict, server: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("metric", "harness (client)", "server /metrics via Prometheus"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key, server_value in server.items():
        c = client.get(key)
        table.add_row(key, "-" if c is None else f"{c:.1f}",
                      "-" if server_value is None or math.isnan(server_value) else f"{server_value:.1f}")
    return table


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--request-rate", type=float, default=2.0, help="requests/s (Poisson arrivals)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32, help="tokens per request (ShareGPT prompts)")
    p.add_argument("--server-args", default="", help="options for engines.ours.server, e.g. "
                   "\"--max-num-seqs 4 --num-gpu-blocks-override 48\" to see queueing and preemptions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prometheus-port", type=int, default=0, help="default: a free port")
    p.add_argument("--out", help="write both sides as JSON")
    args = p.parse_args(argv)
    if args.request_rate <= 0 or args.num_prompts < 1 or args.output_len < 1:
        raise UserError("--request-rate must be > 0, --num-prompts and --output-len >= 1")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="llmip-monitoring-") as tmp:
        tmp = Path(tmp)
        console.print(f"starting our server ({args.model}) ...")
        with our_server(args.model, free_port(), tmp / "server.log", shlex.split(args.server_args)) as url, \
                prometheus([url.removeprefix("http://")], args.prometheus_port or free_port()) as prom_url:
            wait_for_scrape(prom_url)
            console.print(f"server {url}, Prometheus {prom_url}; load: {args.num_prompts} ShareGPT requests at "
                          f"{args.request_rate:g}/s")
            load_cmd = [sys.executable, "-m", "benchmarks", "run", "--backend", "openai", "--base-url", url,
                        "--model", args.model, "--dataset-name", "sharegpt", "--num-prompts", str(args.num_prompts),
                        "--output-len", str(args.output_len), "--request-rate", str(args.request_rate),
                        "--seed", str(args.seed), "--num-warmups", "0", "--no-progress",
                        "--out", str(tmp / "load.json")]
            with open(tmp / "load.log", "w") as log:
                load = subprocess.Popen(load_cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                try:
                    live.watch(url, lambda: load.poll() is not None, console=console)
                    console.print()
                finally:
                    if load.poll() is None:
                        load.terminate()
                    load.wait()
            if load.returncode != 0:
                raise UserError(f"the load exited with status {load.returncode}: "
                                f"{(tmp / 'load.log').read_text(errors='replace').strip()[-400:]}")
            wait_for_scrape(prom_url, after=time.time())  # the last tokens are in Prometheus too
            server = server_side(prom_url)
        client = json.loads((tmp / "load.json").read_text())
    console.print(comparison_table(client, server, f"{client.get('model_label', args.model)} on our server, "
                                   f"{args.num_prompts} requests at {args.request_rate:g}/s (ShareGPT workload "
                                   "split): the same run seen from both ends"))
    console.print(f"harness: output_throughput {client['output_throughput']:.1f} tok/s over "
                  f"{client['duration']:.1f} s, {client['failed']} failed "
                  f"{sorted({e for e in client['errors'] if e}) or ''}")
    if args.out:
        keys = list(server)
        Path(args.out).write_text(json.dumps({"client": {k: client.get(k) for k in keys + ["duration",
                                              "output_throughput", "failed"]},
                                              "server": {k: None if math.isnan(v) else v for k, v in server.items()},
                                              "model_label": client.get("model_label"),
                                              "date": client.get("date"), "machine": client.get("machine"),
                                              "client_errors": sorted({e for e in client["errors"] if e}),
                                              "command": "python -m optimization.monitoring.demo "
                                                         + shlex.join(argv if argv is not None else sys.argv[1:])},
                                             indent=2))


if __name__ == "__main__":
    main()
