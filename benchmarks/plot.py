"""PNG plots of result files: latency CDFs, TTFT/TPOT against request rate, throughput against concurrency, and
output throughput per run. A plot is written only when the results hold what it needs (e.g. two or more rates)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def run_name(r: dict) -> str:
    rate = r.get("request_rate")
    rate_s = "inf" if rate is None or math.isinf(float(rate)) else f"{float(rate):g}"
    conc = f", conc {r['max_concurrency']}" if r.get("max_concurrency") else ""
    return f"{r.get('label') or r.get('backend')} @ {rate_s} req/s{conc}"


def _per_request_ms(r: dict) -> dict[str, np.ndarray]:
    ok = [not e for e in r["errors"]]
    ttft = np.array([t for t, s in zip(r["ttfts"], ok) if s]) * 1e3
    e2el = np.array([t for t, s in zip(r["latencies"], ok) if s]) * 1e3
    n = np.array([o for o, s in zip(r["output_lens"], ok) if s])
    multi = n > 1
    tpot = (e2el[multi] - ttft[multi]) / (n[multi] - 1)
    return {"TTFT": ttft, "TPOT": tpot, "E2EL": e2el}


def latency_cdfs(results: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        for ax, (name, values) in zip(axes, _per_request_ms(r).items()):
            if len(values):
                v = np.sort(values)
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=run_name(r))
    for ax, name in zip(axes, ("TTFT", "TPOT", "E2EL")):
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _groups(results: list[dict], key: str) -> dict[str, list[dict]]:
    by = defaultdict(list)
    for r in results:
        by[r.get("label") or r.get("backend")].append(r)
    return {k: sorted(v, key=lambda r: float(r.get(key) or math.inf)) for k, v in by.items()}


def latency_vs_rate(results: list[dict], path: Path) -> Path | None:
    groups = {k: v for k, v in _groups(results, "request_rate").items() if len(v) > 1}
    if not groups:
        return None
    finite = [float(r["request_rate"]) for g in groups.values() for r in g if not math.isinf(float(r["request_rate"]))]
    inf_x = 2 * max(finite, default=1.0)  # "inf" drawn one octave past the highest finite rate
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, runs in groups.items():
        x = [inf_x if math.isinf(float(r["request_rate"])) else float(r["request_rate"]) for r in runs]
        for ax, metric in zip(axes, ("ttft", "tpot")):
            ax.plot(x, [r[f"mean_{metric}_ms"] for r in runs], "o-", label=f"{name} mean")
            ax.plot(x, [r[f"p99_{metric}_ms"] for r in runs], "x--", label=f"{name} p99")
    for ax, metric in zip(axes, ("TTFT", "TPOT")):
        ax.set(xlabel="request rate (req/s; rightmost = inf)", ylabel=f"{metric} (ms)", title=f"{metric} vs load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_concurrency(results: list[dict], path: Path) -> Path | None:
    groups = {k: [r for r in v if r.get("max_concurrency")] for k, v in _groups(results, "max_concurrency").items()}
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, runs in groups.items():
        ax.plot([r["max_concurrency"] for r in runs], [r["output_throughput"] for r in runs], "o-", label=name)
    ax.set(xlabel="max concurrency", ylabel="output tokens/s", title="Throughput vs concurrency", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_bars(results: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 4.2))
    names = [run_name(r) for r in results]
    ax.bar(range(len(results)), [r["output_throughput"] for r in results])
    ax.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="output tokens/s", title="Output throughput per run")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(results: list[dict], out_dir: Path) -> list[Path]:
    """Every plot the results support, as PNGs in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [latency_cdfs(results, out_dir / "latency_cdf.png"),
             latency_vs_rate(results, out_dir / "latency_vs_rate.png"),
             throughput_vs_concurrency(results, out_dir / "throughput_vs_concurrency.png"),
             throughput_bars(results, out_dir / "throughput.png")]
    return [p for p in paths if p is not None]
