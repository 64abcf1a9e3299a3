"""The `run` command: build a workload, drive a backend at each load point of a sweep, print and save results."""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from core.errors import UserError

from benchmarks.arrivals import arrival_times
from benchmarks.backends import BACKENDS, make_backend
from benchmarks.load import run_load
from benchmarks.metrics import parse_goodput, summarize
from benchmarks.report import terminal_table
from benchmarks.results import build_result, save_result
from benchmarks.workloads import DATASETS, build_workload, load_workload

DEFAULT_RESULT_DIR = Path("results/benchmarks")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",")]  # float("inf") parses "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 1,2,4,inf, got {text!r}") from None
    if any(r <= 0 or math.isnan(r) for r in rates):
        raise argparse.ArgumentTypeError("request rates must be positive (or inf)")
    return rates


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected concurrencies like 1,4,16, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("--max-concurrency values must be at least 1")
    return values


def add_run_args(p: argparse.ArgumentParser) -> None:
    """vLLM's `bench serve` option names where the concept is the same."""
    b = p.add_argument_group("backend")
    b.add_argument("--backend", default="openai", choices=list(BACKENDS))
    b.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (openai backends)")
    b.add_argument("--endpoint", default=None, help="default /v1/completions (openai), /v1/chat/completions (chat)")
    b.add_argument("--model", default="smollm2-135m", help="registry name or folder; the served name for openai")
    b.add_argument("--served-model-name", default=None, help="model name to send, if not --model")
    b.add_argument("--tokenizer", default=None, help="tokenizer for the workload (default: --model)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default=None)
    b.add_argument("--max-batch-size", type=int, default=8, help="static batch size (hf, ours)")
    b.add_argument("--max-model-len", type=int, default=2048, help="vllm offline")
    b.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm offline: GPUs per model")
    b.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (openai)")
    b.add_argument("--server-pid", type=int, default=None, help="sample this server process tree's RSS (openai)")
    b.add_argument("--server-metrics", action="store_true", help="poll the server's /metrics for KV-cache usage")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset-name", default="random", choices=DATASETS)
    w.add_argument("--workload-file", type=Path, default=None,
                   help="serve the requests saved in this JSON (benchmarks.workloads.save_workload, or the case "
                        "study's --workload-file) instead of building them: no dataset or tokenizer needed")
    w.add_argument("--num-prompts", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--random-input-len", type=int, default=128)
    w.add_argument("--random-output-len", type=int, default=32)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--output-len", type=int, default=None, help="output tokens for every request (any dataset)")
    w.add_argument("--max-input-len", type=int, default=1024, help="skip longer ShareGPT prompts")
    w.add_argument("--sharegpt-split", default="evaluation")
    w.add_argument("--prefix-len", type=int, default=256)
    w.add_argument("--num-prefixes", type=int, default=1)
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="generate exactly the output length (default: on for synthetic datasets, off for sharegpt)")
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=_rates, default=[math.inf], help="req/s, a list sweeps: 1,2,4,inf")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    g.add_argument("--max-concurrency", type=_concurrencies, default=[None], help="cap in flight; a list sweeps")
    g.add_argument("--num-warmups", type=int, default=0, help="untimed requests sent first")
    m = p.add_argument_group("metrics and output")
    m.add_argument("--goodput", nargs="+", default=None, help="SLOs in ms, default ttft:100 tpot:50")
    m.add_argument("--gpu-hour-price", type=float, default=None, help="$ per GPU-hour, for cost per 1M tokens")
    m.add_argument("--num-gpus", type=int, default=1)
    m.add_argument("--result-dir", type=Path, default=DEFAULT_RESULT_DIR)
    m.add_argument("--out", type=Path, default=None, help="result JSON path (one load point) or name prefix")
    m.add_argument("--label", default=None, help="name of this run in files and reports (default: backend)")
    m.add_argument("--no-progress", action="store_true")


def _point_path(args, rate: float, concurrency: int | None, sweep: bool) -> Path:
    if args.out and not sweep:
        return args.out
    stem = f"{args.label or args.backend}-rate{'inf' if math.isinf(rate) else f'{rate:g}'}" + (
        f"-conc{concurrency}" if concurrency else "")
    if args.out:
        return args.out.parent / f"{args.out.stem}-{stem}.json"
    return args.result_dir / f"{stem}.json"


def _tokenizer(args):
    from core.loading import find_model_dir, load_tokenizer
    try:
        return load_tokenizer(find_model_dir(args.tokenizer or args.model))
    except UserError as e:
        raise UserError(f"{e} (pass --tokenizer NAME_OR_FOLDER for the workload)") from None


def run(args: argparse.Namespace) -> list[dict]:
    """Every load point of the sweep; returns the result dicts (also saved)."""
    if args.num_prompts < 1 or args.num_warmups < 0 or args.num_gpus < 1 or args.max_batch_size < 1:
        raise UserError("--num-prompts, --num-gpus and --max-batch-size must be >= 1, --num-warmups >= 0")
    if args.burstiness <= 0:
        raise UserError("--burstiness must be positive")
    goodput = parse_goodput(args.goodput)
    offline = args.backend in ("vllm", "hf", "ours")
    if offline and (any(not math.isinf(r) for r in args.request_rate) or args.max_concurrency != [None]):
        raise UserError(f"backend {args.backend} runs offline: every request at once (no --request-rate or "
                        "--max-concurrency; use --max-batch-size for hf/ours)")
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else args.dataset_name != "sharegpt"
    tokenizer = _tokenizer(args)
    output_len = args.output_len if args.output_len is not None else (
        None if args.dataset_name == "sharegpt" else args.random_output_len)
    n = args.num_prompts + args.num_warmups
    if args.workload_file:
        specs = load_workload(args.workload_file, n)
    else:
        specs = build_workload(tokenizer, args.dataset_name, n, args.seed, input_len=args.random_input_len,
                               output_len=output_len, range_ratio=args.random_range_ratio,
                               max_input_len=args.max_input_len, prefix_len=args.prefix_len,
                               num_prefixes=args.num_prefixes, ignore_eos=ignore_eos,
                               sharegpt_split=args.sharegpt_split)
    # Warm-ups are extra requests drawn after the measured ones, so the measured workload does not depend on them.
    warm, specs = specs[args.num_prompts:], specs[:args.num_prompts]
    backend = make_backend(args)
    points = [(r, c) for r in args.request_rate for c in args.max_concurrency]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config["command"] = "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    config["ignore_eos"], config["output_len"] = ignore_eos, output_len
    results = []
    for rate, conc in points:
        arrivals = arrival_times(len(specs), rate, args.burstiness, args.seed)
        records, duration, _ = run_load(backend, specs, arrivals, conc, warm, not args.no_progress)
        metrics = summarize(records, duration, goodput, args.gpu_hour_price, args.num_gpus)
        info = backend.describe()
        point = {**config, "request_rate": rate, "max_concurrency": conc,
                 "model_label": info.get("model", args.model)}
        result = build_result(point, metrics, records, info, backend.peak_memory_mb(), backend.kv_cache_usage())
        print(terminal_table(result))
        path, csv_path = save_result(_point_path(args, rate, conc, len(points) > 1), result, records)
        print(f"saved {path} and {csv_path}")
        results.append(result)
    return results

