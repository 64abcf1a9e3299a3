"""The book's production case study, measured: each step adds one optimization, every step serves the same
ShareGPT workload at the same request rates, and the table shows each step's factor over the baseline.

Rates: `inf` (every request at t=0: the throughput a step can sustain) and the baseline's saturation rate (its own
throughput at `inf`, as Poisson arrivals): the book compares P99 latency there. The baseline and the final step of
our engine also run at a few multiples of that rate, for the latency-throughput curves.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import platform
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import UserError
from core.loading import find_model_dir, load_tokenizer, model_config
from core.measure import run_isolated
from core.registry import REGISTRY

from benchmarks.backends.base import RequestSpec
from benchmarks.workloads import build_workload, load_workload, save_workload
from optimization.steps import DESCRIPTIONS, StepConfig, run_step

FINAL_CANDIDATES = ("kv-fp8", "tuned-batching")  # the last step of our own stack that runs; vLLM is a comparison
SAME_WEIGHTS_AS_AWQ = ("paged-continuous", "tuned-batching", "kv-fp8", "speculative")  # awq-int4's saved INT4 model


def final_step(steps) -> str | None:
    """The final step among `steps` (names, in any order): the one whose curve and factors the report leads with."""
    return next((s for s in FINAL_CANDIDATES if s in steps), None)


def make_workload(model: str, num_prompts: int, max_output_len: int, max_input_len: int, seed: int,
                  random_weights: bool = False, workload_file: Path | None = None) -> list[RequestSpec]:
    """ShareGPT prompts and reply lengths from the workload split, replies capped at max_output_len tokens and
    generated to exactly that length (ignore_eos), so every step produces the same number of tokens.

    Lengths are counted with the model's tokenizer (the default model's for random weights). `workload_file` saves the
    workload as JSON the first time and reads it back after, so a machine without the ShareGPT package (a lent GPU)
    serves the same requests. Random weights get random prompt ids of the same lengths: text means nothing to them.
    """
    if workload_file is not None and workload_file.exists():
        specs = load_workload(workload_file, num_prompts)
    else:
        spec = REGISTRY.get(model)
        real_tokenizer = not random_weights and not (spec and spec.random_only)
        tokenizer = load_tokenizer(find_model_dir(model) if real_tokenizer else None)
        specs = build_workload(tokenizer, "sharegpt", num_prompts, seed, max_input_len=max_input_len,
                               ignore_eos=True, sharegpt_split="workload")
        if workload_file is not None:
            save_workload(workload_file, specs)
    for s in specs:
        s.output_len = min(s.output_len, max_output_len)
    if random_weights:
        vocab = model_config(model, random_weights=True).vocab_size
        rng = torch.Generator().manual_seed(seed)
        for s in specs:
            s.prompt_ids = torch.randint(0, vocab, (s.prompt_len,), generator=rng).tolist()
    return specs


def run_case_study(cfg: StepConfig, steps: list[str], out_dir: Path, curve: list[float]) -> dict:
    """Every step in a process of its own. The baseline runs first: its throughput at rate inf is the saturation
    rate every later step is also measured at. The baseline and the final step add their latency-throughput curves
    (`curve`: multiples of each one's own throughput at rate inf, so each curve shows its own knee). The report is
    written again after every step, so a run cut short (a time limit, a crash in a later step) keeps the steps it
    finished; until the last step, its "steps_pending" lists the rest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, quantized_path=out_dir / "int4_model.pt")
    curve = tuple(sorted(set(curve) | {1.0}))  # 1.0: the baseline at its own saturation rate, for the P99 column
    results: dict[str, dict] = {}
    bar = tqdm(total=len(steps), desc="case study", unit="step")

    def run(name: str, step_cfg: StepConfig) -> dict:
        bar.set_postfix_str(f"{name} @ {', '.join(_rate(r) for r in step_cfg.rates)}"
                            + (f" + {len(step_cfg.curve)}-point curve" if step_cfg.curve else ""))
        result, rss = run_isolated(run_step, name, step_cfg)
        result["peak_rss_mb"] = rss
        bar.update(1)
        return result

    results["baseline"] = base = run("baseline", replace(cfg, rates=[math.inf], curve=curve))
    saturation = base["runs"][0]["summary"]["request_throughput"]
    if not saturation:  # every request failed: no rate to compare the steps at
        raise UserError(f"the baseline completed no request; first error: {base['runs'][0]['errors'][:1]}")

    def report(pending: list[str]) -> dict:
        return {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                "config": {k: v for k, v in asdict(cfg).items() if k not in ("specs", "quantized_path")},
                "workload": {"dataset": "sharegpt (workload split)", "num_prompts": len(cfg.specs),
                             "mean_prompt_len": sum(s.prompt_len for s in cfg.specs) / len(cfg.specs),
                             "mean_output_len": sum(s.output_len for s in cfg.specs) / len(cfg.specs),
                             "latency_prompts": cfg.latency_prompts or len(cfg.specs)},
                "saturation_rate": saturation, "steps": results, "steps_pending": pending}

    later = [name for name in steps if name != "baseline"]
    for i, name in enumerate(later):
        write_report(report(later[i:]), out_dir)
        step_cfg = replace(cfg, rates=[math.inf, saturation], curve=curve if name == final_step(steps) else ())
        awq_ppl = results.get("awq-int4", {}).get("perplexity")
        reuse = name in SAME_WEIGHTS_AS_AWQ and awq_ppl is not None  # the same INT4 file: the same perplexity
        results[name] = run(name, replace(step_cfg, ppl_tokens=0) if reuse else step_cfg)
        if reuse and "skipped" not in results[name]:
            results[name].update(perplexity=awq_ppl, perplexity_of="awq-int4")
    bar.close()
    cfg.quantized_path.unlink(missing_ok=True)
    return report([])


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _rate(r: float) -> str:
    return "inf" if math.isinf(r) else f"{r:.2f}/s"


