"""One command for the book's baseline comparison on this machine: transformers (static batching), vLLM offline
and vLLM's OpenAI server over HTTP, on the same seeded workload, then report.md and PNG plots.

    python -m benchmarks compare                       # default model, CPU; writes results/benchmarks/compare/

Each backend runs in its own process (`python -m benchmarks run ...`), so each peak memory is its own and one
backend's crash does not lose the others' results. The server runs with vLLM's default settings (it compiles the
model at start-up, which takes minutes on a small CPU) and is swept over --request-rate.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from core.errors import UserError

from benchmarks.plot import plot_all
from benchmarks.report import markdown_report
from benchmarks.results import load_results, write_atomic
from benchmarks.server import vllm_server

KNOWN = ("hf", "vllm", "vllm-server", "ours")


def _run(argv: list[str]) -> bool:
    cmd = [sys.executable, "-m", "benchmarks", "run", *argv]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent).returncode == 0


def compare(args: argparse.Namespace) -> Path:
    backends = args.backends.split(",")
    if unknown := set(backends) - set(KNOWN):
        raise UserError(f"unknown backends {sorted(unknown)} (choose from {', '.join(KNOWN)})")
    out = args.result_dir
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()  # a report of this run only
    workload = ["--model", args.model, "--dataset-name", "random", "--num-prompts", str(args.num_prompts),
                "--random-input-len", str(args.random_input_len), "--random-output-len", str(args.random_output_len),
                "--num-warmups", "2", "--result-dir", str(out), "--seed", "0"]
    failed = []
    for name in backends:
        if name == "vllm-server":
            with vllm_server(args.model, log=out / "vllm-server.log", timeout_s=900) as (url, pid):
                ok = _run(workload + ["--backend", "openai", "--label", "vllm-server", "--base-url", url,
                                      "--request-rate", args.request_rate, "--server-pid", str(pid),
                                      "--server-metrics"])
        else:
            label = {"vllm": "vllm-offline", "hf": "hf-static"}.get(name, name)
            ok = _run(workload + ["--backend", name, "--label", label, "--max-batch-size", str(args.max_batch_size),
                                  "--device", args.device] + (["--dtype", args.dtype] if args.dtype else []))
        if not ok:
            failed.append(name)
    results = load_results(sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime))
    if not results:
        raise UserError("every backend failed; see the output above")
    plots = [p.name for p in plot_all(results, out)]
    cmd = "python -m benchmarks compare " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                      if k not in ("func", "command"))
    text = markdown_report(results, f"{args.model}: transformers vs vLLM offline vs vLLM server", plots)
    text += f"\nCommand: `{cmd}`\n" + (f"\nFailed backends: {', '.join(failed)}\n" if failed else "")
    write_atomic(out / "report.md", text)
    print(f"wrote {out / 'report.md'} and {', '.join(plots)}" + (f"; FAILED: {failed}" if failed else ""))
    return out / "report.md"
