"""vLLM's OpenAI server launched, queried with the openai client, and driven by our harness; ours beside it.

Each engine in `--engines` gets a fresh server process on 127.0.0.1 (vLLM's
`python -m vllm.entrypoints.openai.api_server`, ours `python -m engines.ours.server`, llama.cpp's
`python -m llama_cpp.server` on the model's GGUF), answers one completion and
one streamed chat through the official openai client, then serves the same seeded harness workload
(`python -m benchmarks run --backend openai ...`) and is stopped. The end is one table: the same load, engine
against engine. Options this script does not know are the harness's own (workload, --request-rate, ...).

    python -m engines.vllm.serve --num-prompts 32 --request-rate 4                    # vLLM's server, this CPU
    python -m engines.vllm.serve --engines vllm,ours --dataset-name sharegpt --num-prompts 64 --request-rate 2
    python -m engines.vllm.serve --engines vllm,ours --random-weights --device cuda --dataset-name random \\
        --random-input-len 256 --random-output-len 128 --num-prompts 400 --request-rate 16  # a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from core.errors import UserError, cli

ENGINES = ("vllm", "ours", "llamacpp")
REPO = Path(__file__).resolve().parents[2]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until it answers 200; a clear error if the server exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise UserError(f"no answer from {url} within {timeout_s:.0f} s")


@contextlib.contextmanager
def launch(engine: str, args: argparse.Namespace, log: Path) -> Iterator[tuple[str, int]]:
    """Start one engine's server, wait until it answers, yield (url, pid), always stop it."""
    from benchmarks.server import free_port, stop
    from core.loading import find_model_dir

    port = free_port()
    common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", args.model,
              "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
              "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if engine == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(find_model_dir(args.model)),
               "--dtype", args.dtype, "--tensor-parallel-size", str(args.tensor_parallel_size), "--seed", "0",
               "--disable-uvicorn-access-log", *common]
        cmd += ["--load-format", "dummy"] if args.random_weights else []
        cmd += ["--quantization", args.quantization] if args.quantization else []
        cmd += ["--enforce-eager"] if args.enforce_eager else []
    elif engine == "llamacpp":  # serves one request at a time (llama-cpp-python's server holds a lock per model)
        from engines.llamacpp.offline import resolve_gguf
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_gguf(args.model)),
               "--model_alias", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(args.max_model_len),
               "--interrupt_requests", "False"]  # its default: a new request cuts off the one streaming
    else:
        cmd = [sys.executable, "-m", "engines.ours.server", "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--disable-uvicorn-access-log", *common]
        cmd += ["--random-weights"] if args.random_weights else []
        cmd += ["--enforce-eager"] if args.enforce_eager else []
        cmd += shlex.split(args.ours_args)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    print(f"starting {engine}: {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                cwd=REPO)
        try:
            url = f"http://127.0.0.1:{port}"
            try:  # llama-cpp-python's server has no /health: its model list says it is up
                wait_ready(url + ("/v1/models" if engine == "llamacpp" else "/health"), proc, args.startup_timeout)
            except UserError as e:
                tail = log.read_text()[-2000:]
                raise UserError(f"{engine} server did not start ({e}); end of its log:\n{tail}") from None
            yield url, proc.pid
        finally:
            stop(proc)


def query(url: str, model: str) -> None:
    """The official openai client against the server: one completion, one streamed chat answer."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    print("  models:", [m.id for m in client.models.list()])
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    print(f"  completion: {r.choices[0].text!r} ({r.usage.completion_tokens} tokens)")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=12, temperature=0, stream=True)
    print(f"  streamed chat: {''.join(c.choices[0].delta.content or '' for c in stream if c.choices)!r}")


def _num(value: float | None, width: int) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"


def summary_table(results: list[tuple[str, dict]], label: str) -> str:
    head = (f"{'engine':8} {'rate':>6} {'done':>5} {'fail':>4} {'out tok/s':>9} {'req/s':>6} {'TTFT med':>9} "
            f"{'TTFT p99':>9} {'TPOT med':>9} {'TPOT p99':>9} {'ITL med':>8}")
    lines = [label, head, "-" * len(head)]
    for engine, r in results:
        rate = "inf" if r["request_rate"] == float("inf") else f"{r['request_rate']:g}"
        cells = [_num(r[k], width) for k, width in (("output_throughput", 9), ("request_throughput", 6),
                 ("median_ttft_ms", 9), ("p99_ttft_ms", 9), ("median_tpot_ms", 9), ("p99_tpot_ms", 9),
                 ("median_itl_ms", 8))]
        lines.append(f"{engine:8} {rate:>6} {r['completed']:>5} {r['failed']:>4} " + " ".join(cells))
    lines.append("ms; TTFT/TPOT/ITL as vLLM's benchmark defines them; same seeded workload for every engine")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> list[tuple[str, dict]]:
    parser = argparse.ArgumentParser(prog="python -m engines.vllm.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="vllm", help="comma list of: " + ", ".join(ENGINES))
    parser.add_argument("--model", default="smollm2-135m", help="registry name or Hugging Face folder")
    parser.add_argument("--random-weights", action="store_true", help="vLLM: --load-format dummy")
    parser.add_argument("--device", default="auto", help="ours: auto, cpu, cuda (vLLM's build decides its own)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    parser.add_argument("--quantization", default=None, help="vLLM only: awq, gptq, ...")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile")
    parser.add_argument("--ours-args", default="", help="more options for our server, e.g. '--engine-core thread'")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--log-dir", type=Path, default=Path("results/engines"))
    args, harness_argv = parser.parse_known_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise UserError(f"--engines takes a comma list of {', '.join(ENGINES)}, got {args.engines!r}")
    if set(engines) - {"vllm"} and (args.tensor_parallel_size > 1 or args.quantization):
        raise UserError("--tensor-parallel-size and --quantization apply to vLLM only: run it alone")
    forbidden = {"--backend", "--base-url", "--model", "--served-model-name", "--server-pid"}
    if forbidden & {a.split("=")[0] for a in harness_argv}:
        raise UserError(f"this script sets {', '.join(sorted(forbidden))} for the harness itself")

    from benchmarks.cli import add_run_args, run
    from core.registry import DEFAULT_MODEL, REGISTRY

    harness = argparse.ArgumentParser(prog="harness options")
    add_run_args(harness)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    # Presets borrow the default model's tokenizer; folders bring their own.
    tokenizer = DEFAULT_MODEL if args.model in REGISTRY else args.model
    results = []
    for engine in engines:
        with launch(engine, args, args.log_dir / f"{engine}-server.log") as (url, pid):
            print(f"{engine} is up at {url}", flush=True)
            query(url, args.model)
            # The server's RSS is sampled with psutil where it is installed (not on every GPU machine).
            rss = ["--server-pid", str(pid)] if importlib.util.find_spec("psutil") else []
            h = harness.parse_args(["--backend", "openai", "--base-url", url, "--model", args.model,
                                    "--tokenizer", tokenizer, "--label", engine, *rss, *harness_argv])
            results += [(engine, r) for r in run(h)]
    weights = "RANDOM weights (speed only)" if args.random_weights else "trained weights"
    print("\n" + summary_table(results, f"{args.model} [{weights}, {args.dtype}] served over HTTP, "
                                        f"max_num_seqs {args.max_num_seqs}, max_model_len {args.max_model_len}"))
    return results


if __name__ == "__main__":
    main()