def run_at(result: dict, rate: float) -> dict | None:
    for run in result.get("runs", []):
        if run["request_rate"] == rate or (math.isinf(rate) and math.isinf(run["request_rate"])):
            return run["summary"]
    return None


def identical_greedy(result: dict, reference: dict) -> str:
    """How many requests produced exactly the reference step's text at rate inf (steps that must not change it)."""
    a, b = result["runs"][0]["texts"], reference["runs"][0]["texts"]
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)} identical"


def table_rows(report: dict) -> list[dict]:
    """One row per step with the book's columns and each step's factor over the baseline."""
    steps, sat = report["steps"], report["saturation_rate"]
    base = steps["baseline"]
    b_inf, b_sat = run_at(base, math.inf), run_at(base, sat)
    rows = []
    for name, res in steps.items():
        if "skipped" in res:
            continue
        inf, at_sat = run_at(res, math.inf), run_at(res, sat)
        quality = f"ppl {res['perplexity']:.3f}" if res.get("perplexity") else ""
        if res.get("perplexity_of"):
            quality += f" ({res['perplexity_of']}'s weights)"
        if name in SAME_WEIGHTS_AS_AWQ and "awq-int4" in steps:
            quality = (quality + "; " if quality else "") + identical_greedy(res, steps["awq-int4"]) + " vs awq-int4"
        memory = res["gpu_peak_mb"] if res.get("gpu_peak_mb") and not math.isnan(res["gpu_peak_mb"]) else \
            res["peak_rss_mb"]
        rows.append({
            "step": name, "what": DESCRIPTIONS[name], "notes": res.get("notes", ""),
            "qps": inf["request_throughput"], "qps_x": inf["request_throughput"] / b_inf["request_throughput"],
            "output_tok_s": inf["output_throughput"],
            "p50_ms": at_sat["p50_e2el_ms"] if at_sat else None,
            "p99_ms": at_sat["p99_e2el_ms"] if at_sat else None,
            "p99_x": b_sat["p99_e2el_ms"] / at_sat["p99_e2el_ms"] if at_sat else None,
            "ttft_ms": at_sat["median_ttft_ms"] if at_sat else None,
            "tpot_ms": at_sat["median_tpot_ms"] if at_sat else None,
            "weights_mb": res.get("weights_mb"),
            "weights_x": base["weights_mb"] / res["weights_mb"] if res.get("weights_mb") else None,
            "peak_mem_mb": memory, "quality": quality,
            "cost": inf["cost_per_million_output_tokens"],
            "cost_x": b_inf["cost_per_million_output_tokens"] / inf["cost_per_million_output_tokens"],
        })
    return rows


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown_table(rows: list[dict], sat: float) -> str:
    head = ("| step | QPS (x) | out tok/s | P50 / P99 latency ms @ {:.2f} req/s (P99 x) | TTFT / TPOT ms | "
            "weights MB (x) | peak mem MB | quality | $ per 1M out tok (x) |").format(sat)
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['qps']:.2f} ({r['qps_x']:.1f}x) | {r['output_tok_s']:.0f} | "
            f"{_f(r['p50_ms'], '.0f')} / {_f(r['p99_ms'], '.0f')} ({_f(r['p99_x'], '.1f')}x) | "
            f"{_f(r['ttft_ms'], '.0f')} / {_f(r['tpot_ms'], '.1f')} | "
            f"{_f(r['weights_mb'], '.0f')} ({_f(r['weights_x'], '.1f')}x) | {r['peak_mem_mb']:.0f} | "
            f"{r['quality']} | {_f(r['cost'], '.2f')} ({r['cost_x']:.1f}x) |")
    return "\n".join(lines)


