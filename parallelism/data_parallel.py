"""Data parallelism measured: one replica, then N replicas behind the router with each policy, same workload.

Starts N servers of our engine once (one core's worth of threads each on a CPU, one GPU each on CUDA), then for
each configuration starts the router in front of the first n of them and drives it with the benchmark harness
(`benchmarks.cli`, the same client as `python -m benchmarks run --backend openai`). Requests arrive as a Poisson
process with output lengths spread widely, the case where the routing policy matters.

    python -m parallelism.data_parallel                                   # CPU: 2 replicas of the default model
    python -m parallelism.data_parallel --device cuda --num-replicas 8 --num-prompts 1000 --request-rate 40
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

import httpx

from benchmarks.cli import add_run_args, run
from core.errors import UserError, cli
from parallelism.comm import free_port
from parallelism.router import POLICIES, replicas, wait_healthy
from parallelism.tensor_parallel import table


@contextmanager
def router_process(urls: list[str], policy: str) -> Iterator[str]:
    """`python -m parallelism.router` in front of `urls` on a free port; yields its URL, stops it after."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "parallelism.router", "--policy", policy, "--port", str(port),
                             "--replica-urls", *urls], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def drive(url: str, args: argparse.Namespace, label: str, result_dir: str) -> dict:
    """One harness run against `url`; returns its result dict (vLLM's field names)."""
    parser = argparse.ArgumentParser()
    add_run_args(parser)
    harness = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--model", args.model, "--dataset-name", "random",
        "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.random_input_len),
        "--random-output-len", str(args.random_output_len), "--random-range-ratio", str(args.random_range_ratio),
        "--request-rate", str(args.request_rate), "--seed", str(args.seed), "--num-warmups", "2",
        "--result-dir", result_dir, "--label", label, "--no-progress"])
    return run(harness)[0]


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: replica i on GPU i")
    parser.add_argument("--num-replicas", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="per replica")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--random-input-len", type=int, default=64)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=0.9, help="lengths spread +-90% of the mean")
    parser.add_argument("--request-rate", type=float, default=2.0, help="req/s, Poisson")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replica-args", default="", help="extra options for every engine server, one string")
    parser.add_argument("--out", help="write the table's rows as JSON")
    args = parser.parse_args(argv)
    if args.num_replicas < 2:
        raise UserError("--num-replicas must be >= 2 (one replica is the baseline every run includes)")

    server_args = ["--model", args.model, "--max-num-seqs", str(args.max_num_seqs),
                   "--max-model-len", str(args.max_model_len), *args.replica_args.split()]
    configs = [(1, "round-robin")] + [(args.num_replicas, p) for p in POLICIES]
    rows, out = [], []
    with tempfile.TemporaryDirectory() as tmp, \
            replicas(args.num_replicas, free_port(), server_args, args.device, log_dir=tmp) as urls:
        for n, policy in configs:
            print(f"\n== {n} replica(s), {policy} ==", flush=True)
            with router_process(urls[:n], policy) as url:
                result = drive(url, args, f"dp{n}-{policy}", tmp)
                spread = httpx.get(url + "/router/stats").json()["replicas"]
            served = "/".join(str(r["served"]) for r in spread)
            rows.append((n, policy if n > 1 else "-", f"{result['request_throughput']:.2f}",
                         f"{result['output_throughput']:.1f}", f"{result['median_ttft_ms']:.0f}",
                         f"{result['p99_ttft_ms']:.0f}", f"{result['median_e2el_ms']:.0f}",
                         f"{result['p99_e2el_ms']:.0f}", served))
            out.append({"replicas": n, "policy": policy, "served_per_replica": [r["served"] for r in spread],
                        **{k: result[k] for k in ("request_throughput", "output_throughput", "median_ttft_ms",
                                                  "p99_ttft_ms", "median_e2el_ms", "p99_e2el_ms", "completed")}})
    print(f"\n{result.get('model_label', args.model)} on {args.device}, {args.num_prompts} requests (random, "
          f"{args.random_input_len} in / {args.random_output_len} out tokens +-{args.random_range_ratio:.0%}), "
          f"Poisson {args.request_rate} req/s; served counts include 2 warm-up requests")
    print(table(rows, ("replicas", "policy", "req/s", "out_tok/s", "median_ttft_ms", "p99_ttft_ms",
                       "median_e2el_ms", "p99_e2el_ms", "served")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "device": args.device, "args": vars(args), "runs": out}, f, indent=2)


if __name__ == "__main__":
    main()
