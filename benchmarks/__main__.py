"""python -m benchmarks {run,report,plot,compare,capacity,stub-server}: the harness's command line.

    python -m benchmarks run --backend hf --dataset-name random --num-prompts 32
    python -m benchmarks run --backend openai --base-url http://127.0.0.1:8000 --request-rate 1,2,4,inf
    python -m benchmarks report results/benchmarks/*.json --out report.md
    python -m benchmarks plot results/benchmarks/*.json --out-dir plots/
    python -m benchmarks compare          # hf vs vLLM offline vs vLLM's server, report + plots
    python -m benchmarks capacity         # the highest request rate the harness itself sustains
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import UserError, cli

from benchmarks.cli import add_run_args, run


def _report(args: argparse.Namespace) -> None:
    from benchmarks.report import markdown_report
    from benchmarks.results import load_results, write_atomic
    results = load_results(args.results)
    text = markdown_report(results, args.title)
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)


def _plot(args: argparse.Namespace) -> None:
    from benchmarks.plot import plot_all
    from benchmarks.results import load_results
    for path in plot_all(load_results(args.results), args.out_dir):
        print(f"wrote {path}")


def _compare(args: argparse.Namespace) -> None:
    from benchmarks.compare import compare
    compare(args)


def _capacity(args: argparse.Namespace) -> None:
    from benchmarks.capacity import capacity
    capacity(args)


def _stub(args: argparse.Namespace) -> None:
    from benchmarks.stub_server import serve
    serve(args.port, args.tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="benchmark one backend (a list of rates or concurrencies sweeps)")
    add_run_args(p)
    p.set_defaults(func=run)
    p = sub.add_parser("report", help="markdown comparison table of result files")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--title", default="Benchmark report")
    p.set_defaults(func=_report)
    p = sub.add_parser("plot", help="PNG plots of result files")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out-dir", type=Path, default=Path("results/benchmarks/plots"))
    p.set_defaults(func=_plot)
    p = sub.add_parser("compare", help="hf vs vLLM offline vs vLLM's server on the default model, with report")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--backends", default="hf,vllm,vllm-server", help="any of hf,vllm,vllm-server,ours")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=32)
    p.add_argument("--request-rate", default="2,4,inf", help="rates for the server sweep")
    p.add_argument("--max-batch-size", type=int, default=8, help="static batch size of hf and ours")
    p.add_argument("--device", default="cpu", help="hf and ours (vLLM picks its own build's device)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--result-dir", type=Path, default=Path("results/benchmarks/compare"))
    p.set_defaults(func=_compare)
    p = sub.add_parser("capacity", help="highest request rate the harness sustains against an instant stub server")
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=16, help="tokens the stub streams per request")
    p.add_argument("--request-rate", default="500,1000,2000,4000,inf")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=_capacity)
    p = sub.add_parser("stub-server", help="an OpenAI-compatible server that streams fixed tokens instantly")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--tokens", type=int, default=16)
    p.set_defaults(func=_stub)
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