def plots(report: dict, rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["step"] for r in rows]
    axes[0].bar(names, [r["qps"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("requests/s (all requests at t=0)")
    axes[0].set_title("Throughput per step")
    axes[1].bar(names, [r["p99_ms"] or 0 for r in rows], color="tab:red")
    axes[1].set_ylabel("P99 end-to-end latency (ms)")
    axes[1].set_title(f"P99 latency at {report['saturation_rate']:.2f} req/s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    paths.append(out_dir / "steps.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("baseline", final_step(report["steps"])):
        res = report["steps"].get(name)
        if not res:
            continue
        pts = sorted((r["summary"]["request_throughput"], r["summary"]["p99_e2el_ms"])
                     for r in res["runs"] if not math.isinf(r["request_rate"]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("achieved throughput (requests/s)")
    ax.set_ylabel("P99 end-to-end latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency vs throughput")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "latency_throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def slowest_turns(report: dict) -> str:
    """One line per run of our engine: its slowest loop turn and what happened during it (online.py), where to look
    first when a P99 is far above the P50."""
    lines = []
    for name, res in report["steps"].items():
        for run in res.get("runs", []):
            stalls = run.get("stalls")
            if not stalls or not stalls["slowest_turns"]:
                continue
            t = stalls["slowest_turns"][0]
            lines.append(f"- {name} @ {_rate(run['request_rate'])}: {t['ms']:.0f} ms at {t['at_s']:.1f} s (step "
                         f"{t['step_ms']:.0f} ms, {t['running']} running, {t['waiting']} waiting; garbage collection "
                         f"{t['gc_ms']:.0f} ms; Triton compiled: {', '.join(t['triton_compiles']) or 'nothing'}); "
                         f"run: {stalls['cuda_mallocs']} cudaMalloc, {stalls['alloc_retries']} allocator retries")
    return "Slowest turn of our engine's loop per run:\n" + "\n".join(lines) + "\n\n" if lines else ""


def latency_subset(workload: dict) -> str:
    n = workload.get("latency_prompts", workload["num_prompts"])
    return f", over the first {n} requests" if n < workload["num_prompts"] else ""


def write_report(report: dict, out_dir: Path) -> str:
    rows = table_rows(report)
    table = markdown_table(rows, report["saturation_rate"])
    pngs = plots(report, rows, out_dir)
    labels = "\n".join(f"- **{name}**: {res.get('label', '')} {res.get('notes', '') or res.get('skipped', '')}"
                       for name, res in report["steps"].items())
    w, m = report["workload"], report["machine"]
    pending = (f"**Partial report**: not run (yet): {', '.join(report['steps_pending'])}.\n\n"
               if report.get("steps_pending") else "")
    text = (f"# Case study: {report['config']['model']}\n\n{report['date']} on {m.get('gpu', 'CPU')} "
            f"({m['platform']}, torch {m['torch']}).\n\nWorkload: {w['num_prompts']} ShareGPT requests "
            f"(workload split), mean prompt {w['mean_prompt_len']:.0f} tokens, mean output {w['mean_output_len']:.0f} "
            f"tokens (capped, ignore_eos). QPS and cost at rate inf; latency at the baseline's saturation rate, "
            f"Poisson arrivals{latency_subset(w)}. Cost at ${report['config']['gpu_hour_price']:.2f} per "
            f"machine-hour.\n\n{table}\n\n"
            f"Steps:\n{labels}\n\n{slowest_turns(report)}{pending}"
            + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    (out_dir / "report.md").write_text(text)
    (out_dir / "case_study.json").write_text(json.dumps({**report, "table": rows}, indent=2))
    return table
