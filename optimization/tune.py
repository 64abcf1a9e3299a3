"""Batching tuned for a latency SLO: the highest request rate each engine setting serves within it, and the winner.

Throughput at rate inf is the wrong target for a service: a bigger batch raises it while every user waits longer.
The question a capacity planner asks is "how many requests per second can this machine take while (almost) every
request still meets TTFT < 100 ms and inter-token time < 50 ms?" (the book's SLO; `--goodput` changes it). For each
(max_num_seqs, max_num_batched_tokens) setting this script finds that rate:

1. serve the workload at rate inf: the setting's saturation throughput, an upper bound;
2. step the Poisson rate down from there by `--step` until at least `--attainment` of the requests meet the SLO;
3. bisect between that rate and the failing one above it.

    python -m optimization.tune                                   # default model, CPU, a few minutes
    python -m optimization.tune --goodput ttft:500 tpot:100        # a looser SLO for slow machines
    python -m optimization.tune --model llama2-7b --random-weights --device cuda --num-prompts 256
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tqdm.auto import tqdm

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.loading import load_model

from benchmarks.arrivals import arrival_times
from benchmarks.backends.base import RequestRecord, RequestSpec
from benchmarks.metrics import parse_goodput, summarize
from optimization.online import serve_continuous


def attainment(records: list[RequestRecord], slos_ms: dict[str, float]) -> float:
    """Fraction of all requests (failed ones count as misses) that meet every SLO."""
    good = sum(r.success and all(getattr(r, f"{k}_s") * 1e3 <= v for k, v in slos_ms.items()) for r in records)
    return good / len(records)


def highest_rate(make_engine, specs: list[RequestSpec], slos_ms: dict[str, float], target: float,
                 step: float = 0.7, bisections: int = 2, max_tries: int = 8, seed: int = 0) -> dict:
    """Search the highest Poisson rate whose attainment >= target. Returns the runs tried and the best one."""
    tried = []

    def serve(rate: float) -> dict:
        records, duration = serve_continuous(make_engine(), specs, arrival_times(len(specs), rate, seed=seed))
        run = {"request_rate": rate, "attainment": attainment(records, slos_ms),
               "summary": summarize(records, duration, slos_ms)}
        tried.append(run)
        return run

    saturation = serve(math.inf)["summary"]["request_throughput"]
    ok, fail = None, saturation
    rate = saturation * step
    for _ in range(max_tries):
        run = serve(rate)
        if run["attainment"] >= target:
            ok = run
            break
        fail, rate = rate, rate * step
    if ok is not None:
        for _ in range(bisections):
            run = serve(math.sqrt(ok["request_rate"] * fail))  # geometric midpoint: rates span orders of magnitude
            if run["attainment"] >= target:
                ok = run
            else:
                fail = run["request_rate"]
    return {"saturation_rate": saturation, "best": ok, "tried": tried}


def parse_settings(text: str, option: str = "--settings") -> list[tuple[int, int]]:
    """'8:512,32:2048' -> [(8, 512), (32, 2048)] as (max_num_seqs, max_num_batched_tokens)."""
    try:
        settings = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        settings = []
    if not settings or any(len(s) != 2 or min(s) < 1 for s in settings):
        raise UserError(f"{option} {text!r}: expected MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS,... e.g. 8:512,32:2048")
    return settings


def table(rows: list[dict], slos_ms: dict[str, float], target: float) -> str:
    slo = ", ".join(f"{k} <= {v:g} ms" for k, v in slos_ms.items())
    lines = [f"Highest request rate with >= {target:.0%} of requests meeting {slo}",
             "| max_num_seqs | max_num_batched_tokens | saturation req/s | best rate req/s | attainment | "
             "goodput req/s | p99 TTFT ms | p99 TPOT ms |", "|" + "---|" * 8]
    for r in rows:
        b = r["best"]
        if b is None:
            lines.append(f"| {r['max_num_seqs']} | {r['max_num_batched_tokens']} | {r['saturation_rate']:.2f} | "
                         "none met the SLO | - | - | - | - |")
            continue
        s = b["summary"]
        lines.append(f"| {r['max_num_seqs']} | {r['max_num_batched_tokens']} | {r['saturation_rate']:.2f} | "
                     f"{b['request_rate']:.2f} | {b['attainment']:.0%} | {s['request_goodput']:.2f} | "
                     f"{s['p99_ttft_ms']:.0f} | {s['p99_tpot_ms']:.1f} |")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    from engines.ours import LLM
    from optimization.case_study import make_workload

    parser = argparse.ArgumentParser(prog="python -m optimization.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--settings", default="4:256,8:512,16:1024", help="MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS,...")
    parser.add_argument("--goodput", nargs="+", default=["ttft:100", "tpot:50"], help="SLOs in ms (vLLM's syntax)")
    parser.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet the SLO")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-output-len", type=int, default=32)
    parser.add_argument("--max-input-len", type=int, default=256)
    parser.add_argument("--workload-file", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/tune.json"))
    args = parser.parse_args(argv)
    slos = parse_goodput(args.goodput)
    if not 0 < args.attainment <= 1:
        raise UserError("--attainment must be in (0, 1]")
    settings = parse_settings(args.settings)
    specs = make_workload(args.model, args.num_prompts, args.max_output_len, args.max_input_len, args.seed,
                          args.random_weights, args.workload_file)
    lm = load_model(args.model, args.device, None if args.dtype == "auto" else args.dtype, args.random_weights)
    max_len = max(s.prompt_len + s.output_len for s in specs) + 16
    rows = []
    for seqs, budget in tqdm(settings, desc="settings"):
        result = highest_rate(lambda: LLM(lm, max_num_seqs=seqs, max_num_batched_tokens=budget,
                                          max_model_len=max_len), specs, slos, args.attainment, seed=args.seed)
        rows.append({"max_num_seqs": seqs, "max_num_batched_tokens": budget, **result})
    print(f"{lm.label}, {len(specs)} ShareGPT requests (workload split)")
    print(table(rows, slos, args.attainment))
    found = [r for r in rows if r["best"] is not None]
    if found:
        win = max(found, key=lambda r: r["best"]["request_rate"])
        print(f"\nbest: max_num_seqs={win['max_num_seqs']}, max_num_batched_tokens={win['max_num_batched_tokens']} "
              f"at {win['best']['request_rate']:.2f} req/s")
    else:
        print("\nno setting met the SLO at any rate tried: loosen --goodput or lower --attainment")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": lm.label, "slos_ms": slos, "attainment": args.attainment,
                                    "settings": rows}, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
