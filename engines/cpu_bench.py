"""Our engine against vLLM's CPU build on this machine: the same seeded ShareGPT workload, offline, one run.

Each engine runs through the benchmark harness (`python -m benchmarks run --backend ours|vllm`) in its own process,
so neither holds the other's memory or threads; the table compares their output throughput and latencies.

    flock /tmp/llmip-measure.lock python -m engines.cpu_bench --out results/engines/cpu_bench.json
    python -m engines.cpu_bench --num-prompts 8 --max-output-len 16 --engines ours     # the code path, quickly
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from core.errors import UserError, cli

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [("output_throughput", "out tok/s", "{:,.1f}"), ("request_throughput", "req/s", "{:.2f}"),
          ("median_ttft_ms", "med TTFT ms", "{:,.0f}"), ("median_tpot_ms", "med TPOT ms", "{:.1f}"),
          ("duration", "wall s", "{:.1f}")]


def run_engine(engine: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "run", "--backend", engine, "--model", args.model,
           "--dtype", args.dtype, "--dataset-name", "sharegpt", "--num-prompts", str(args.num_prompts),
           "--seed", str(args.seed), "--max-input-len", str(args.max_input_len), "--max-model-len",
           str(args.max_model_len), "--max-batch-size", str(args.max_num_seqs), "--out", str(out)]
    if args.max_output_len:
        cmd += ["--output-len", str(args.max_output_len)]
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout)
    if done.returncode != 0 or not out.exists():
        return {"engine": engine, "error": f"exit code {done.returncode}"}
    return {"engine": engine, **json.loads(out.read_text())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="vllm,ours", help="comma list of: vllm, ours")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", help="both engines (vLLM's CPU build also runs bfloat16)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-len", type=int, default=512, help="skip longer ShareGPT prompts")
    p.add_argument("--max-output-len", type=int, default=64,
                   help="every request generates this many tokens (ignore_eos); 0 = ShareGPT's own reply lengths")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256, help="ours (vLLM uses its own default)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    p.add_argument("--out", default=None, help="write both results' metrics as JSON here")
    args = p.parse_args(argv)
    args.engine_list = args.engines.split(",")
    if set(args.engine_list) - {"vllm", "ours"}:
        raise UserError(f"--engines takes a comma list of vllm, ours, got {args.engines!r}")
    if args.num_prompts < 1 or args.max_output_len < 0:
        raise UserError("--num-prompts must be at least 1 and --max-output-len not negative")
    return args


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_engine(e, args, Path(tmp) / f"{e}.json") for e in args.engine_list]
    label = next((r.get("model") for r in rows if r.get("engine") == "ours" and "model" in r), args.model)
    print(f"\n{args.num_prompts} ShareGPT prompts (evaluation split, seed {args.seed}), "
          f"{'outputs of ' + str(args.max_output_len) + ' tokens' if args.max_output_len else 'real reply lengths'}"
          f", offline (all at t=0); {label}, {args.dtype}, CPU (shared machine)")
    print(f"{'engine':<7}" + "".join(f"{h:>14}" for _, h, _ in FIELDS))
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:<7} failed: {r['error']}")
            continue
        print(f"{r['engine']:<7}" + "".join(f"{f.format(r[k]) if r.get(k) is not None else '-':>14}"
                                            for k, _, f in FIELDS))
    ok = {r["engine"]: r for r in rows if "error" not in r}
    if len(ok) == 2:
        print(f"ours / vLLM output throughput: {ok['ours']['output_throughput'] / ok['vllm']['output_throughput']:.2f}x")
    if args.out:
        keep = [k for k, _, _ in FIELDS] + ["mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
                                            "total_output_tokens", "peak_memory_mb", "machine", "date"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                              "results": [{"engine": r["engine"], **{k: r.get(k) for k in keep},
                                                           "error": r.get("error")} for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
