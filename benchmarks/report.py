"""Human-readable views of result dicts: vLLM's terminal table for one run, a markdown table comparing many."""
from __future__ import annotations

WIDTH = 50


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def terminal_table(r: dict) -> str:
    """The run summary in the layout of `vllm bench serve`."""
    def line(label, value, digits=2):
        return f"{label:<40}{_fmt(value, digits):>10}"

    def section(title):
        return title.center(WIDTH, "-")

    rate = r.get("request_rate")
    out = [" Serving Benchmark Result ".center(WIDTH, "="),
           f"{r.get('backend')}  {r.get('model_label') or r.get('model')}",
           line("Request rate (req/s):", "inf" if rate in (None, float("inf"), "inf") else float(rate)),
           line("Max concurrency:", r.get("max_concurrency")),
           line("Successful requests:", r["completed"]),
           line("Failed requests:", r["failed"]),
           line("Benchmark duration (s):", r["duration"]),
           line("Total input tokens:", r["total_input_tokens"]),
           line("Total generated tokens:", r["total_output_tokens"]),
           line("Request throughput (req/s):", r["request_throughput"]),
           line("Request goodput (req/s):", r.get("request_goodput")),
           line("Output token throughput (tok/s):", r["output_throughput"]),
           line("Total token throughput (tok/s):", r["total_token_throughput"])]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        name = key.upper()
        out += [section(title)] + [line(f"{label} {name} (ms):", r.get(f"{p}_{key}_ms"))
                                   for p, label in (("mean", "Mean"), ("median", "Median"), ("std", "Std"),
                                                    ("p90", "P90"), ("p95", "P95"), ("p99", "P99"))]
    out += [section("Resources"), line("Peak memory (MB):", r.get("peak_memory_mb"), 0),
            line("KV-cache usage (peak fraction):", r.get("kv_cache_usage")),
            line("Cost per 1M output tokens ($):", r.get("cost_per_million_output_tokens")), "=" * WIDTH]
    if r["failed"]:
        errors = [e for e in r.get("errors", []) if e]
        out += [f"{r['failed']} failed requests; first errors:"] + [f"  - {e[:150]}" for e in errors[:5]]
    return "\n".join(out)


COLUMNS = [("run", "run"), ("request_rate", "rate (req/s)"), ("max_concurrency", "concurrency"),
           ("completed", "ok"), ("failed", "failed"), ("request_throughput", "req/s"),
           ("output_throughput", "output tok/s"), ("mean_ttft_ms", "mean TTFT ms"),
           ("median_ttft_ms", "median TTFT ms"), ("p99_ttft_ms", "p99 TTFT ms"), ("mean_tpot_ms", "mean TPOT ms"),
           ("p99_tpot_ms", "p99 TPOT ms"), ("mean_itl_ms", "mean ITL ms"), ("mean_e2el_ms", "mean E2EL ms"),
           ("request_goodput", "goodput req/s"), ("peak_memory_mb", "peak MB")]


def markdown_table(results: list[dict]) -> str:
    """One row per result file, the columns that compare backends and load points."""
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_fmt({**r, "run": r.get("label") or r.get("backend")}.get(k),
                                   0 if k == "peak_memory_mb" else 2) for k, _ in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def markdown_report(results: list[dict], title: str = "Benchmark report", plots: list[str] = ()) -> str:
    """A markdown page: the comparison table, the machine and workload it came from, and the plots."""
    first = results[0]
    m = first.get("machine", {})
    lines = [f"# {title}", "",
             f"Model: {first.get('model_label') or first.get('model')}. Workload: {first.get('dataset_name')}, "
             f"{first.get('num_prompts')} prompts, seed {first.get('seed')}. Date: {first.get('date')}.",
             f"Machine: {m.get('processor')}, {m.get('cpu_count')} CPUs, {m.get('memory_gb')} GiB, "
             f"GPU: {m.get('gpu') or 'none'}; {m.get('platform')}; versions {m.get('versions')}.",
             "Timings on a shared machine are noisy: compare rows from one report, not across machines.", "",
             markdown_table(results), ""]
    if first.get("command"):
        lines += ["Command:", "", f"    {first['command']}", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
